"""Progressive quantization / stochastic precision / joint KD on Fashion-MNIST,
CPU-sized: a 2-bit ConvNet student (DoReFa weights, clamp activations).

  python launch.py --config configs/progressive_fashion_mnist.py --workdir runs/progressive_fmnist
  # direct training: the default; add --config.method.two_stage=True, --config.method.progressive_bits='(32,8,4)',
  # --config.method.stochastic_precision=True and/or --config.method.joint_kd=mutual|guided
"""

import os

from qflax.train import load_config_file


def get_config():
  c = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "progressive_cifar100.py"))
  c.method.joint_kd = "none"
  c.model.name = "convnet"
  c.model.options.widths = (16, 32, 64)
  c.dataset.name = "fashion_mnist"
  c.bits = (2,)
  c.num_epochs = 6
  c.eval_batch_size = 1000
  c.optimizer.name = "adam"
  c.optimizer.learning_rate = 2e-3
  c.optimizer.schedule = "cosine"
  c.optimizer.weight_decay = 0.0
  c.log_every_steps = 100
  c.checkpoint_every_steps = 500
  return c
