"""Quickstart: Fashion-MNIST, a small ConvNet, full precision and W4A4 side by side.

Two dedicated models (``qat`` with ``bits=(32, 4)``) trained together on real
Fashion-MNIST; a few minutes on 2 CPU cores.

  python launch.py --config configs/quickstart.py --workdir runs/quickstart
"""

from qflax.train import default_config


def get_config():
  c = default_config()
  c.method.name = "qat"
  c.model.name = "convnet"
  c.model.options.widths = (16, 32, 64)
  c.model.options.head_type = "flatten"    # or "avg" (global average pool)
  c.dataset.name = "fashion_mnist"
  c.bits = (32, 4)
  c.num_epochs = 3
  c.batch_size = 128
  c.eval_batch_size = 1000
  c.quant.weight_quantizer = "sat"
  c.quant.act_quantizer = "pact"
  c.quant.act_param_init.alpha = 4.0
  c.optimizer.name = "adam"
  c.optimizer.learning_rate = 2e-3
  c.optimizer.weight_decay = 0.0
  c.optimizer.schedule = "cosine"
  c.log_every_steps = 100
  c.checkpoint_every_steps = 500
  return c
