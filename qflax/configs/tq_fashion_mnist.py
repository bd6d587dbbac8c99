"""Transform quantization on Fashion-MNIST, CPU-sized: compresses the quickstart-sized
ConvNet of an fp run (with a global-average-pool head).

  python launch.py --config configs/quickstart.py --workdir runs/fp_fmnist --config.method.name=fp \\
      --config.bits='(32,)' --config.model.options.head_type=avg
  python launch.py --config configs/tq_fashion_mnist.py --workdir runs/tq_fmnist \\
      --config.method.checkpoint=runs/fp_fmnist
"""

import os

from qflax.train import load_config_file


def get_config():
  c = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "tq_resnet20.py"))
  c.method.checkpoint = "runs/fp_fmnist"
  c.model.name = "convnet"
  c.model.options.widths = (16, 32, 64)
  c.model.options.head_type = "avg"
  c.dataset.name = "fashion_mnist"
  c.dataset.train_limit = 12800      # fine-tuning on a subset keeps it to minutes on CPU
  c.num_epochs = 1
  c.eval_batch_size = 1000
  c.optimizer.name = "adam"
  c.optimizer.learning_rate = 1e-4
  c.optimizer.weight_decay = 0.0
  c.log_every_steps = 20
  return c
