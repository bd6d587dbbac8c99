"""Test setup: eight fake CPU devices, set before JAX initialises its backends."""

import os
import re
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests compile the same tiny programs; a persistent compilation cache shared by the
# test processes (and the launcher subprocesses they start) halves the suite's time.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"qflax-tests-jax-cache-{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# XLA:CPU's LLVM back end at -O1 (its default is -O3): the suite's programs are small and each
# runs a few steps, so compiling them costs more than running them. Measured on the recipe smoke
# tests (tests/test_recipes.py, cold cache, -n 2): 986 worker-seconds against 1,204.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=1").strip()
# The compilation settings above, for the launcher subprocesses that tests start with a bare
# environment (the optimisation level alone of XLA_FLAGS: not, e.g., a forced device count).
LAUNCHER_ENV = {name: os.environ[name] for name in (
    "JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES")}
LAUNCHER_ENV["XLA_FLAGS"] = " ".join(re.findall(r"--xla_backend_optimization_level=\S*", os.environ["XLA_FLAGS"]))

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

from qflax.train.devices import configure_cpu_thread_pools  # noqa: E402

configure_cpu_thread_pools()   # two XLA:CPU pool threads per fake device (see qflax/train/devices.py)

import pytest  # noqa: E402


# The longest groups, started first (with --no-loadscope-reorder xdist hands groups out
# in collection order, two queued per worker): the three groups of the recipe smoke tests
# go to different workers where they can. A name also stands for ``<name>_...``
# (``recipes_from_fp_<model>``).
_LONGEST_FIRST = ("recipes_from_fp", "recipes0", "recipes1", "test_saved", "test_bfloat16_training", "test_launch",
                  "test_qkd", "test_cmtkd", "test_aao", "test_tq", "test_loop", "test_reliability")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
  """For ``pytest -n 2 --dist loadgroup --no-loadscope-reorder`` (the README's test
  command): each test module runs on one worker, so its module fixtures are built once
  (a test may name its own ``xdist_group``: the recipe smoke tests are split in three), and
  the longest groups come first."""
  def group(item):
    marker = item.get_closest_marker("xdist_group")
    return marker.args[0] if marker else item.module.__name__.rpartition(".")[2]

  for item in items:
    if not item.get_closest_marker("xdist_group"):
      item.add_marker(pytest.mark.xdist_group(group(item)))
  def rank(item):
    name = group(item)
    return next((i for i, first in enumerate(_LONGEST_FIRST) if name == first or name.startswith(first + "_")),
                len(_LONGEST_FIRST))

  items.sort(key=rank)


@pytest.fixture(autouse=True)
def _restore_the_launchers_process_hooks():
  """The launcher, run in process by some tests, quiets failed checkpoint writes for the rest
  of its process (logging filters, ``sys.unraisablehook``); each test ends with them undone."""
  import logging
  import sys

  from absl import logging as absl_logging
  loggers = (absl_logging.get_absl_logger(), logging.getLogger("asyncio"))
  filters, hook = [list(logger.filters) for logger in loggers], sys.unraisablehook
  yield
  for logger, kept in zip(loggers, filters):
    logger.filters = kept
  sys.unraisablehook = hook


from qflax.train import default_config  # noqa: E402


def make_tiny_config():
  """A tiny synthetic config that trains in seconds."""
  c = default_config()
  c.method.name = "qat"
  c.model.name = "convnet"
  c.model.options.widths = (4, 8, 8)
  c.dataset.name = "synthetic"
  c.dataset.synthetic.update({"num_train": 48, "num_test": 40, "image_size": 8, "channels": 1, "num_classes": 4})
  c.bits = (32, 4)
  c.num_epochs = 2
  c.batch_size = 16
  c.optimizer.name = "sgd"
  c.optimizer.learning_rate = 0.05
  c.log_every_steps = 1
  c.checkpoint_every_steps = 2
  # The health monitor compiles one statistics pass per variant; tests of it turn it on.
  c.quant.monitor = False
  return c


@pytest.fixture
def tiny_config():
  return make_tiny_config()



def tensorboard_events(logdir):
  """TensorBoard's own reader over the event files under ``logdir``, loaded (it honours a
  resumed writer's purge step); skips the test where the ``dev`` extra's tensorboard is missing."""
  event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
  acc = event_accumulator.EventAccumulator(str(logdir), size_guidance={"scalars": 0, "histograms": 0,
                                                                       "tensors": 0})
  acc.Reload()
  return acc
