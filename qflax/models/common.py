"""What every model shares: quantization settings, segment-wise execution, counts."""

from __future__ import annotations

import dataclasses

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from qflax import nn as qnn

FIRST_LAST = ("fp", "int8")
FULL_PRECISION = qnn.BlockPrecision(32, 32, 0)
FIXED_INT8 = qnn.BlockPrecision(8, 8, 0)


@dataclasses.dataclass(frozen=True)
class QuantSpec:
  """How a model's quantized layers are built.

  Attributes:
    bit_set: static bit-widths; one BatchNorm / quantizer-parameter slot each.
    weight_quantizer: weight quantizer name for block convolutions.
    act_quantizer: quantizer for non-negative inputs (after a ReLU).
    signed_act_quantizer: quantizer for inputs that can be negative
      (MobileNetV2 block inputs after the linear bottleneck).
    act_param_init: initial activation-quantizer scalars, e.g. ``(("alpha", 8.0),)``.
    first_last: ``"fp"`` (full precision) or ``"int8"`` (fixed 8-bit) for the
      first convolution and the classifier.
    compute_dtype: ``"float32"`` or ``"bfloat16"``: the dtype of the convolutions and
      of the activations between layers. Parameters and BatchNorm statistics are
      float32 either way, quantization and normalisation run in float32, and the
      classifier runs in float32, so logits (and the features ``run_blocks`` returns
      for losses) are float32.
  """
  bit_set: tuple[int, ...] = (32,)
  weight_quantizer: str = "none"
  act_quantizer: str = "none"
  signed_act_quantizer: str = "none"
  act_param_init: tuple[tuple[str, float], ...] = ()
  first_last: str = "fp"
  compute_dtype: str = "float32"

  def __post_init__(self):
    qnn.check_bit_set(self.bit_set)
    if self.first_last not in FIRST_LAST:
      raise ValueError(f"first_last={self.first_last!r} is unknown; allowed: {FIRST_LAST}")
    if self.compute_dtype not in qnn.COMPUTE_DTYPES:
      raise ValueError(f"compute_dtype={self.compute_dtype!r} is unknown; allowed: {qnn.COMPUTE_DTYPES}")

  @property
  def num_slots(self) -> int:
    return len(self.bit_set)

  def conv(self, features, kernel_size=(3, 3), strides=1, padding="SAME", *, signed_input=False,
           groups=1, name=None) -> qnn.QuantConv:
    return qnn.QuantConv(
        features, kernel_size, strides, padding, feature_group_count=groups,
        weight_quantizer=self.weight_quantizer,
        act_quantizer=self.signed_act_quantizer if signed_input else self.act_quantizer,
        bit_set=self.bit_set, act_param_init=dict(self.act_param_init) or None, dtype=self.compute_dtype, name=name)

  def bn(self, name=None) -> qnn.SwitchableBatchNorm:
    return qnn.SwitchableBatchNorm(self.num_slots, name=name)

  def fixed_layer_settings(self, role: str = "stem"):
    """``(layer kwargs, precision)`` for the first conv (``role="stem"``) or the classifier.

    At ``int8`` the stem's input (normalised images) is signed, while the classifier's
    (pooled ReLU features) is non-negative, so it takes the unsigned quantizer: all 256
    codes on ``[0, max]`` instead of 128 of a signed grid. The stem computes in
    ``compute_dtype``; the classifier (a small dense layer) always in float32, so
    the logits reach the losses in float32.
    """
    dtype = "float32" if role == "classifier" else self.compute_dtype
    if self.first_last == "int8":
      act = "uniform_unsigned" if role == "classifier" else "uniform"
      return dict(weight_quantizer="uniform", act_quantizer=act, bit_set=(8,), dtype=dtype), FIXED_INT8
    return dict(weight_quantizer="none", act_quantizer="none", bit_set=(32,), dtype=dtype), FULL_PRECISION


class Network(nn.Module):
  """A stem, an ordered list of blocks, a head, run whole or segment by segment.

  Subclasses define ``setup`` (with ``self.blocks``), ``stem(x, train)`` and
  ``head(h, plan, train)``. ``__call__`` is exactly
  ``head(run_blocks(stem(x), plan, 0, num_blocks))``, so features from one
  network can enter another between any two blocks:

    >>> h = model.apply(v, x, train=False, method=model.stem)
    >>> h = model.apply(v, h, plan, 0, 3, train=False, method=model.run_blocks)
    >>> logits = model.apply(v, h, plan, train=False, method=model.head)
  """

  def block_layout(self) -> tuple[tuple[int, int], ...]:
    """Per block, ``(output channels, stride)`` (pooling counts as a stride), from the
    module's fields alone, so it is known before ``init``."""
    raise NotImplementedError

  @property
  def num_blocks(self) -> int:
    """Length of the precision plan the model takes."""
    return len(self.block_layout())

  @property
  def stage_ends(self) -> tuple[int, ...]:
    """Block counts after which a stage (a run of blocks with one output shape) ends,
    all but the last stage's: the default fusion and hint points of the KD methods."""
    layout = self.block_layout()
    return tuple(i for i in range(1, len(layout))
                 if layout[i][0] != layout[i - 1][0] or layout[i][1] != 1)

  def check_plan(self, plan: qnn.PrecisionPlan):
    if plan.num_blocks != len(self.blocks):
      raise ValueError(f"precision plan has {plan.num_blocks} blocks; {type(self).__name__} "
                       f"has {len(self.blocks)}")

  def run_blocks(self, h, plan: qnn.PrecisionPlan, start: int, end: int, train: bool = False,
                 return_features: bool = False):
    """Blocks ``start..end-1``; with ``return_features`` also each block's output (in
    float32, for the losses; ``h`` stays in the compute dtype)."""
    self.check_plan(plan)
    features = []
    for i in range(start, end):
      h = self.blocks[i](h, plan.block(i), train)
      features.append(h.astype(jnp.float32))
    return (h, features) if return_features else h

  def __call__(self, x, plan: qnn.PrecisionPlan, train: bool = False, return_features: bool = False):
    h, features = self.run_blocks(self.stem(x, train), plan, 0, len(self.blocks), train, True)
    logits = self.head(h, plan, train).astype(jnp.float32)
    return (logits, features) if return_features else logits


def count_params(params) -> int:
  """Parameters of one precision: weights, biases, one BatchNorm slot.

  Stacked per-bit-width BatchNorm parameters count once; quantizer scalars
  (:func:`qflax.nn.quantizer_param`) are not counted.
  """
  total = 0
  for path, value in traverse_util.flatten_dict(flax.core.unfreeze(params)).items():
    name = path[-1]
    if qnn.quantizer_param(path):
      continue
    if name in ("scale", "bias") and value.ndim == 2:   # SwitchableBatchNorm (slots, C)
      total += value.shape[1]
    else:
      total += int(np.prod(value.shape))
  return total


def macs_by_layer(model: Network, variables, x, plan) -> dict:
  """The ``qnn.FLOPS`` collection: each convolution's and dense layer's multiply-accumulates
  per example (``{..layer path..: {"macs": (int,)}}``, as sown). Shapes alone decide them, so
  the model runs abstractly (``jax.eval_shape``): nothing is computed or compiled."""
  sown = {}

  def run(variables):
    _, state = model.apply(variables, x[:1], plan, train=False, mutable=[qnn.FLOPS])
    sown.update(flax.core.unfreeze(state[qnn.FLOPS]))   # Python ints, concrete while tracing

  jax.eval_shape(run, variables)
  return sown


def count_macs(model: Network, variables, x, plan) -> int:
  """Multiply-accumulates per example of the convolutions and dense layers."""
  return int(sum(jax.tree_util.tree_leaves(macs_by_layer(model, variables, x, plan))))


def positive_int(name: str, value) -> int:
  """Checks a model option that must be a positive integer (a builder's argument)."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name}={value!r} must be a positive integer")
  return int(value)


def positive_number(name: str, value) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not np.isfinite(value) or value <= 0:
    raise ValueError(f"{name}={value!r} must be a finite number > 0")
  return float(value)


def global_avg_pool(h):
  """Mean over the spatial axes, in float32."""
  return jnp.mean(h.astype(jnp.float32), axis=(1, 2))
