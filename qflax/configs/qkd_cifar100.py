"""QKD on CIFAR-100: ResNet-20 students at W4A4, W3A3 and W2A2 (QIL intervals,
first and last layers at 8 bits), each with its own ResNet-56 teacher;
self-studying 30, co-studying 100, tutoring 70 epochs (Kim et al., 2019).

As in the paper, the student self-studies from full-precision weights and the teacher is
a trained full-precision network, so the recipe is three commands (fp runs first):

  python launch.py --config configs/fp_cifar100.py --config.model.name=resnet56 --workdir runs/fp_resnet56
  python launch.py --config configs/fp_cifar100.py --config.model.name=resnet20 --workdir runs/fp_resnet20
  python launch.py --config configs/qkd_cifar100.py --workdir runs/qkd

QIL intervals are constrained (0 <= pruning point < clipping point) and learn slower than
the weights: activation intervals at 0.1x (1e-2), weight intervals at 1e-3x (1e-4), as in a
QKD reimplementation; at 1x they escape the data under SGD 0.1 and freeze their layers.
Without the fp runs, ``--config.method.teacher_checkpoint= --config.method.teacher_epochs=200
--config.method.student_checkpoint=`` trains the teacher first and the student from scratch.
"""

from qflax.train import default_config


def get_config():
  c = default_config()
  c.method.name = "qkd"
  c.method.teacher_model = "resnet56"
  c.method.teacher_epochs = 0
  c.method.teacher_checkpoint = "runs/fp_resnet56"
  c.method.student_checkpoint = "runs/fp_resnet20"
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
  c.num_epochs = 200                 # teacher_epochs + sum(phase_epochs); other values scale the phases
  c.batch_size = 128
  c.optimizer.name = "sgd"
  c.optimizer.learning_rate = 0.1
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = True
  c.optimizer.schedule = "cosine"
  c.optimizer.weight_decay = 1e-4    # the spec's 5e-5 for a W2A2-only run: --config.optimizer.weight_decay=5e-5
  c.optimizer.quantizer_lr_multiplier = 0.1            # activation intervals
  c.optimizer.weight_quantizer_lr_multiplier = 1e-3    # weight intervals
  return c
