"""Recipe smoke tests: every shipped config trains on real Fashion-MNIST with its own
quantizers, optimizer, learning rate, schedule shape and initialisation, the model shrunk
to the smallest member of its family and a few hundred steps; every variant ends clearly
above chance and no quantizer health warning fires.

The runs a recipe starts from (its docstring's fp runs) are made first, shrunk the same way.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from qflax import train
from qflax.data import sources

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p.stem for p in (ROOT / "configs").glob("*.py") if p.stem != "__init__")
CHANCE = 0.1
ABOVE_CHANCE = 0.3
SMALLEST = {"preact_resnet20": "preact_resnet8", "resnet20": "resnet8", "resnet56": "resnet8", "resnet8": "resnet8",
            "preact_resnet8": "preact_resnet8", "tsm_resnet50": "tsm_resnet8", "tsm_resnet8": "tsm_resnet8",
            "convnet": "convnet"}

pytestmark = pytest.mark.skipif(not os.path.isdir(sources.SYSTEM_FASHION_MNIST_DIR),
                                reason="real Fashion-MNIST is needed (.ci/run installs it)")


def _ends(bits):
  """The highest and lowest bit-widths: the low end is where the recipes broke."""
  return tuple(b for b in bits if b in (max(bits), min(bits)))


def _shrink(config, *, steps_per_epoch: int = 40, batch: int = 32, epochs: int | None = None):
  """Real Fashion-MNIST subsets, the family's smallest model, ``steps_per_epoch`` steps an epoch."""
  video = config.model.name.startswith("tsm")
  config.dataset.name = "synthetic" if video else "fashion_mnist"
  config.dataset.stream = False
  config.dataset.download = False
  config.dataset.train_limit = steps_per_epoch * batch
  config.dataset.eval_limit = 500
  if video:   # no real video here: synthetic clips through the same model family
    config.dataset.synthetic.update({"num_train": steps_per_epoch * batch, "num_test": 256, "image_size": 16,
                                     "channels": 3, "num_classes": 10, "num_frames": 2})
    config.dataset.num_frames = 2
    config.model.options = {"num_frames": 2}
  elif config.model.name == "convnet":
    config.model.options.widths = (8, 16, 16)
  else:
    config.model.options = {}
  config.model.name = SMALLEST[config.model.name]
  config.bits = _ends(config.bits)
  if config.method.get("teacher_bits"):
    config.method.teacher_bits = _ends(config.method.teacher_bits)
  config.batch_size = batch
  config.eval_batch_size = 500 if not video else 64
  config.num_devices = 1
  config.log_every_steps = 20
  config.checkpoint_every_steps = 10_000
  config.quant.monitor = True
  if epochs is not None:
    config.num_epochs = epochs
  return config


def _fp_run(tmp_path_factory, model):
  workdir = tmp_path_factory.mktemp(f"fp_{model}")
  c = train.load_config_file(str(ROOT / "configs" / "fp_cifar100.py"))
  c.model.name = model
  c = _shrink(c, epochs=3)
  train.train_and_evaluate(c, str(workdir))
  return str(workdir)


@pytest.fixture(scope="module")
def fp_run(tmp_path_factory):
  """``fp_run(model)``: the workdir of a shrunk full-precision run of ``model``, made once."""
  runs = {}

  def get(model):
    if model not in runs:
      runs[model] = _fp_run(tmp_path_factory, model)
    return runs[model]
  return get


def _starts_from_fp_run(config) -> bool:
  """Whether the recipe starts from a trained fp run of its own model (``fp_run``)."""
  method = config.method.name
  return bool((method == "qkd" and config.method.teacher_checkpoint) or config.method.get("pretrained_checkpoint")
              or (method == "tq" and config.model.name != "convnet"))


def _prepare(name, config, fp_run, tmp_path_factory):
  """Points the recipe's fp starts at a shrunk fp run, and makes TQ's ConvNet fp run."""
  method = config.method.name
  fp = fp_run(config.model.name) if _starts_from_fp_run(config) else None
  if method == "qkd" and fp:
    config.method.teacher_model = config.model.name
    config.method.teacher_checkpoint = config.method.student_checkpoint = fp
  if method == "qkd" and not fp:
    config.method.teacher_options = {"widths": (16, 32, 32)}
  if config.method.get("pretrained_checkpoint"):
    config.method.pretrained_checkpoint = fp
  if method == "tq" and not fp:
    fp_config = train.load_config_file(str(ROOT / "configs" / "quickstart.py"))
    fp_config.method.name, fp_config.bits = "fp", (32,)
    # The avg-pool head learns slowly; a weak fp net leaves 2 bits/weight at chance.
    fp_config = _shrink(fp_config, epochs=4)
    fp_config.model.options.head_type = config.model.options.head_type = "avg"
    config.method.checkpoint = str(tmp_path_factory.mktemp(f"fp_for_{name}"))
    train.train_and_evaluate(fp_config, config.method.checkpoint)
  elif method == "tq":
    config.method.checkpoint = fp
  if method == "tq":
    config.method.num_blocks = 2           # the layer structure shrinks with the model
    config.method.target_rates = (2.0,)    # 1 bit/weight of a network trained 80-120 steps is noise
    config.quant.calibrate_batches = 1
    config.num_epochs = 1
  return config


EPOCHS = {"aao": 3, "cmtkd": 3, "qat": 5, "qkd": 4, "progressive": 2, "tq": 1}


def _xdist_groups() -> dict[str, str]:
  """pytest-xdist groups (--dist loadgroup): the recipes that start from an fp run of the same
  model share one worker, so that fp run is trained once; the others are split in two."""
  configs = {n: train.load_config_file(str(ROOT / "configs" / f"{n}.py")) for n in RECIPES}
  fp_models = {n: SMALLEST[c.model.name] for n, c in configs.items() if _starts_from_fp_run(c)}
  shared = {n: f"recipes_from_fp_{m}" for n, m in fp_models.items() if list(fp_models.values()).count(m) > 1}
  rest = [n for n in RECIPES if n not in shared]
  return {**shared, **{n: f"recipes{i % 2}" for i, n in enumerate(rest)}}


GROUPS = _xdist_groups()


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.xdist_group(GROUPS[n])) for n in RECIPES])
def test_recipe_trains_above_chance_without_health_warnings(name, fp_run, tmp_path, tmp_path_factory):
  config = train.load_config_file(str(ROOT / "configs" / f"{name}.py"))
  method = config.method.name
  config = _shrink(config, epochs=EPOCHS.get(method, 3))
  config = _prepare(name, config, fp_run, tmp_path_factory)
  results = train.train_and_evaluate(config, str(tmp_path))
  accuracy = {v["name"]: v["accuracy"] for v in results["variants"]}
  assert all(a > ABOVE_CHANCE for a in accuracy.values()), accuracy
  warnings = results.get("quantizer_health", {}).get("warnings", [])
  assert not warnings, warnings
