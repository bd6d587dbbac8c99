"""The in-memory integer model: variants of one network over a shared pool of tensors."""

from __future__ import annotations

import math
from typing import Any, Mapping, NamedTuple, Union

import numpy as np

from qflax import models, quant


class ExportFileError(ValueError):
  """A file that is not a valid integer model: truncated, altered or forged.

  The message is one line and names the offending field, e.g.
  ``model.qfx: field tensors.t3.length: 1600000000 exceeds the payload (812 bytes)``.
  """


class PackedCodes(NamedTuple):
  """Unsigned integer codes ``0 <= c < 2**bits`` of one tensor, packed by :func:`qflax.quant.pack_codes`
  (``ceil(n bits / 8)`` bytes for ``bits <= 4``, one byte per code above).

  Example:
    >>> p = PackedCodes.pack(np.array([[1, 2], [3, 0]]), 2)
    >>> p.data.nbytes, p.unpack().tolist()
    (1, [[1, 2], [3, 0]])
  """
  data: np.ndarray           # uint8, 1-D
  shape: tuple[int, ...]
  bits: int

  @classmethod
  def pack(cls, codes, bits: int) -> "PackedCodes":
    codes = np.asarray(codes)
    return cls(quant.pack_codes(codes, bits), tuple(int(d) for d in codes.shape), int(bits))

  def unpack(self) -> np.ndarray:
    """The codes as ``int32`` of :attr:`shape`."""
    return quant.unpack_codes(self.data, self.bits, math.prod(self.shape)).reshape(self.shape)


Tensor = Union[np.ndarray, PackedCodes]   # np.ndarray: float32


class Activation(NamedTuple):
  """A layer's input quantizer in one variant: registry name, bits (32: full precision) and the
  scalars of the slot the variant uses (e.g. ``{"alpha": 2.5}`` for PACT)."""
  quantizer: str
  bits: int
  params: Mapping[str, float]


class LinearLayer(NamedTuple):
  """A :class:`qflax.nn.QuantConv` or :class:`qflax.nn.QuantDense` in one variant (tensor names).

  ``kernel`` names :class:`PackedCodes` (then ``scale`` and ``zero_point`` name float32 tensors
  broadcasting against it, and the kernel is ``(codes - zero_point) * scale``) or a float32
  tensor, the effective full-precision kernel (then both are ``None``).
  """
  kernel: str
  scale: str | None
  zero_point: str | None
  bias: str | None
  activation: Activation


class NormLayer(NamedTuple):
  """A :class:`qflax.nn.SwitchableBatchNorm`: the one slot a variant uses, stored unfolded
  (``y = (x - mean) / sqrt(var + eps) * scale + bias``) so the rebuilt forward is bit-exact."""
  scale: str
  bias: str
  mean: str
  var: str


Layer = Union[LinearLayer, NormLayer]


class Variant(NamedTuple):
  """One exported precision: its plan (per block; ``slots`` are the trained model's) and its
  layers by module path (``"blocks_0/conv"``), in call order."""
  w_bits: tuple[int, ...]
  a_bits: tuple[int, ...]
  slots: tuple[int, ...]
  layers: Mapping[str, Layer]


class IntegerModel(NamedTuple):
  """Everything needed to rebuild and run the exported variants of one network.

  ``tensors`` is a pool shared by all variants: a float array used by several variants
  (a full-precision stem, a classifier bias, int8 first/last codes) is stored once.
  ``model_options`` is JSON-shaped (lists, not tuples).
  """
  model_name: str
  model_options: Mapping[str, Any]
  num_classes: int
  spec: models.QuantSpec
  input_shape: tuple[int, ...]
  variants: Mapping[str, Variant]
  tensors: Mapping[str, Tensor]


def tensor_info(value: Tensor) -> tuple[str, tuple[int, ...]]:
  """``(dtype, shape)`` of a pool tensor: ``"float32"`` or ``"u<bits>"`` (packed codes)."""
  if isinstance(value, PackedCodes):
    return f"u{value.bits}", tuple(value.shape)
  return str(value.dtype), tuple(value.shape)


def tensor_nbytes(dtype: str, shape) -> int:
  """Stored bytes of a tensor: ``4 n`` for float32, :func:`qflax.quant.packed_size_bytes` for codes."""
  count = math.prod(shape)
  return 4 * count if dtype == "float32" else quant.packed_size_bytes(count, int(dtype[1:]))


class FieldError(ValueError):
  """An invalid field of an integer model; ``str(e)`` is ``"field <name>: <why>"`` on one line."""

  def __init__(self, field: str, why: str):
    self.field, self.why = field, why
    super().__init__(f"field {field}: {' '.join(str(why).split())}")


def short_repr(value, limit: int = 60) -> str:
  """``repr(value)`` cut to ``limit`` characters (for one-line error messages)."""
  text = repr(value)
  return text if len(text) <= limit else text[:limit - 3] + "..."
