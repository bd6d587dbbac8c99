"""The protocol between the training loop and the methods.

The loop (``qflax.train``) knows a method only through this module. A method is
built from its options (a frozen :class:`MethodOptions`, validated once) and the
:class:`Task` (classes, input shape, steps per epoch); everything whose shape is
static (phases, variants, plans, fusion points, layer structure) exists as soon as
the method does. The core:

* ``phases``: declarative :class:`Phase` s (length, optimizer built once, the
  parameter groups it trains, whether to evaluate before it);
* ``variants``: the evaluated configurations (:class:`Variant`);
* ``init_state(rng)``: a fresh :class:`TrainState`;
* ``train_step(state, x, y, rng, phase_index)``: one optimizer step (use
  :meth:`Method.apply_gradients`);
* ``network(state, index)``: variant ``index`` as a plain Flax call
  (:class:`VariantNetwork`), from which ``eval_logits`` and the exported size follow;
* ``finalize(state, workdir) -> dict``: files and ``results.json`` keys at the end.

Optional: ``prepare(state, batches)`` (data-dependent set-up before the first step,
e.g. quantizer calibration) and ``options.starts`` (finished runs whose weights start
some parameter groups; the loop restores and places them with one shared mechanism).

Parameters are grouped: ``state.params`` and ``state.batch_stats`` map group names
(``"model"``, ``"student"``, ``"teachers"``, ...) to trees, and a phase trains a
subset of the groups, each at its own learning-rate multiplier.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, Callable, ClassVar, Mapping, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from qflax import export, models, options
from qflax import nn as qnn
from qflax.methods import optim

Metrics = dict[str, jax.Array]
BIT_AXIS_MODES = ("auto", "loop", "vmap")


@flax.struct.dataclass
class TrainState:
  """Everything a checkpoint holds. ``params`` and ``batch_stats`` map group names to
  trees; ``opt_state`` is the current phase's optimizer state over its trained groups;
  ``extra`` is method-specific (may be ``{}``)."""
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  extra: Any


class Task(NamedTuple):
  """What a method learns about the data when it is built."""
  num_classes: int
  input_shape: tuple[int, ...]      # one example: (H, W, C) or (T, H, W, C)
  steps_per_epoch: int


class Phase(NamedTuple):
  """A training phase: ``num_epochs`` long, with a fresh state of its own ``optimizer``
  over the parameter groups in ``trains`` (the others stay fixed). ``learning_rate`` is
  the base group's schedule (for logs); ``evaluate_before`` evaluates every variant once
  before the phase's first step (recorded as ``before_<name>``)."""
  name: str
  num_epochs: int
  optimizer: optax.GradientTransformation
  trains: tuple[str, ...]
  learning_rate: optax.Schedule
  evaluate_before: bool = False


class Variant(NamedTuple):
  """One evaluated configuration (a bit-width, a replica, a teacher, ...)."""
  name: str
  w_bits: int
  a_bits: int


class VariantNetwork(NamedTuple):
  """One variant as a plain Flax call: ``model.apply(variables, x, plan, train=False)``;
  ``model_settings`` (registry name and options) rebuild ``model`` elsewhere (export)."""
  model: models.Network
  variables: dict
  plan: qnn.PrecisionPlan
  model_settings: options.ModelSettings


class Start(NamedTuple):
  """A finished ``fp`` run (``workdir``, of ``model``) whose final weights start the
  parameter groups ``groups``; ``field`` is the config field that named it."""
  field: str
  workdir: str
  model: options.ModelSettings
  groups: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class MethodOptions(options.Settings):
  """Base of every method's options: the shared run settings plus ``method.*`` fields.

  Subclasses declare their fields with :mod:`qflax.options` checks and put rules
  across fields in ``check``.
  """
  section = "method"
  run: options.RunSettings = dataclasses.field(default_factory=options.RunSettings,
                                               metadata={"from_config": False})
  bit_axis: str = options.choice("auto", BIT_AXIS_MODES,
                                 doc="per-bit-width computations as an unrolled loop or vmap (auto: per backend)")

  mixed_precision: ClassVar[bool] = False   # accepts 'w<W>a<A>' entries and per-block plans in bits

  def __post_init__(self):
    if not self.mixed_precision and not options.is_uniform(self.run.bits):
      options.invalid("bits", self.run.bits, "integer bit-widths for this method ('w<W>a<A>' entries and "
                      "per-block plans are for method qat)")
    super().__post_init__()

  @classmethod
  def from_config(cls, config) -> MethodOptions:
    return cls.from_node(config.method, ignore=("name",), run=options.RunSettings.from_config(config))

  @property
  def starts(self) -> tuple[Start, ...]:
    return ()

  @property
  def bits(self) -> tuple[int, ...]:
    return self.run.bits


class Method(abc.ABC):
  """A training method; see the module docstring for the protocol.

  Subclasses set ``name`` and ``Options``, and ``self.phases`` / ``self.variants`` in
  their constructor; ``train_step`` and ``eval_logits`` must be pure and jittable
  (``phase_index`` static, ``variant_index`` traced).
  """
  name: ClassVar[str]
  Options: ClassVar[type[MethodOptions]] = MethodOptions
  phases: tuple[Phase, ...]
  variants: tuple[Variant, ...]

  def __init__(self, opts: MethodOptions, task: Task):
    self.options, self.task = opts, task

  # --- the core ----------------------------------------------------------------

  @abc.abstractmethod
  def init_state(self, rng: jax.Array) -> TrainState:
    """A fresh state (jittable); use :meth:`new_state`."""

  @abc.abstractmethod
  def train_step(self, state: TrainState, x: jax.Array, y: jax.Array, rng: jax.Array,
                 phase_index: int) -> tuple[TrainState, Metrics]:
    """One optimizer step; metrics hold at least ``loss`` (scalar) and ``accuracy``."""

  @abc.abstractmethod
  def network(self, state: TrainState, index) -> VariantNetwork:
    """Variant ``index``'s network (``index`` a Python int; traced where the variants
    share one model, which is what the default :meth:`eval_logits` needs)."""

  def eval_logits(self, state: TrainState, x: jax.Array, variant_index: jax.Array) -> jax.Array:
    return apply_network(self.network(state, variant_index), x)

  def finalize(self, state: TrainState, workdir: str) -> dict:
    """Keys for ``results.json`` (and files in ``workdir``) at the end of a run.
    ``"model_bytes"`` maps variant names to the size of their exported model."""
    del workdir
    return {"model_bytes": {v.name: self.exported_bytes(state, k) for k, v in enumerate(self.variants)}}

  # --- optional ----------------------------------------------------------------

  @property
  def prepare_batches(self) -> int:
    """Training batches :meth:`prepare` needs (0: no preparation)."""
    return self.options.run.quant.calibrate_batches

  def prepare(self, state: TrainState, batches: list[jax.Array]) -> TrainState:
    """Data-dependent set-up before the first step (quantizer calibration, analysis)."""
    del batches
    return state

  # --- shared machinery ----------------------------------------------------------

  @property
  def sample_input(self) -> jax.Array:
    return jnp.zeros((1,) + tuple(self.task.input_shape), jnp.float32)

  def phase(self, name: str, num_epochs: int, groups: Mapping[str, float], *, evaluate_before: bool = False,
            settings: Mapping[str, options.OptimizerSettings] | None = None,
            optimizer: Callable[[optax.Schedule], optax.GradientTransformation] | None = None) -> Phase:
    """A phase training ``groups`` (name -> learning-rate multiplier) with the run's
    optimizer settings (``settings`` overrides them per group), or with
    ``optimizer(schedule)`` over ``{group: params}`` when given."""
    base = self.options.run.optimizer
    total = num_epochs * self.task.steps_per_epoch
    schedule = optim.learning_rate_schedule(base, total, self.task.steps_per_epoch)
    if optimizer is not None:
      tx = optimizer(schedule)
    else:
      own = dict(settings or {})
      txs = {}
      for g, m in groups.items():
        group_settings = own.get(g, base)
        group_schedule = schedule if g not in own else optim.learning_rate_schedule(
            group_settings, total, self.task.steps_per_epoch)
        txs[g] = optim.make_optimizer(group_settings, group_schedule, m)
      tx = optax.partition(txs, {g: g for g in groups})
    return Phase(name, num_epochs, tx, tuple(groups), schedule, evaluate_before)

  def new_state(self, params: dict, batch_stats: dict, extra: Any = None) -> TrainState:
    """Step 0 with phase 0's optimizer state."""
    state = TrainState(jnp.int32(0), params, batch_stats, None, {} if extra is None else extra)
    return self.start_phase(state, 0)

  def start_phase(self, state: TrainState, phase_index: int) -> TrainState:
    """The state at the start of ``phase_index``: a fresh optimizer state."""
    phase = self.phases[phase_index]
    return state.replace(opt_state=phase.optimizer.init({g: state.params[g] for g in phase.trains}))

  def apply_gradients(self, state: TrainState, phase_index: int, grads: dict, **changes) -> TrainState:
    """One optimizer step of the phase's trained groups (``grads`` maps each to its
    gradient); ``changes`` replace other state fields (e.g. ``batch_stats``)."""
    phase = self.phases[phase_index]
    trained = {g: state.params[g] for g in phase.trains}
    updates, opt_state = phase.optimizer.update({g: grads[g] for g in phase.trains}, state.opt_state, trained)
    params = {**state.params, **optax.apply_updates(trained, updates)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, **changes)

  def load_start(self, state: TrainState, start: Start, variables: dict) -> TrainState:
    """``state`` with ``start.groups`` taken from a finished run's ``variables``
    (``{"params", "batch_stats"}`` of one network)."""
    params, batch_stats = dict(state.params), dict(state.batch_stats)
    for group in start.groups:
      what = f"run in {start.field}={start.workdir!r}"
      params[group] = merge_weights(params[group], variables["params"], what)
      batch_stats[group] = merge_weights(batch_stats.get(group, {}), variables.get("batch_stats", {}), what)
    return state.replace(params=params, batch_stats=batch_stats)

  def integer_model(self, state: TrainState, indices) -> export.IntegerModel:
    """Variants ``indices`` (which must share one model and its variables) as one
    integer model (:mod:`qflax.export`)."""
    nets = [self.network(state, k) for k in indices]
    net = nets[0]
    plans = {self.variants[k].name: n.plan.numpy() for k, n in zip(indices, nets)}
    spec = dataclasses.replace(net.model.spec, compute_dtype="float32")   # integer files have no compute dtype
    return export.integer_model(net.model.clone(spec=spec), jax.tree_util.tree_map(np.asarray, net.variables), plans,
                                model_name=net.model_settings.name, model_options=net.model_settings.options,
                                num_classes=self.task.num_classes, spec=spec, input_shape=self.task.input_shape)

  def exported_bytes(self, state: TrainState, index: int) -> int:
    """Size of variant ``index``'s integer model file alone (:func:`qflax.export.save`)."""
    return len(export.to_bytes(self.integer_model(state, [index])))


def apply_network(net: VariantNetwork, x: jax.Array) -> jax.Array:
  """The logits of ``net`` for ``x`` (inference mode)."""
  return net.model.apply(net.variables, x, net.plan, train=False)


def merge_weights(target, source, what: str = "pretrained run"):
  """``target`` with every weight, bias and BatchNorm entry taken from ``source``.

  Quantizer scalars (:func:`qflax.nn.quantizer_param`) stay as they are in ``target``
  (calibrate them from data). ``source`` entries broadcast over leading axes of
  ``target`` (stacked replicas), and a single BatchNorm slot fills every slot. A
  missing or mis-shaped entry raises ``ValueError``.
  """
  flat_source = traverse_util.flatten_dict(flax.core.unfreeze(source))
  merged = {}
  for path, value in traverse_util.flatten_dict(flax.core.unfreeze(target)).items():
    if qnn.quantizer_param(path):
      merged[path] = value
      continue
    if path not in flat_source:
      raise options.ConfigError(f"the {what} has no {'/'.join(path)}; it was trained with another model")
    src = np.asarray(flat_source[path])
    shape = tuple(value.shape)
    core = src.shape[1:] if src.ndim >= 2 and src.shape[0] == 1 and path[-1] in ("scale", "bias", "mean", "var") \
        else src.shape
    if len(shape) < len(core) or shape[len(shape) - len(core):] != tuple(core):
      raise options.ConfigError(f"the {what} has {'/'.join(path)} of shape {src.shape}; this model needs {shape} "
                                "(another model, or data with other classes or image shapes)")
    merged[path] = jnp.asarray(np.broadcast_to(src.reshape(core), shape), value.dtype)
  return traverse_util.unflatten_dict(merged)
