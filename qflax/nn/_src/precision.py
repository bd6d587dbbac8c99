"""Precision plans: per-block bit-widths and slots, passed to models as data.

A plan is a pytree of ``int32`` arrays, so a jitted step called with another
plan (a new bit-width, a block-swap mask, a stochastic-precision draw) reuses
the compiled program. Plans are validated where they are built, while their
values are still concrete.
"""

from __future__ import annotations

import re
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qflax import quant
from qflax.quant._src.bits import _concrete


class BlockPrecision(NamedTuple):
  """The precision of one block: weight bits, activation bits, slot index."""
  w_bits: jax.Array
  a_bits: jax.Array
  slot: jax.Array


class PrecisionPlan(NamedTuple):
  """Per-block precision for a whole model; each field has shape ``(num_blocks,)``."""
  w_bits: jax.Array
  a_bits: jax.Array
  slot: jax.Array

  @property
  def num_blocks(self) -> int:
    return int(self.w_bits.shape[-1])

  def block(self, index: int) -> BlockPrecision:
    """The precision of block ``index`` (a static Python int)."""
    return BlockPrecision(self.w_bits[..., index], self.a_bits[..., index], self.slot[..., index])

  def numpy(self) -> "PrecisionPlan":
    """The plan with NumPy fields: layers that return integer codes need concrete bits."""
    return PrecisionPlan(*(np.asarray(a) for a in self))


def check_slot(slot, num_slots: int, name: str = "slot"):
  """Validates a concrete slot index against ``num_slots``; traced values pass."""
  concrete = _concrete(slot)
  if concrete is None:
    return jnp.asarray(slot, jnp.int32)
  if not np.issubdtype(concrete.dtype, np.integer) or np.any(concrete < 0) or np.any(concrete >= num_slots):
    raise ValueError(f"{name}={concrete.tolist()} is out of range: this layer has "
                     f"{num_slots} bit-width slot(s), allowed 0..{num_slots - 1}")
  return jnp.asarray(concrete, jnp.int32)


def check_bit_set(bit_set: Sequence[int], name: str = "bit_set") -> tuple[int, ...]:
  """Validates a static bit set (distinct bit-widths in 1..8 or 32)."""
  bit_set = tuple(bit_set)
  if not bit_set:
    raise ValueError(f"{name} must name at least one bit-width")
  for b in bit_set:
    if not isinstance(b, (int, np.integer)) or isinstance(b, bool) or not (1 <= b <= 8 or b == 32):
      raise ValueError(f"{name}={bit_set} holds {b!r}; allowed bit-widths: 1..8 and 32")
  if len(set(bit_set)) != len(bit_set):
    raise ValueError(f"{name}={bit_set} repeats a bit-width")
  return tuple(int(b) for b in bit_set)


def parse_precision(entry) -> tuple[int, int]:
  """``(w_bits, a_bits)`` of one precision entry: an integer ``b`` (``(b, b)``) or a
  string ``"w<W>a<A>"`` (``"w4a8"``: 4-bit weights, 8-bit activations; ``"fp32"``).

  Example:
    >>> parse_precision("w4a8"), parse_precision(2), parse_precision("fp32")
    ((4, 8), (2, 2), (32, 32))
  """
  if isinstance(entry, (int, np.integer)) and not isinstance(entry, bool):
    pair = (int(entry), int(entry))
  elif isinstance(entry, str) and entry.lower() == "fp32":
    pair = (32, 32)
  elif isinstance(entry, str) and (m := re.fullmatch(r"w(\d+)a(\d+)", entry.strip().lower())):
    pair = (int(m.group(1)), int(m.group(2)))
  else:
    raise ValueError(f"{entry!r} is not a bit-width; allowed: an integer in 1..8 or 32, or 'w<W>a<A>' such as 'w4a8'")
  for b in pair:
    if not (1 <= b <= 8 or b == 32):
      raise ValueError(f"{entry!r} holds bit-width {b}; allowed bit-widths: 1..8 and 32")
  return pair


def precision_name(w_bits: int, a_bits: int) -> str:
  """``"fp32"`` at full precision, else ``"w<W>a<A>"`` (the inverse of :func:`parse_precision`)."""
  return "fp32" if w_bits >= 32 and a_bits >= 32 else f"w{w_bits}a{a_bits}"


def block_plan(entries: Sequence, bit_set: Sequence[int]) -> PrecisionPlan:
  """A plan from one precision entry per block (:func:`parse_precision`); each block
  uses the slot of its weight bit-width in ``bit_set``.

  Example:
    >>> plan = block_plan([8, "w4a8", "w4a4"], bit_set=(8, 4))   # slots 0, 1, 1
  """
  bit_set = check_bit_set(bit_set)
  pairs = [parse_precision(e) for e in entries]
  missing = sorted({w for w, _ in pairs} - set(bit_set))
  if missing:
    raise ValueError(f"weight bit-widths {missing} are not in the model's bit set {bit_set}")
  return make_plan([w for w, _ in pairs], [a for _, a in pairs], [bit_set.index(w) for w, _ in pairs], len(bit_set))


def make_plan(w_bits: Sequence[int], a_bits: Sequence[int], slots: Sequence[int],
              num_slots: int) -> PrecisionPlan:
  """Builds a validated plan from per-block lists.

  Example:
    >>> plan = make_plan([32, 4, 4], [32, 4, 4], [0, 2, 2], num_slots=3)
  """
  w = quant.check_bits(np.asarray(w_bits), "w_bits")
  a = quant.check_bits(np.asarray(a_bits), "a_bits")
  s = check_slot(np.asarray(slots), num_slots, "slots")
  if not (w.shape == a.shape == s.shape) or w.ndim != 1:
    raise ValueError(f"w_bits, a_bits and slots must be 1-D of one length, got "
                     f"{w.shape}, {a.shape}, {s.shape}")
  return PrecisionPlan(w, a, s)


def uniform_plan(num_blocks: int, bits: int, bit_set: Sequence[int]) -> PrecisionPlan:
  """Every block at ``bits`` (weights and activations), slot ``bit_set.index(bits)``.

  Example:
    >>> plan = uniform_plan(9, 4, bit_set=(32, 8, 4, 2))    # slot 2 everywhere
  """
  bit_set = check_bit_set(bit_set)
  if bits not in bit_set:
    raise ValueError(f"bits={bits!r} is not in the model's bit set {bit_set}")
  slot = bit_set.index(bits)
  return make_plan([bits] * num_blocks, [bits] * num_blocks, [slot] * num_blocks, len(bit_set))


def mix_plans(mask: jax.Array, where_true: PrecisionPlan, where_false: PrecisionPlan) -> PrecisionPlan:
  """Per-block choice between two plans (``mask`` has shape ``(num_blocks,)``).

  This is plan surgery for block swapping: blocks where ``mask`` is true run at
  ``where_true``'s bits and slot.
  """
  return PrecisionPlan(*(jnp.where(mask, t, f) for t, f in zip(where_true, where_false)))
