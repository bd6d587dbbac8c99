"""AAO on UCF-101 video with the TSM ResNet-50 (8 frames per clip), B = (32, 8, 4, 2).

Not runnable yet: the training loop reads in-memory datasets only, and UCF-101
needs ``qflax.data.StreamingPipeline`` wired into the loop (open work). The config
validates (``qflax.train.validate``) so that the remaining work is the data path.
"""

import os

from qflax.train import load_config_file


def get_config():
  c = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "aao_cifar100.py"))
  c.model.name = "tsm_resnet50"
  c.model.options.num_frames = 8
  c.dataset.name = "tfds:ucf101"
  c.bits = (32, 8, 4, 2)
  c.num_epochs = 25
  c.batch_size = 64
  c.optimizer.learning_rate = 0.01
  c.optimizer.weight_decay = 1e-4
  return c
