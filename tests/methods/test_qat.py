"""fp / qat: dedicated replicas and calibration."""

import jax
import jax.numpy as jnp
import numpy as np

import pytest

from batches import build, tiny_batch
from qflax import nn as qnn
from qflax import options, train
from qflax.methods.base import apply_network


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


def test_mixed_precision_entries_and_per_block_plans_from_the_config(tiny_config, tmp_path):
  """``bits`` entries such as ``"w4a8"`` and a per-block plan (a list, or a JSON file)
  become variants whose blocks run at those weight and activation bit-widths."""
  plan_file = tmp_path / "plan.json"
  plan_file.write_text('[8, "w4a8", "w2a4"]')
  tiny_config.bits = (32, "w4a8", str(plan_file))
  method = build(tiny_config)
  assert [(v.name, v.w_bits, v.a_bits) for v in method.variants] == [("fp32", 32, 32), ("w4a8", 4, 8),
                                                                    ("plan0", 2, 4)]
  np.testing.assert_array_equal(method.plans.w_bits, [[32] * 3, [4] * 3, [8, 4, 2]])
  np.testing.assert_array_equal(method.plans.a_bits, [[32] * 3, [8] * 3, [8, 8, 4]])
  # Each block's slot is its weight bit-width's: the w4a8 replica and the plan's 4-bit block share slot 2.
  np.testing.assert_array_equal(method.plans.slot, [[0] * 3, [2] * 3, [1, 2, 3]])

  # The w4a8 variant quantizes activations at 8 bits: its logits differ from w4a4's.
  state = method.init_state(jax.random.key(0))
  x, _ = tiny_batch()
  w4a8 = method.eval_logits(state, x, 1)
  w4a4 = apply_network(method.network(state, 1)._replace(plan=qnn.uniform_plan(3, 4, (32, 8, 4, 2))), x)
  assert not np.allclose(w4a8, w4a4)

  results = train.train_and_evaluate(tiny_config, str(tmp_path / "run"))
  assert [(v["name"], v["w_bits"], v["a_bits"]) for v in results["variants"]] == [
      ("fp32", 32, 32), ("w4a8", 4, 8), ("plan0", 2, 4)]
  assert "W4A8" in (tmp_path / "run" / "results.md").read_text()


@pytest.mark.parametrize("bits, match", [
    ((32, (4, 4)), "per-block plan of 3 entries"),
    ((32, "w4a9"), "bit-width 9"),
    ((32, "plan_missing.json"), "cannot be read"),
])
def test_bad_mixed_precision_entries_are_named(tiny_config, bits, match):
  tiny_config.bits = bits
  with pytest.raises(options.ConfigError, match=match):
    build(tiny_config)


def test_methods_without_mixed_precision_refuse_it(tiny_config):
  tiny_config.method.name = "aao"
  tiny_config.bits = (32, "w4a8")
  with pytest.raises(options.ConfigError, match="integer bit-widths for this method"):
    build(tiny_config)


def test_a_start_run_trained_on_other_data_is_a_config_error():
  """Reported: a pretrained run with another class count was a ValueError traceback (exit code 1)."""
  from qflax.methods.base import merge_weights
  target = {"classifier": {"kernel": jnp.zeros((8, 5)), "bias": jnp.zeros(5)}}
  source = {"classifier": {"kernel": np.zeros((8, 4)), "bias": np.zeros(4)}}
  with pytest.raises(options.ConfigError, match=r"classifier/kernel of shape \(8, 4\); this model needs \(8, 5\)"):
    merge_weights(target, source, "run in method.pretrained_checkpoint='fp1'")
  with pytest.raises(options.ConfigError, match="has no classifier/bias"):
    merge_weights(target, {"classifier": {"kernel": np.zeros((8, 5))}})
