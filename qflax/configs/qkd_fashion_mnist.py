"""QKD on Fashion-MNIST, CPU-sized: a W2A2 ConvNet student (QIL intervals, 8-bit
first and last layers) and a wider full-precision ConvNet teacher trained first.

  python launch.py --config configs/qkd_fashion_mnist.py --workdir runs/qkd_fmnist
  # SS only (plain QAT):        --config.method.phase_epochs='(10,0,0)'
  # plain KD, fixed teacher:    --config.method.phase_epochs='(0,0,10)'
  # a teacher from an fp run:   --config.method.teacher_checkpoint=DIR --config.method.teacher_epochs=0
  #                             --config.num_epochs=10
"""

import os

from qflax.train import load_config_file


def get_config():
  c = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "qkd_cifar100.py"))
  c.method.teacher_model = "convnet"
  c.method.teacher_options = {"widths": (32, 64, 128)}
  c.method.teacher_epochs = 3         # trained first here: no fp runs needed
  c.method.teacher_checkpoint = ""
  c.method.student_checkpoint = ""
  c.method.phase_epochs = (2, 4, 4)
  c.model.name = "convnet"
  c.model.options.widths = (16, 32, 64)
  c.dataset.name = "fashion_mnist"
  c.bits = (2,)
  c.num_epochs = 13
  c.eval_batch_size = 1000
  c.optimizer.name = "adam"
  c.optimizer.learning_rate = 2e-3
  c.optimizer.weight_decay = 0.0
  c.log_every_steps = 100
  c.checkpoint_every_steps = 500
  return c
