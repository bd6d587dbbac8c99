"""Transform quantization of a trained CIFAR-100 ResNet-20 (Young et al., TPAMI 2021).

Post-training: loads an fp run, compresses its weights to each target rate (bits
per weight) with the identity, KLT and ELT row transforms, evaluates before and
after fine-tuning, and writes the compressed files and the rate-distortion frontier.

  python launch.py --config configs/fp_cifar100.py --workdir runs/fp_resnet20
  python launch.py --config configs/tq_resnet20.py --workdir runs/tq_resnet20 \\
      --config.method.checkpoint=runs/fp_resnet20
"""

from qflax.train import default_config


def get_config():
  c = default_config()
  c.method.name = "tq"
  c.method.checkpoint = "runs/fp_resnet20"
  c.method.transforms = ("identity", "klt", "elt")
  c.method.target_rates = (1.0, 2.0, 3.0, 4.0)
  c.method.num_blocks = 16
  c.method.eps = 1e-3
  c.method.eps_norm = "frobenius"     # the authors' code; "spectral" as an option
  c.method.mode = "row"               # or "column" (mix output channels)
  c.method.distortion = "output"      # "weight": the weight-error allocation baseline
  c.method.fine_tune = "transforms"   # S and T only; "all": every parameter in train mode (the authors' script)
  c.method.covariance_chunk = 8       # images per chunk of the ELT's gradient covariance
  c.model.name = "resnet20"
  c.dataset.name = "cifar100"
  c.bits = (32,)
  c.quant.calibrate_batches = 2       # 256 analysis images
  c.num_epochs = 3                    # fine-tuning
  c.batch_size = 128
  c.optimizer.name = "sgd"
  c.optimizer.learning_rate = 1e-4
  c.optimizer.momentum = 0.9
  c.optimizer.schedule = "constant"
  c.optimizer.weight_decay = 1e-4
  return c
