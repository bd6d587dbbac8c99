"""AAO on Fashion-MNIST, CPU-sized: the quickstart ConvNet with B = (32, 8, 4, 2).

  python launch.py --config configs/aao_fashion_mnist.py --workdir runs/aao_fmnist
  # ablations: --config.method.swap=False, --config.method.teacher=fixed, --config.bits='(8,4,2)'
"""

import os

from qflax.train import load_config_file


def get_config():
  c = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "aao_cifar100.py"))
  c.model.name = "convnet"
  c.model.options.widths = (16, 32, 64)
  c.dataset.name = "fashion_mnist"
  c.bits = (32, 8, 4, 2)
  c.quant.act_param_init.alpha = 4.0
  c.num_epochs = 3
  c.eval_batch_size = 1000
  c.optimizer.name = "adam"
  c.optimizer.learning_rate = 2e-3
  c.optimizer.weight_decay = 0.0
  c.log_every_steps = 100
  c.checkpoint_every_steps = 500
  return c
