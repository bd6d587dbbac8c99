"""Full-precision CIFAR-100 baseline: pre-activation ResNet-20, 200 epochs, SGD + cosine."""

from qflax.train import default_config


def get_config():
  c = default_config()
  c.method.name = "fp"
  c.model.name = "preact_resnet20"
  c.dataset.name = "cifar100"
  c.bits = (32,)
  c.quant.weight_quantizer = "none"
  c.quant.act_quantizer = "none"
  c.num_epochs = 200
  c.batch_size = 128
  c.optimizer.learning_rate = 0.1
  c.optimizer.weight_decay = 5e-4
  return c
