"""The quickstart end to end on real Fashion-MNIST (installed by .ci/run).

The slowest test (about 7 minutes on 2 CPU cores next to another worker): it runs
``configs/quickstart.py`` exactly as ``python launch.py`` does, so it is marked
``slow`` and runs with ``pytest -m slow``. The default run covers the same config
through the recipe smoke test (a subset of the data, the same code path).
"""

import os
from pathlib import Path

import pytest

from qflax import train
from qflax.data import sources

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart_on_real_fashion_mnist(tmp_path):
  assert os.path.isdir(sources.SYSTEM_FASHION_MNIST_DIR) or os.environ.get(sources.FASHION_MNIST_ENV), (
      "real Fashion-MNIST is needed: apt-get install -y dataset-fashion-mnist (.ci/run does this)")
  config = train.load_config_file(str(ROOT / "configs" / "quickstart.py"))
  config.dataset.download = False
  # conftest fakes 8 CPU devices; on 2 cores XLA's CPU all-reduce rendezvous times
  # out (40 s) for a model this size. A plain `python launch.py` sees one device.
  config.num_devices = 1
  results = train.train_and_evaluate(config, str(tmp_path))
  accuracy = {v["name"]: v["accuracy"] for v in results["variants"]}
  assert results["dataset"] == "fashion_mnist"
  assert accuracy["fp32"] > 0.89, accuracy
  assert accuracy["w4a4"] > 0.87, accuracy
  sizes = {v["name"]: v["model_bytes"] for v in results["variants"]}
  assert sizes["w4a4"] < sizes["fp32"]
