"""Progressive quantization / stochastic precision / joint KD on CIFAR-100:
pre-activation ResNet-20 students at 4 and 2 bits (DoReFa weights, clamp
activations, full-precision first conv and classifier) guided by one
full-precision ResNet-20 trained in the same step (Zhuang et al., 2018/2021).

  python launch.py --config configs/progressive_cifar100.py --workdir runs/progressive
  # techniques, alone or combined:
  #   --config.method.two_stage=True                   weights first, then activations
  #   --config.method.progressive_bits='(32,8,4)'      32 -> 8 -> 4 -> target
  #   --config.method.stochastic_precision=True        one stage, blocks quantized with probability r
  #   --config.method.joint_kd=none|mutual|guided      the full-precision partner
  # from a trained full-precision network (the paper's ImageNet recipe fine-tunes so):
  #   python launch.py --config configs/fp_cifar100.py --workdir runs/fp_preact_resnet20
  #   ... --config.method.pretrained_checkpoint=runs/fp_preact_resnet20 --config.method.teacher_lr_multiplier=0.2
"""

from qflax.train import default_config


def get_config():
  c = default_config()
  c.method.name = "progressive"
  c.method.two_stage = False
  c.method.progressive_bits = ()
  c.method.stochastic_precision = False
  c.method.sp_schedule = "staircase"
  c.method.sp_batch_norm = "separate"
  c.method.joint_kd = "mutual"
  c.method.temperature = 1.0
  c.method.lambda_s, c.method.lambda_sk, c.method.lambda_t, c.method.lambda_tk = 0.7, 0.7, 1.0, 0.5
  c.method.hint_weight = 0.1
  c.method.teacher_lr_multiplier = 1.0
  c.method.pretrained_checkpoint = ""
  c.model.name = "preact_resnet20"
  c.dataset.name = "cifar100"
  c.bits = (4, 2)
  c.quant.weight_quantizer = "dorefa"
  c.quant.act_quantizer = "clamp"
  c.quant.first_last = "fp"
  c.num_epochs = 200
  c.batch_size = 128
  c.optimizer.name = "sgd"
  c.optimizer.learning_rate = 0.1
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = False
  c.optimizer.schedule = "step"
  c.optimizer.step_milestones = (0.4, 0.6)     # x0.1 at epochs 80 and 120 of 200 (per stage)
  c.optimizer.weight_decay = 1e-4
  return c
