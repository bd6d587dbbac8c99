"""AAO on UCF-101 video with the TSM ResNet-50 (8-frame clips), B = (32, 8, 4, 2).

UCF-101 streams from prepared TFDS data in ``dataset.data_dir`` (preparing it needs
TensorFlow: ``pip install -e '.[tf]'``): a random 8-frame clip per video, one random
resized crop to 224 per clip, and centre clips and crops for evaluation. A dry run
without the data streams synthetic clips through the same path:

  python launch.py --config configs/aao_ucf101.py --config.dataset.name=synthetic \
      --config.dataset.synthetic.num_frames=8 --config.dataset.synthetic.num_classes=101 \
      --config.dataset.synthetic.image_size=64 --config.dataset.image_size=56 \
      --config.dataset.resize_size=64 --config.num_epochs=1 --config.batch_size=8

TSM networks start from a trained full-precision one (TSM fine-tunes from ImageNet):
``--config.method.pretrained_checkpoint=DIR`` with DIR the workdir of an fp run of the same
model (``--config.method.name=fp --config.bits='(32,)'`` on this config).
"""

import os

from qflax.train import load_config_file


def get_config():
  c = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "aao_cifar100.py"))
  c.model.name = "tsm_resnet50"
  c.model.options.num_frames = 8
  c.dataset.name = "tfds:ucf101"
  c.dataset.stream = True
  c.dataset.num_frames = 8
  c.dataset.image_size = 224
  c.dataset.resize_size = 256
  c.bits = (32, 8, 4, 2)
  c.num_epochs = 25
  c.batch_size = 64
  c.optimizer.learning_rate = 0.01
  c.optimizer.weight_decay = 1e-4
  return c
