"""Fixed bit-width QAT on CIFAR-100: dedicated pre-activation ResNet-20 models at
8, 4 and 2 bits (SAT weights, PACT activations), trained side by side."""

from qflax.train import default_config


def get_config():
  c = default_config()
  c.method.name = "qat"
  c.model.name = "preact_resnet20"
  c.dataset.name = "cifar100"
  c.bits = (8, 4, 2)
  c.quant.weight_quantizer = "sat"
  c.quant.act_quantizer = "pact"
  c.quant.act_param_init.alpha = 8.0     # replaced by calibration
  c.quant.calibrate_batches = 4
  c.num_epochs = 200
  c.batch_size = 128
  c.optimizer.learning_rate = 0.1
  c.optimizer.weight_decay = 5e-4
  c.optimizer.clip_weight_decay = 5e-4   # PACT's L2 on alpha
  return c
