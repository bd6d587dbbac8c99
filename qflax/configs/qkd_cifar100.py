"""QKD on CIFAR-100: ResNet-20 students at W4A4, W3A3 and W2A2 (QIL intervals,
first and last layers at 8 bits), each with its own ResNet-56 teacher;
self-studying 30, co-studying 100, tutoring 70 epochs (Kim et al., 2019).

Self-contained, the teacher is trained first (``method.teacher_epochs=200``).
To reuse a trained teacher instead (any ``fp`` run of the teacher model):

  python launch.py --config configs/fp_cifar100.py --config.model.name=resnet56 --workdir runs/fp_resnet56
  python launch.py --config configs/qkd_cifar100.py --workdir runs/qkd \\
      --config.method.teacher_checkpoint=runs/fp_resnet56 --config.method.teacher_epochs=0 --config.num_epochs=200
"""

from qflax.train import default_config


def get_config():
  c = default_config()
  c.method.name = "qkd"
  c.method.teacher_model = "resnet56"
  c.method.teacher_epochs = 200
  c.method.teacher_checkpoint = ""
  c.method.phase_epochs = (30, 100, 70)
  c.method.temperature = 2.0
  c.method.kd_weight = 1.0
  c.method.teacher_lr_multiplier = 0.1
  c.model.name = "resnet20"
  c.dataset.name = "cifar100"
  c.bits = (4, 3, 2)
  c.quant.weight_quantizer = "qil"
  c.quant.act_quantizer = "qil"
  c.quant.signed_act_quantizer = "qil_signed"
  c.quant.first_last = "int8"
  c.quant.calibrate_batches = 4      # activation intervals from the 99.9th percentile
  c.num_epochs = 400                 # teacher_epochs + sum(phase_epochs)
  c.batch_size = 128
  c.optimizer.name = "sgd"
  c.optimizer.learning_rate = 0.1
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = True
  c.optimizer.schedule = "cosine"
  c.optimizer.weight_decay = 1e-4    # the spec's 5e-5 for a W2A2-only run: --config.optimizer.weight_decay=5e-5
  return c
