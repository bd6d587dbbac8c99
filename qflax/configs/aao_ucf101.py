"""AAO on UCF-101 video with the TSM ResNet-50 (8-frame clips), B = (32, 8, 4, 2).

TSM fine-tunes from a trained full-precision network, and so does this recipe; the
model, data and optimizer are those of ``configs/fp_ucf101.py``, whose run comes first:

  python launch.py --config configs/fp_ucf101.py --workdir runs/fp_tsm_resnet50
  python launch.py --config configs/aao_ucf101.py --workdir runs/aao_ucf101

A dry run without the data or the fp run streams synthetic clips through the same path:

  python launch.py --config configs/aao_ucf101.py --config.dataset.name=synthetic \\
      --config.dataset.synthetic.num_frames=8 --config.dataset.synthetic.num_classes=101 \\
      --config.dataset.synthetic.image_size=64 --config.dataset.image_size=56 \\
      --config.dataset.resize_size=64 --config.num_epochs=1 --config.batch_size=8 \\
      --config.method.pretrained_checkpoint=
"""

import os

from qflax.train import load_config_file


def _recipe(name):
  return load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), name))


def get_config():
  c = _recipe("aao_cifar100.py")
  video = _recipe("fp_ucf101.py")
  c.model, c.dataset, c.optimizer = video.model, video.dataset, video.optimizer
  c.num_epochs, c.batch_size = video.num_epochs, video.batch_size
  c.optimizer.clip_weight_decay = 5e-4   # PACT's L2 on alpha (aao_cifar100)
  c.method.pretrained_checkpoint = "runs/fp_tsm_resnet50"
  c.bits = (32, 8, 4, 2)
  return c
