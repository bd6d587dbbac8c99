"""``compute_dtype=bfloat16`` through the loop: every method trains, and the state stays float32.

The layer-level numerics (products on the integer codes) are in ``tests/nn/test_compute_dtype.py``.
"""

import os

import jax
import numpy as np
import pytest

from conftest import make_tiny_config
from qflax import train
from qflax.data import sources

METHODS = ("fp", "qat", "aao", "qkd", "cmtkd", "progressive", "tq")
FP_MODEL = {"widths": (4, 8, 8), "head_type": "avg"}


def _bf16(config):
  config.compute_dtype = "bfloat16"
  config.num_epochs = 1
  config.num_devices = 2        # sharded (sync-BN over bfloat16 activations), cheap on 2 cores
  return config


@pytest.fixture(scope="module")
def fp_run(tmp_path_factory):
  """A tiny bfloat16 ``fp`` run: the ``fp`` case, and where ``qkd``'s teacher and ``tq`` start."""
  config = _bf16(make_tiny_config())
  config.method.name = "fp"
  config.bits = (32,)
  config.model.options = dict(FP_MODEL)
  workdir = tmp_path_factory.mktemp("fp_bf16")
  return config, workdir, train.train_and_evaluate(config, str(workdir))


def _method_config(name, fp_workdir):
  c = _bf16(make_tiny_config())
  c.method.name = name
  if name == "aao":
    c.bits = (32, 4, 2)
  elif name == "qkd":
    c.method.update({"teacher_model": "convnet", "teacher_options": dict(FP_MODEL),
                     "teacher_checkpoint": str(fp_workdir), "phase_epochs": (0, 1, 0)})   # co-studying
    c.bits = (2,)
    c.quant.update({"weight_quantizer": "qil", "act_quantizer": "qil", "first_last": "int8"})
  elif name == "cmtkd":
    c.method.teacher_bits = (8, 4)
    c.bits = (2,)
    c.quant.act_quantizer = "hwgq"
  elif name == "progressive":
    c.method.joint_kd = "guided"          # hint loss on the returned (float32) features
    c.bits = (2,)
    c.quant.update({"weight_quantizer": "dorefa", "act_quantizer": "clamp"})
  elif name == "tq":
    c.model.options = dict(FP_MODEL)
    c.bits = (32,)
    c.method = {"name": "tq", "bit_axis": "auto", "checkpoint": str(fp_workdir), "target_rates": (2.0,),
                "num_blocks": 2}
    c.quant.calibrate_batches = 1
    c.optimizer.learning_rate = 1e-3
  return c


def _float_dtypes(workdir):
  state, _ = train.latest_arrays(str(workdir))
  return {np.asarray(a).dtype.name for a in jax.tree_util.tree_leaves(state)
          if np.issubdtype(np.asarray(a).dtype, np.floating)}


@pytest.mark.parametrize("name", METHODS)
def test_every_method_trains_in_bfloat16_with_a_float32_state(name, fp_run, tmp_path):
  """Parameters, optimizer state, BatchNorm statistics (everything checkpointed) stay float32."""
  if name == "fp":
    config, workdir, result = fp_run
  else:
    config, workdir = _method_config(name, fp_run[1]), tmp_path
    result = train.train_and_evaluate(config, str(workdir))
  assert train.load(config).run.compute_dtype == "bfloat16"
  accuracies = [v["accuracy"] for v in result["variants"]]
  assert accuracies and all(0.0 <= a <= 1.0 for a in accuracies), result["variants"]
  assert all(v["model_bytes"] > 0 for v in result["variants"] if "model_bytes" in v)
  assert _float_dtypes(workdir) == {"float32"}


def test_compute_dtype_is_validated(tiny_config):
  tiny_config.compute_dtype = "float16"
  with pytest.raises(train.ConfigError, match=r"compute_dtype='float16'.*bfloat16"):
    train.load(tiny_config)


FASHION_MNIST = os.path.isdir(sources.SYSTEM_FASHION_MNIST_DIR) or os.environ.get(sources.FASHION_MNIST_ENV)


@pytest.mark.slow   # two full quickstart runs, about 5 minutes on 2 CPU cores
@pytest.mark.skipif(not FASHION_MNIST, reason="real Fashion-MNIST is needed (apt-get install dataset-fashion-mnist)")
def test_bfloat16_quickstart_lands_within_half_a_point_of_float32(tmp_path):
  """The quickstart's recipe (ConvNet 16/32/64, SAT + PACT, fp32 and W4A4 side by side,
  Adam 2e-3, cosine) on real Fashion-MNIST, reduced to fit a CPU test: 2 epochs of
  12,000 training images (the full quickstart is 3 of 60,000: about 3 minutes in
  float32 and longer in bfloat16 on 2 cores without bfloat16 instructions), evaluated
  on all 10,000 test images, so that the two models' disagreements, not the sample,
  decide the difference. Same seed, data order and initialisation: only
  ``compute_dtype`` differs. Each variant's bfloat16 accuracy must be within 0.5
  points of float32's. (The full quickstart: float32 fp32 90.53 %, w4a4 90.46 %;
  bfloat16 90.62 %, 90.18 %.)"""
  from pathlib import Path
  root = Path(__file__).resolve().parents[2]
  accuracy = {}
  for dtype in ("float32", "bfloat16"):
    config = train.load_config_file(str(root / "configs" / "quickstart.py"))
    config.dataset.update({"download": False, "train_limit": 12000})
    config.num_epochs = 2
    config.num_devices = 1
    config.compute_dtype = dtype
    result = train.train_and_evaluate(config, str(tmp_path / dtype))
    accuracy[dtype] = {v["name"]: v["accuracy"] for v in result["variants"]}
  for name, fp32 in accuracy["float32"].items():
    assert abs(accuracy["bfloat16"][name] - fp32) <= 0.005, accuracy
