"""The protocol between methods and the training loop.

The loop (``qflax.train``) knows a method only through this interface: it asks
for the phases, builds the initial state, calls the (jitted) train step, and
evaluates every variant. Adding a method never touches the loop.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar, NamedTuple

import flax
import jax

Metrics = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
  """Everything a checkpoint holds. ``extra`` is method-specific (may be ``{}``)."""
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  extra: Any


class Phase(NamedTuple):
  """A training phase: its own optimizer state and schedule, ``num_epochs`` long."""
  name: str
  num_epochs: int


class Variant(NamedTuple):
  """One evaluated configuration (a bit-width, a replica, ...)."""
  name: str
  w_bits: int
  a_bits: int


class Method(abc.ABC):
  """A training method. Subclasses set ``name`` and implement the abstract methods.

  ``train_step`` and ``eval_logits`` must be pure and jittable; the loop jits them
  (``phase_index`` static, ``variant_index`` traced so that evaluating another
  variant never recompiles).
  """
  name: ClassVar[str]

  @classmethod
  def validate_config(cls, config, error: type[Exception]) -> None:
    """Checks the method's own fields; raises ``error`` naming the field."""

  @abc.abstractmethod
  def phases(self) -> list[Phase]:
    ...

  @abc.abstractmethod
  def init_state(self, rng: jax.Array, sample_x: jax.Array) -> TrainState:
    ...

  def calibrate(self, state: TrainState, batches: list[jax.Array]) -> TrainState:
    """Initialises quantizer scalars from calibration batches (``quant.calibrate_batches``).

    The default leaves the state unchanged (methods without learnable quantizer scalars).
    """
    del batches
    return state

  def pretrained_checkpoints(self) -> dict[str, str]:
    """Workdirs of finished runs whose final state this method starts from, by role
    (e.g. ``{"teacher": "runs/fp_resnet56"}``). The loop restores each (latest
    checkpoint, as plain arrays) and passes it to :meth:`load_pretrained`."""
    return {}

  def load_pretrained(self, state: TrainState, role: str, arrays: dict) -> TrainState:
    """Puts a restored run's arrays (``{"params", "batch_stats", ...}``) into ``state``."""
    raise NotImplementedError(f"{self.name} loads no pretrained {role}")

  @abc.abstractmethod
  def start_phase(self, state: TrainState, phase_index: int) -> TrainState:
    """The state at the start of ``phase_index``: a fresh optimizer state."""

  @abc.abstractmethod
  def train_step(self, state: TrainState, x: jax.Array, y: jax.Array, rng: jax.Array,
                 phase_index: int) -> tuple[TrainState, Metrics]:
    """One optimizer step; metrics hold at least ``loss`` (scalar) and ``accuracy``."""

  @abc.abstractmethod
  def variants(self) -> list[Variant]:
    ...

  @abc.abstractmethod
  def eval_logits(self, state: TrainState, x: jax.Array, variant_index: jax.Array) -> jax.Array:
    ...

  @abc.abstractmethod
  def model_bytes(self, state: TrainState, variant_index: int, sample_x: jax.Array) -> int:
    """Size of the exported integer model of a variant."""

  # A name under which the loop evaluates every variant once before the first step
  # (e.g. a post-training method's accuracy before fine-tuning); None: no such evaluation.
  initial_evaluation: ClassVar[str | None] = None

  def export(self, state: TrainState, workdir: str, sample_x: jax.Array) -> dict:
    """Writes method-specific files into ``workdir`` at the end of a run; returns
    keys for ``results.json``."""
    del state, workdir, sample_x
    return {}

  def report(self, state: TrainState) -> dict:
    """Method-specific keys for ``results.json``."""
    return {}
