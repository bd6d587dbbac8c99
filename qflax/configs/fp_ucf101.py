"""Full-precision TSM ResNet-50 on UCF-101 (8-frame clips): the network
``configs/aao_ucf101.py`` starts from (TSM fine-tunes from a trained network).

  python launch.py --config configs/fp_ucf101.py --workdir runs/fp_tsm_resnet50

UCF-101 streams from prepared TFDS data in ``dataset.data_dir`` (preparing it needs
TensorFlow: ``pip install -e '.[tf]'``): a random 8-frame clip per video, one random
resized crop to 224 per clip, and centre clips and crops for evaluation.
"""

import os

from qflax.train import load_config_file


def get_config():
  c = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "fp_cifar100.py"))
  c.model.name = "tsm_resnet50"
  c.model.options.num_frames = 8
  c.dataset.name = "tfds:ucf101"
  c.dataset.stream = True
  c.dataset.num_frames = 8
  c.dataset.image_size = 224
  c.dataset.resize_size = 256
  c.num_epochs = 25
  c.batch_size = 64
  c.optimizer.learning_rate = 0.01
  c.optimizer.weight_decay = 1e-4
  return c
