"""Integer form of quantized tensors and bit-packing of their codes."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from qflax.quant._src import bits as bits_lib


class IntegerTensor(NamedTuple):
  """Unsigned integer codes with an affine dequantization.

  ``dequantize(t) = (codes - zero_point) * scale``, with ``0 <= codes < 2**bits``.
  ``scale`` and ``zero_point`` broadcast against ``codes`` (per tensor or per
  output channel). ``zero_point`` may be a half-integer (DoReFa, SAT); it is
  exact in float32, so dequantization reproduces the fake-quantized tensor
  bit for bit.
  """
  codes: jax.Array
  scale: jax.Array
  zero_point: jax.Array
  bits: jax.Array


def dequantize(t: IntegerTensor) -> jax.Array:
  """``(codes - zero_point) * scale`` in float32."""
  return (t.codes.astype(jnp.float32) - t.zero_point) * t.scale


def pack_codes(codes, bits: int) -> np.ndarray:
  """Packs unsigned codes into bytes.

  For ``1 <= bits <= 4`` the codes are written as a little-endian bit stream, several
  per byte (``ceil(n * bits / 8)`` bytes); for 5..8 bits one code per byte;
  ``bits = 0`` (a mid-tread block with rate 0) takes no bytes.

  Example:
    >>> pack_codes(np.array([1, 2, 3, 0]), 2)   # -> array([57], dtype=uint8)
  """
  bits = bits_lib.check_integer_bits(bits, min_bits=0)
  codes = np.asarray(codes).reshape(-1).astype(np.int64)
  if codes.size and (codes.min() < 0 or codes.max() >= 1 << bits):
    raise ValueError(f"codes must lie in [0, {1 << bits}) for bits={bits}, "
                     f"got range [{codes.min()}, {codes.max()}]")
  if bits > 4:
    return codes.astype(np.uint8)
  if bits == 0:
    return np.zeros((0,), np.uint8)
  bitplanes = (codes[:, None] >> np.arange(bits)) & 1
  return np.packbits(bitplanes.astype(np.uint8).reshape(-1), bitorder="little")


def unpack_codes(packed, bits: int, count: int) -> np.ndarray:
  """Inverse of :func:`pack_codes`: the first ``count`` codes as ``int32``."""
  bits = bits_lib.check_integer_bits(bits, min_bits=0)
  if isinstance(packed, (bytes, bytearray, memoryview)):
    packed = np.frombuffer(packed, np.uint8)
  packed = np.asarray(packed, np.uint8).reshape(-1)
  if bits > 4:
    if packed.size < count:
      raise ValueError(f"packed data holds {packed.size} codes, expected {count}")
    return packed[:count].astype(np.int32)
  if bits == 0:
    return np.zeros((count,), np.int32)
  needed = -(-count * bits // 8)
  if packed.size < needed:
    raise ValueError(f"packed data has {packed.size} bytes, expected {needed} "
                     f"for {count} codes of {bits} bits")
  planes = np.unpackbits(packed, count=count * bits, bitorder="little")
  planes = planes.reshape(count, bits).astype(np.int32)
  return (planes << np.arange(bits, dtype=np.int32)).sum(axis=1).astype(np.int32)


def packed_size_bytes(num_codes: int, bits: int) -> int:
  """Bytes :func:`pack_codes` uses for ``num_codes`` codes."""
  return num_codes if bits > 4 else -(-num_codes * bits // 8)
