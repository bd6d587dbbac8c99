"""Bad arguments raise one clear error naming the argument."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from qflax import quant

X = jnp.linspace(-2, 2, 16)
QUANTIZERS = {
    "dorefa_weight": lambda b: quant.dorefa_weight(X, b),
    "sat_weight": lambda b: quant.sat_weight(X, b),
    "clamp_activation": lambda b: quant.clamp_activation(X, b),
    "pact": lambda b: quant.pact(X, 2.0, b),
    "pact_adabits": lambda b: quant.pact(X, 2.0, b, gradient="adabits"),
    "sat_fp_normalized": lambda b: quant.sat_weight(X, b, normalize_full_precision=True),
    "uniform_unsigned": lambda b: quant.uniform_unsigned(X, b),
    "lsq": lambda b: quant.lsq(X, 0.1, b, signed=True),
    "qil": lambda b: quant.qil(X, 1.0, 0.5, b, signed=True),
    "hwgq": lambda b: quant.hwgq(X, b),
    "uniform_symmetric": lambda b: quant.uniform_symmetric(X, b, 0.1),
    "calibrate_symmetric": lambda b: quant.calibrate_symmetric(X, b),
    "integer": lambda b: quant.pact_integer(X, 2.0, b),
    "midtread_integer_step": lambda b: quant.lsq_integer(X, 0.1, b, signed=False),
}


@pytest.mark.parametrize("name", sorted(QUANTIZERS))
@pytest.mark.parametrize("bits", [0, 9, 16, 31, -1, 2.5, "4", True])
def test_bad_bits_are_rejected(name, bits):
  with pytest.raises(ValueError, match="bits"):
    QUANTIZERS[name](bits)


@pytest.mark.parametrize("bits", [9, 16, -1, 2.5])
def test_packing_rejects_bad_bits(bits):
  # 0 bits is allowed here: a mid-tread block with rate 0 packs to nothing.
  with pytest.raises(ValueError, match="bits"):
    quant.pack_codes(np.zeros(4, np.int32), bits)


@pytest.mark.parametrize("bits", [0, 9, -3])
def test_bad_bit_arrays_are_rejected(bits):
  with pytest.raises(ValueError, match=r"bits=\[4, "):
    quant.pact(X, 2.0, np.array([4, bits]))


def test_midtread_names_rate():
  with pytest.raises(ValueError, match="rate"):
    quant.midtread(X, 9, 0.1)
  quant.midtread(X, 0, 0.1)


def test_integer_form_rejects_full_precision_and_traced_bits():
  with pytest.raises(ValueError, match="full precision"):
    quant.pact_integer(X, 2.0, 32)
  with pytest.raises(ValueError, match="concrete"):
    import jax
    jax.jit(lambda b: quant.pact_integer(X, 2.0, b))(4)


def test_unknown_names():
  with pytest.raises(ValueError, match="allowed"):
    quant.get_quantizer("dorefaa", "weight")
  with pytest.raises(ValueError, match="role"):
    quant.get_quantizer("pact", "bias")
  with pytest.raises(ValueError, match="method"):
    quant.calibrate_symmetric(X, 4, method="minmax")
  with pytest.raises(ValueError, match="mode"):
    quant.hwgq(X, 2, mode="lloyd")
  with pytest.raises(ValueError, match="gradient"):
    quant.pact(X, 2.0, 4, gradient="lsq")


def test_codes_out_of_range_and_short_buffers():
  with pytest.raises(ValueError, match="codes"):
    quant.pack_codes(np.array([0, 4]), 2)
  with pytest.raises(ValueError, match="bytes"):
    quant.unpack_codes(np.zeros(1, np.uint8), 4, 10)


def test_degenerate_parameters_stay_finite():
  for y in (quant.pact(X, 0.0, 4), quant.pact(X, 0.0, 4, gradient="adabits"), quant.lsq(X, 0.0, 4, signed=True),
            quant.qil(X, 0.0, 0.0, 4, signed=False), quant.qil(X, -1.0, -1.0, 4, signed=True),
            quant.uniform_unsigned(-jnp.abs(X), 4),
            quant.sat_weight(jnp.zeros((2, 4)), 32, normalize_full_precision=True),
            quant.dorefa_weight(jnp.zeros(8), 2), quant.sat_weight(jnp.zeros((2, 4)), 2),
            quant.uniform_symmetric(jnp.zeros(8), 4, quant.calibrate_symmetric(jnp.zeros(8), 4))):
    assert np.all(np.isfinite(np.asarray(y)))
