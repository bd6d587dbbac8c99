"""Per-parameter optimizer rules: kernels decay, PACT clips take PACT's L2, and weight and
activation quantizer scalars learn at their own rates."""

import dataclasses

import jax.numpy as jnp
import numpy as np

from qflax import options
from qflax.methods import optim


def _update(settings, params, grads):
  schedule = optim.learning_rate_schedule(settings, 10, 10)
  tx = optim.make_optimizer(settings, schedule)
  updates, _ = tx.update(grads, tx.init(params), params)
  return updates


PARAMS = {"conv": {"kernel": jnp.full((3,), 2.0), "input_alpha": jnp.full((2,), 8.0),
                   "kernel_centre": jnp.full((2,), 1.0), "input_centre": jnp.full((2,), 1.0)},
          "bn": {"scale": jnp.ones((2, 3))}}


def _settings(**kw):
  base = options.OptimizerSettings(name="sgd", learning_rate=0.1, momentum=0.0, schedule="constant",
                                   weight_decay=0.0)
  return dataclasses.replace(base, **kw)


def test_clip_weight_decay_shrinks_only_pact_clips():
  zeros = {g: {k: jnp.zeros_like(v) for k, v in p.items()} for g, p in PARAMS.items()}
  updates = _update(_settings(clip_weight_decay=0.01), PARAMS, zeros)
  np.testing.assert_allclose(updates["conv"]["input_alpha"], -0.1 * 0.01 * 8.0, rtol=1e-6)
  for name in ("kernel", "kernel_centre", "input_centre"):
    np.testing.assert_array_equal(updates["conv"][name], 0.0)
  # Without it (the old recipes), a clip that gets no gradient never moves.
  np.testing.assert_array_equal(_update(_settings(), PARAMS, zeros)["conv"]["input_alpha"], 0.0)


def test_weight_and_activation_quantizer_scalars_have_their_own_rates():
  ones = {g: {k: jnp.ones_like(v) for k, v in p.items()} for g, p in PARAMS.items()}
  updates = _update(_settings(quantizer_lr_multiplier=0.1, weight_quantizer_lr_multiplier=1e-3), PARAMS, ones)
  np.testing.assert_allclose(updates["conv"]["kernel"], -0.1, rtol=1e-6)
  np.testing.assert_allclose(updates["conv"]["input_centre"], -0.01, rtol=1e-6)
  np.testing.assert_allclose(updates["conv"]["kernel_centre"], -1e-4, rtol=1e-6)
  # weight_quantizer_lr_multiplier = 0 means "the same as quantizer_lr_multiplier".
  same = _update(_settings(quantizer_lr_multiplier=0.1), PARAMS, ones)
  np.testing.assert_allclose(same["conv"]["kernel_centre"], -0.01, rtol=1e-6)
