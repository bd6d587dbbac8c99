"""CMT-KD on CIFAR-100: a 2-bit ResNet-20 student with three quantized ResNet-20
teachers at 8, 6 and 4 bits (HWGQ activations, per-layer uniform weights,
full-precision first conv and classifier), fused after stages 1 and 2
(Pham et al., 2023).

  python launch.py --config configs/cmtkd_cifar100.py --workdir runs/cmtkd
  # ablations: --config.method.importance=equal, --config.method.mutual_learning=False,
  #            --config.method.feature_loss=False

Teachers and student start from one trained full-precision ResNet-20, as in the paper, so
the recipe is two commands:

  python launch.py --config configs/fp_cifar100.py --config.model.name=resnet20 --workdir runs/fp_resnet20
  python launch.py --config configs/cmtkd_cifar100.py --workdir runs/cmtkd

Weights use the MSE-optimal per-layer scale (``uniform_layer``; abs-max zeroes most 2-bit
weights). SGD momentum 0.9 without Nesterov; weight decay 2.5e-5 for the 2-bit student and
1e-4 for the teachers (the spec's).
"""

from qflax.train import default_config


def get_config():
  c = default_config()
  c.method.name = "cmtkd"
  c.method.teacher_bits = (8, 6, 4)
  c.method.fusion_points = ()          # the end of every stage but the last
  c.method.alpha, c.method.beta, c.method.gamma = 1.0, 0.5, 100.0
  c.method.temperature = 4.0
  c.method.importance = "learned"
  c.method.importance_lr_multiplier = 0.1
  c.method.mutual_learning = True
  c.method.feature_loss = True
  c.method.remat_teachers = False
  c.method.warmup_epochs = 0
  c.method.pretrained_checkpoint = "runs/fp_resnet20"
  c.method.teacher_weight_decay = 1e-4
  c.model.name = "resnet20"
  c.dataset.name = "cifar100"
  c.bits = (2,)
  c.quant.weight_quantizer = "uniform_layer"
  c.quant.act_quantizer = "hwgq"
  c.quant.first_last = "fp"
  c.num_epochs = 200
  c.batch_size = 128
  c.optimizer.name = "sgd"
  c.optimizer.learning_rate = 0.1
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = False
  c.optimizer.schedule = "cosine"
  c.optimizer.weight_decay = 2.5e-5     # the spec's value for 1-2 bit students
  return c
