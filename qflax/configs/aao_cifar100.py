"""AAO on CIFAR-100 (the recipe in aao.md): pre-activation ResNet-20, B = (32, 8, 6, 4, 2),
SAT weights + PACT activations, adaptive teachers, block swapping p = 0.5,
SGD nesterov 0.9, lr 0.1 cosine, weight decay 5e-4 on weights, batch 128, 200 epochs.

PACT's clip starts from the data (per bit-width slot, the clip at or below the 99.9th
percentile of 4 calibration batches with the least quantization error) and carries PACT's
L2 penalty (``optimizer.clip_weight_decay``): started at 8 on unit-scale activations with
neither, it never moves and the 2-bit member stays near chance.
``quant.act_quantizer=pact_adabits`` gives AdaBits' clip gradient instead.

  python launch.py --config configs/aao_cifar100.py --workdir runs/aao_cifar100
  # from a trained full-precision network (AdaBits / AAO on ImageNet start so):
  python launch.py --config configs/fp_cifar100.py --workdir runs/fp_preact_resnet20
  python launch.py --config configs/aao_cifar100.py --workdir runs/aao_cifar100 \\
      --config.method.pretrained_checkpoint=runs/fp_preact_resnet20
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
  c.method.pretrained_checkpoint = ""    # the workdir of an fp run of the model, or "" (from scratch)
  c.model.name = "preact_resnet20"
  c.dataset.name = "cifar100"
  c.bits = (32, 8, 6, 4, 2)
  c.quant.weight_quantizer = "sat"
  c.quant.act_quantizer = "pact"
  c.quant.act_param_init.alpha = 8.0     # replaced by calibration
  c.quant.calibrate_batches = 4
  c.quant.first_last = "fp"
  c.num_epochs = 200
  c.batch_size = 128
  c.optimizer.name = "sgd"
  c.optimizer.learning_rate = 0.1
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = True
  c.optimizer.weight_decay = 5e-4
  c.optimizer.clip_weight_decay = 5e-4   # PACT's L2 on alpha
  c.optimizer.schedule = "cosine"
  return c
