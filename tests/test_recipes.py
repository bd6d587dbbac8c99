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
            "preact_resnet8": "preact_resnet8", "tsm_resnet50": "tsm_resnet8", "convnet": "convnet"}

pytestmark = pytest.mark.skipif(not os.path.isdir(sources.SYSTEM_FASHION_MNIST_DIR),
                                reason="real Fashion-MNIST is needed (.ci/run installs it)")


def _shrink(config, *, steps_per_epoch: int = 40, batch: int = 64, epochs: int | None = None):
  """Real Fashion-MNIST subsets, the family's smallest model, ``steps_per_epoch`` steps an epoch."""
  video = config.model.name.startswith("tsm")
  config.dataset.name = "synthetic" if video else "fashion_mnist"
  config.dataset.stream = False
  config.dataset.download = False
  config.dataset.train_limit = steps_per_epoch * batch
  config.dataset.eval_limit = 1000
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
  config.batch_size = batch
  config.eval_batch_size = 500 if not video else 64
  config.num_devices = 1
  config.log_every_steps = 20
  config.checkpoint_every_steps = 10_000
  config.quant.monitor = True
  if epochs is not None:
    config.num_epochs = epochs
  return config


def _fp_run(tmp_path_factory, model, options=None):
  workdir = tmp_path_factory.mktemp(f"fp_{model}")
  c = train.load_config_file(str(ROOT / "configs" / "fp_cifar100.py"))
  c.model.name = model
  c = _shrink(c, epochs=3)
  c.model.options = options or {}
  train.train_and_evaluate(c, str(workdir))
  return str(workdir)


@pytest.fixture(scope="module")
def fp_runs(tmp_path_factory):
  """The full-precision networks the recipes start from, made once."""
  return {"resnet8": _fp_run(tmp_path_factory, "resnet8")}


def _prepare(name, config, fp_runs, tmp_path_factory):
  method = config.method.name
  if method == "qkd" and config.method.teacher_checkpoint:
    config.method.teacher_model = "resnet8"
    config.method.teacher_checkpoint = config.method.student_checkpoint = fp_runs["resnet8"]
  if method == "cmtkd" and config.method.pretrained_checkpoint:
    config.method.pretrained_checkpoint = fp_runs["resnet8"]
  if method == "qkd" and not config.method.teacher_checkpoint:
    config.method.teacher_options = {"widths": (16, 32, 32)}
  if method == "tq":
    fp = train.load_config_file(str(ROOT / "configs" / "quickstart.py"))
    fp.method.name, fp.bits = "fp", (32,)
    if config.model.name == "convnet":
      fp = _shrink(fp, epochs=2)
      fp.model.options.head_type = "avg"
      config.model.options.head_type = "avg"
    else:
      fp.model.name, fp.model.options = "resnet8", {}
      fp = _shrink(fp, epochs=2)
    workdir = str(tmp_path_factory.mktemp(f"fp_for_{name}"))
    train.train_and_evaluate(fp, workdir)
    config.method.checkpoint = workdir
    config.method.num_blocks = 2           # the layer structure shrinks with the model
    config.quant.calibrate_batches = 1
    config.num_epochs = 1
  return config


EPOCHS = {"aao": 2, "cmtkd": 3, "qkd": 4, "progressive": 2, "tq": 1}


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_trains_above_chance_without_health_warnings(name, fp_runs, tmp_path, tmp_path_factory):
  config = train.load_config_file(str(ROOT / "configs" / f"{name}.py"))
  method = config.method.name
  config = _shrink(config, epochs=EPOCHS.get(method, 3))
  config = _prepare(name, config, fp_runs, tmp_path_factory)
  results = train.train_and_evaluate(config, str(tmp_path))
  accuracy = {v["name"]: v["accuracy"] for v in results["variants"]}
  assert all(a > ABOVE_CHANCE for a in accuracy.values()), accuracy
  warnings = results.get("quantizer_health", {}).get("warnings", [])
  assert not warnings, warnings
