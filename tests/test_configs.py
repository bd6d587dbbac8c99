"""Every shipped config validates, and overrides are checked like any field."""

from pathlib import Path

import pytest

from qflax import train

CONFIGS = sorted(p for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.py") if p.stem != "__init__")


def _load(path):
  return train.load_config_file(str(path))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_validates(path, tmp_path):
  config = _load(path)
  starts = train.load(config).method.starts      # every field but the runs it starts from
  if starts:
    # The recipe's fp runs come first (its docstring); a fresh checkout has none, and
    # validation names the field that points at the missing run.
    with pytest.raises(train.ConfigError, match=starts[0].field):
      train.validate(config)
  else:
    train.validate(config)


def test_every_issue_config_is_shipped():
  names = {p.stem for p in CONFIGS}
  assert {"quickstart", "fp_cifar100", "qat_cifar100", "aao_cifar100", "aao_fashion_mnist", "aao_ucf101",
          "qkd_cifar100", "qkd_fashion_mnist", "cmtkd_cifar100", "cmtkd_fashion_mnist", "progressive_cifar100",
          "progressive_fashion_mnist", "tq_resnet20", "tq_fashion_mnist"} <= names


def test_aao_recipe_matches_the_spec():
  c = _load(next(p for p in CONFIGS if p.stem == "aao_cifar100"))
  assert c.model.name == "preact_resnet20" and tuple(c.bits) == (32, 8, 6, 4, 2)
  assert (c.optimizer.name, c.optimizer.learning_rate, c.optimizer.weight_decay, c.num_epochs, c.batch_size) == (
      "sgd", 0.1, 5e-4, 200, 128)
  assert c.method.teacher == "adaptive" and c.method.swap_probability == 0.5 and c.method.beta == 1.0


def test_recipes_carry_the_quantizer_fixes():
  aao = _load(next(p for p in CONFIGS if p.stem == "aao_cifar100"))
  assert aao.quant.calibrate_batches > 0 and aao.optimizer.clip_weight_decay > 0       # PACT's clip moves
  qkd = _load(next(p for p in CONFIGS if p.stem == "qkd_cifar100"))
  assert qkd.optimizer.weight_quantizer_lr_multiplier < qkd.optimizer.quantizer_lr_multiplier < 1
  assert qkd.method.student_checkpoint and qkd.method.teacher_checkpoint                # from fp networks
  cmtkd = _load(next(p for p in CONFIGS if p.stem == "cmtkd_cifar100"))
  assert cmtkd.quant.weight_quantizer == "uniform_layer" and cmtkd.method.pretrained_checkpoint
  assert not cmtkd.optimizer.nesterov and cmtkd.method.teacher_weight_decay == 1e-4
