"""Train, evaluate and checkpoint a qflax method.

  python launch.py --config configs/aao_cifar100.py --workdir runs/aao
  python launch.py --config configs/quickstart.py --config.num_epochs=1

Without ``--config`` it runs the quickstart (``configs/quickstart.py``). Re-running
the same command resumes from the workdir's latest checkpoint.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_HERE = os.path.dirname(os.path.abspath(__file__))
_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(_HERE, "configs", "quickstart.py"), "Python config file (get_config()).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, logs and results go "
                               "(default: runs/<config file name>).")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() first (multi-host).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)   # keep Orbax's per-save INFO lines off the console
  config = _CONFIG.value
  if _DISTRIBUTED.value:
    import jax
    jax.distributed.initialize()
    with config.unlocked():
      config.distributed = True
  workdir = _WORKDIR.value or os.path.join(
      "runs", os.path.splitext(os.path.basename(config_flags.get_config_filename(flags.FLAGS["config"])))[0])

  from qflax import data, train  # after distributed initialisation
  try:
    train.train_and_evaluate(config, workdir)
  except (train.ConfigError, data.DataUnavailableError, train.CheckpointError, train.NonFiniteLossError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except train.TrainingInterrupted as e:
    print(str(e), file=sys.stderr)
    sys.exit(128 + e.signum)


if __name__ == "__main__":
  app.run(main)
