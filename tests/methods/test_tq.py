"""Transform quantization: factorisation, ELT, allocation, transform-domain inference, file."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qflax import models
from qflax import nn as qnn
from qflax.methods import tq
from qflax.methods.tq import allocation, codec
from qflax.methods.tq.transforms import kernel_matrix, matrix_kernel


def _spd(rng, n):
  a = rng.normal(size=(n, n))
  return a @ a.T + 0.1 * np.eye(n)


@pytest.mark.parametrize("shape", [(3, 3, 8, 16), (8, 5), (1, 1, 4, 6)])
@pytest.mark.parametrize("transform", ["identity", "klt", "elt"])
@pytest.mark.parametrize("mode", ["row", "column"])
def test_factorisation_reproduces_the_layer_exactly(shape, transform, mode):
  rng = np.random.default_rng(0)
  kernel = rng.normal(size=shape)
  rows = kernel_matrix(kernel, mode).shape[0]
  f = tq.factorise(kernel, transform, mode=mode, c_gg=_spd(rng, rows))
  np.testing.assert_allclose(f.S @ f.T, kernel_matrix(kernel, mode), atol=1e-10)
  np.testing.assert_allclose(matrix_kernel(f.S @ f.T, shape, mode), kernel, atol=1e-10)
  if transform == "klt":
    np.testing.assert_allclose(f.S.T @ f.S, np.eye(rows), atol=1e-10)     # orthonormal
    energy = np.sum(f.T ** 2, axis=1)
    assert np.all(np.diff(energy) <= 1e-9)                                # sorted by energy


def test_elt_satisfies_both_diagonalisation_conditions():
  rng = np.random.default_rng(1)
  w = rng.normal(size=(6, 20))
  c_ww, c_gg = w @ w.T, _spd(rng, 6)
  u, values = tq.elt_basis(c_ww, c_gg, eps=0.0)
  d = u.T @ c_ww @ u
  np.testing.assert_allclose(d, np.diag(np.diag(d)), atol=1e-8 * np.abs(d).max())
  np.testing.assert_allclose(np.diag(d), values, rtol=1e-8)
  np.testing.assert_allclose(u.T @ np.linalg.inv(c_gg) @ u, np.eye(6), atol=1e-8)
  assert np.all(np.diff(values) <= 0)


def test_allocation_meets_the_target_rate_within_one_block():
  rng = np.random.default_rng(2)
  sizes = rng.integers(50, 400, size=40).astype(np.float64)
  scale = rng.uniform(0.1, 10, size=40)
  distortion = scale[:, None] * 4.0 ** -np.arange(9)[None, :]        # about 6 dB per bit
  total = int(sizes.sum())
  points = allocation.lambda_sweep(distortion, sizes, total)
  rates = [p.rate for p in points]
  assert rates[0] == 8.0 and rates[-1] == 0.0 and all(a >= b for a, b in zip(rates, rates[1:]))
  for target in (0.7, 1.0, 2.0, 3.3):
    chosen = allocation.allocation_for_rate(points, target, distortion, sizes, total)
    assert target - sizes.max() / total <= chosen.rate <= target + 1e-12
    assert chosen.rate == pytest.approx(float(np.sum(chosen.rates * sizes)) / total)
  with pytest.raises(ValueError, match="bits per weight"):
    allocation.allocation_for_rate(points, -1.0, distortion, sizes, total)


def test_midtread_numpy_matches_the_library_quantizer():
  from qflax import quant
  t = np.random.default_rng(3).normal(size=100)
  for rate in (0, 1, 3, 8):
    np.testing.assert_allclose(allocation.midtread_numpy(t, rate, 0.3),
                               np.asarray(quant.midtread(jnp.asarray(t, jnp.float32), rate, 0.3)), atol=1e-6)
  assert allocation.entropy_bits(np.array([0, 0, 1, 1])) == 1.0


@pytest.fixture(scope="module")
def compressed():
  model = models.get_model("convnet", 4, models.QuantSpec(), widths=(4, 8, 8))
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(size=(32, 8, 8, 1)), jnp.float32)
  plan = qnn.uniform_plan(models.num_blocks(model), 32, (32,))
  variables = model.init(jax.random.key(0), x[:1], plan)
  logits_fn = lambda p, images: model.apply({**variables, "params": p}, images, plan)
  layers = tq.analyse(logits_fn, variables["params"], x, transform="klt", num_blocks=2)
  points = tq.frontier(layers)
  distortion, sizes = tq.compress.block_table(layers)
  total = tq.compress.total_weights(layers)
  chosen = allocation.allocation_for_rate(points, 3.0, distortion, sizes, total)
  rates = chosen.rates.copy()
  rates[2] = 0                          # prune one T block of the second layer
  return model, variables, plan, x, logits_fn, layers, tq.quantize_layers(layers, rates), chosen


def test_analysis_distortion_falls_with_rate(compressed):
  _, _, _, _, _, layers, _, chosen = compressed
  distortion, _ = tq.compress.block_table(layers)
  assert np.all(distortion[:, 8] <= distortion[:, 1] + 1e-12)
  assert chosen.rate <= 3.0


def test_transform_domain_network_equals_the_reconstructed_network(compressed):
  model, variables, plan, x, logits_fn, _, quantized, _ = compressed
  reconstructed = tq.reconstruct(variables["params"], quantized)
  expected = logits_fn(reconstructed, x)
  macs = {}
  with tq.transform_domain(quantized, macs):
    got = model.apply({**variables, "params": reconstructed}, x, plan)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
  assert set(macs) == {layer.path for layer in quantized}
  pruned = next(layer for layer in quantized if not tq.compress.kept_rows(layer).all())
  assert macs[pruned.path] > 0
  assert not np.allclose(expected, logits_fn(variables["params"], x))   # quantization changed the network


def test_compressed_file_round_trips_and_rejects_damage(compressed, tmp_path):
  model, variables, plan, x, logits_fn, _, quantized, _ = compressed
  others = {k: v for k, v in jax.tree_util.tree_map(np.asarray, variables).items() if k != "params"}
  path = str(tmp_path / "model.tq")
  size = codec.save(path, quantized, others)
  layers, restored = codec.load(path)
  for a, b in zip(quantized, layers):
    assert a.path == b.path and a.t_rates == b.t_rates
    np.testing.assert_array_equal(a.T, b.T)
    np.testing.assert_array_equal(a.S, b.S)
  jax.tree_util.tree_map(np.testing.assert_array_equal, others, restored)
  before = logits_fn(tq.reconstruct(variables["params"], quantized), x)
  after = logits_fn(tq.reconstruct(variables["params"], layers), x)
  np.testing.assert_array_equal(before, after)
  float_bytes = 4 * sum(int(np.prod(q.shape)) for q in quantized)
  assert size < float_bytes + 4 * sum(np.size(v) for v in jax.tree_util.tree_leaves(others)) + 4096

  data = open(path, "rb").read()
  for damaged, match in ((data[:-10], "truncated or altered"), (data[:40] + bytes([data[40] ^ 1]) + data[41:],
                                                                 "truncated or altered"),
                         (b"NOPE" + data[4:], "not a qflax")):
    (tmp_path / "bad.tq").write_bytes(damaged)
    with pytest.raises(codec.CompressedFileError, match=match):
      codec.load(str(tmp_path / "bad.tq"))
  with pytest.raises(codec.CompressedFileError, match="cannot read"):
    codec.load(str(tmp_path / "missing.tq"))


def test_elt_analysis_and_identity_bases_are_not_counted():
  model = models.get_model("convnet", 4, models.QuantSpec(), widths=(4, 8))
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(size=(16, 8, 8, 1)), jnp.float32)
  plan = qnn.uniform_plan(models.num_blocks(model), 32, (32,))
  variables = model.init(jax.random.key(0), x[:1], plan)
  logits_fn = lambda p, images: model.apply({**variables, "params": p}, images, plan)
  paths = tq.compress.kernel_paths(variables["params"])
  c_gg = tq.compress.gradient_covariances(logits_fn, variables["params"], x, jax.random.key(1), paths)
  for path in paths:
    c = c_gg[path]
    np.testing.assert_allclose(c, c.T, rtol=1e-10)
    assert np.linalg.eigvalsh(c).min() >= -1e-8 * np.abs(c).max()
  for transform in ("elt", "identity"):
    layers = tq.analyse(logits_fn, variables["params"], x, transform=transform, num_blocks=2)
    _, sizes = tq.compress.block_table(layers)
    weights = tq.compress.total_weights(layers)
    if transform == "identity":
      assert all(layer.s_choice is None for layer in layers) and sizes.sum() == weights
    else:
      assert sizes.sum() > weights        # the bases are counted
      # The classifier (more inputs than outputs) keeps S = I.
      assert layers[-1].s_choice is None and layers[1].s_choice is not None


def test_tq_through_the_loop_writes_files_that_evaluate_to_the_reported_accuracy(tiny_config, tmp_path):
  from qflax import data, train
  fp = tiny_config
  fp.method.name = "fp"
  fp.bits = (32,)
  fp.model.options = {"widths": (4, 8, 8), "head_type": "avg"}
  fp.num_epochs = 1
  train.train_and_evaluate(fp, str(tmp_path / "fp"))
  config = fp.copy_and_resolve_references()
  config.method = {"name": "tq", "bit_axis": "auto", "checkpoint": str(tmp_path / "fp"),
                   "transforms": ("identity", "klt"), "target_rates": (2.0,), "num_blocks": 2}
  config.quant.calibrate_batches = 1
  config.optimizer.learning_rate = 1e-3
  result = train.train_and_evaluate(config, str(tmp_path / "tq"))
  names = [v["name"] for v in result["variants"]]
  assert names == ["fp32", "identity@2", "klt@2"]
  assert list(result["phase_accuracy"]) == ["before_fine_tuning", "fine_tune"]
  for name in names[1:]:
    info = result["compressed"][name]
    assert 2.0 - 0.5 < info["rate"] <= 2.0 and info["entropy_rate"] <= info["rate"] + 1e-6
  assert (tmp_path / "tq" / "frontier.md").exists() and (tmp_path / "tq" / "frontier.svg").exists()

  # The file alone gives the reported accuracy.
  layers, others = codec.load(str(tmp_path / "tq" / "compressed" / "klt_2.tq"))
  model = models.get_model("convnet", 4, models.QuantSpec(), widths=(4, 8, 8), head_type="avg")
  plan = qnn.uniform_plan(models.num_blocks(model), 32, (32,))
  params = tq.reconstruct(others["params"], layers)
  ds = data.load_dataset("synthetic", synthetic=dict(config.dataset.synthetic))
  x = data.normalize(jnp.asarray(ds.test.images), ds.info.mean, ds.info.std)
  logits = model.apply({"params": params, "batch_stats": others["batch_stats"]}, x, plan)
  accuracy = float(np.mean(np.argmax(logits, -1) == ds.test.labels))
  assert accuracy == pytest.approx(result["variants"][2]["accuracy"], abs=1e-6)

  config.method.checkpoint = str(tmp_path / "nowhere")
  with pytest.raises(train.ConfigError, match="method.checkpoint"):
    train.validate(config)


def test_fine_tuning_decays_every_entry_of_s_and_t(tiny_config):
  from qflax.methods import TransformQuantization
  tiny_config.method = {"name": "tq", "bit_axis": "auto", "checkpoint": "unused"}
  tiny_config.optimizer.update(name="sgd", momentum=0.0, learning_rate=0.1, weight_decay=0.5, schedule="constant")
  tx = TransformQuantization(tiny_config, 4, 3)._optimizer(0)
  params = {"S": {"layer": jnp.ones((2, 2))}, "T": {"layer": jnp.full((2, 3), 2.0)}}
  updates, _ = tx.update(jax.tree_util.tree_map(jnp.zeros_like, params), tx.init(params), params)
  np.testing.assert_allclose(updates["S"]["layer"], -0.05)
  np.testing.assert_allclose(updates["T"]["layer"], -0.1)
