"""fp / qat: dedicated replicas and calibration."""

import jax
import jax.numpy as jnp
import numpy as np

from batches import build
from qflax import train


def test_replicas_start_equal_and_calibration_sets_each_replicas_clip(tiny_config):
  tiny_config.bits = (8, 4)
  tiny_config.quant.act_param_init.alpha = 8.0
  method = build(tiny_config)
  x = jnp.asarray(np.abs(np.random.default_rng(0).normal(size=(32, 8, 8, 1))), jnp.float32)
  state = method.init_state(jax.random.key(0))
  kernel = state.params["model"]["blocks_0"]["conv"]["kernel"]
  np.testing.assert_array_equal(kernel[0], kernel[1])
  alpha = state.params["model"]["blocks_0"]["conv"]["input_alpha"]
  np.testing.assert_array_equal(alpha, 8.0)
  calibrated = method.prepare(state, [x[:16], x[16:]])
  new_alpha = np.asarray(calibrated.params["model"]["blocks_0"]["conv"]["input_alpha"])
  # replica k uses slot k; each got a data-driven clip, the unused slots kept 8.0
  assert new_alpha[0, 0] != 8.0 and new_alpha[1, 1] != 8.0
  assert new_alpha[0, 1] == 8.0 and new_alpha[1, 0] == 8.0


def test_calibration_runs_in_the_loop(tiny_config, tmp_path):
  tiny_config.quant.calibrate_batches = 2
  tiny_config.num_epochs = 1
  results = train.train_and_evaluate(tiny_config, str(tmp_path))
  assert len(results["variants"]) == 2
