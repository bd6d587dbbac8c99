"""The training system: one loop for every method (see ``loop.train_and_evaluate``)."""

from qflax.train.checkpoint import CheckpointError
from qflax.train.checkpoint import Checkpoints
from qflax.train.checkpoint import latest_arrays
from qflax.train.config import ConfigError
from qflax.train.config import default_config
from qflax.train.config import load_config_file
from qflax.train.config import load
from qflax.train.config import validate
from qflax.train.loop import NonFiniteLossError
from qflax.train.loop import TrainingInterrupted
from qflax.train.loop import make_mesh
from qflax.train.loop import train_and_evaluate

run = train_and_evaluate

__all__ = ["CheckpointError", "Checkpoints", "ConfigError", "NonFiniteLossError", "TrainingInterrupted",
           "default_config", "latest_arrays", "load", "load_config_file", "make_mesh", "run", "train_and_evaluate",
           "validate"]
