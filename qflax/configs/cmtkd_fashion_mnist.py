"""CMT-KD on Fashion-MNIST, CPU-sized: a 2-bit ConvNet student, teachers at 8/6/4 bits.

  python launch.py --config configs/cmtkd_fashion_mnist.py --workdir runs/cmtkd_fmnist
  # ablations: --config.method.importance=equal | --config.method.mutual_learning=False
  #            --config.method.feature_loss=False
"""

import os

from qflax.train import load_config_file


def get_config():
  c = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "cmtkd_cifar100.py"))
  c.model.name = "convnet"
  c.model.options.widths = (16, 32, 64)
  c.dataset.name = "fashion_mnist"
  c.method.warmup_epochs = 2             # teachers learn alone first, so frozen-teacher ablations are meaningful
  c.method.pretrained_checkpoint = ""    # (the warm-up replaces the fp run here)
  c.method.teacher_weight_decay = 0.0
  c.num_epochs = 10
  c.eval_batch_size = 1000
  c.optimizer.name = "adam"
  c.optimizer.learning_rate = 2e-3
  c.optimizer.weight_decay = 0.0
  c.log_every_steps = 100
  c.checkpoint_every_steps = 500
  return c
