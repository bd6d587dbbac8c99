"""AAO on CIFAR-100 (the recipe in aao.md): pre-activation ResNet-20, B = (32, 8, 6, 4, 2),
SAT weights + PACT activations, adaptive teachers, block swapping p = 0.5,
SGD nesterov 0.9, lr 0.1 cosine, weight decay 5e-4 on weights, batch 128, 200 epochs.

  python launch.py --config configs/aao_cifar100.py --workdir runs/aao_cifar100
"""

from qflax.train import default_config


def get_config():
  c = default_config()
  c.method.name = "aao"
  c.method.teacher = "adaptive"          # fixed | next | adaptive
  c.method.sample_teacher = False
  c.method.teacher_temperature = 1.0
  c.method.stats_momentum = 0.9
  c.method.beta = 1.0                    # 0.5 mixes CE into the students' loss
  c.method.temperature = 1.0
  c.method.swap = True
  c.method.swap_weight = 1.0
  c.method.swap_probability = 0.5
  c.method.swap_schedule = "constant"    # constant | linear (to 0 at the end)
  c.method.swap_mask = "bernoulli"       # bernoulli | prefix
  c.model.name = "preact_resnet20"
  c.dataset.name = "cifar100"
  c.bits = (32, 8, 6, 4, 2)
  c.quant.weight_quantizer = "sat"
  c.quant.act_quantizer = "pact"
  c.quant.act_param_init.alpha = 8.0
  c.quant.first_last = "fp"
  c.num_epochs = 200
  c.batch_size = 128
  c.optimizer.name = "sgd"
  c.optimizer.learning_rate = 0.1
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = True
  c.optimizer.weight_decay = 5e-4
  c.optimizer.schedule = "cosine"
  return c
