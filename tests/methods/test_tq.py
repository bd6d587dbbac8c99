"""Transform quantization: factorisation, ELT, allocation, transform-domain inference, file."""

from __future__ import annotations

import dataclasses

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

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
  plan = qnn.uniform_plan(model.num_blocks, 32, (32,))
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
  plan = qnn.uniform_plan(model.num_blocks, 32, (32,))
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


@pytest.fixture(scope="module")
def fp_run(tmp_path_factory):
  """A finished tiny fp run, and its config (the tq runs below start from it)."""
  from conftest import make_tiny_config
  from qflax import train
  fp = make_tiny_config()
  fp.method.name = "fp"
  fp.bits = (32,)
  fp.model.options = {"widths": (4, 8, 8), "head_type": "avg"}
  fp.num_epochs = 1
  workdir = tmp_path_factory.mktemp("fp")
  train.train_and_evaluate(fp, str(workdir))
  return fp, workdir


def _tq_config(fp_run, **method):
  fp, workdir = fp_run
  config = fp.copy_and_resolve_references()
  config.method = {"name": "tq", "bit_axis": "auto", "checkpoint": str(workdir), "target_rates": (2.0,),
                   "num_blocks": 2, **method}
  config.quant.calibrate_batches = 1
  config.optimizer.learning_rate = 1e-3
  return config


def _file_accuracy(config, path):
  """Test accuracy of the model decoded from the compressed file alone."""
  from qflax import data
  layers, others = codec.load(path)
  model = models.get_model("convnet", 4, models.QuantSpec(), widths=(4, 8, 8), head_type="avg")
  plan = qnn.uniform_plan(model.num_blocks, 32, (32,))
  params = tq.reconstruct(others["params"], layers)
  ds = data.load_dataset("synthetic", synthetic=dict(config.dataset.synthetic))
  x = data.normalize(jnp.asarray(ds.test.images), ds.info.mean, ds.info.std)
  logits = model.apply({"params": params, "batch_stats": others["batch_stats"]}, x, plan)
  return layers, float(np.mean(np.argmax(logits, -1) == ds.test.labels))


def _side_rate(layers):
  blocks = sum(len(layer.t_rates) + len(layer.s_rates) for layer in layers)
  return blocks * (4 + 32) / sum(int(np.prod(layer.shape)) for layer in layers)


def test_tq_through_the_loop_writes_files_that_evaluate_to_the_reported_accuracy(fp_run, tmp_path):
  from qflax import train
  config = _tq_config(fp_run, transforms=("identity", "klt"))
  result = train.train_and_evaluate(config, str(tmp_path / "tq"))
  names = [v["name"] for v in result["variants"]]
  assert names == ["fp32", "identity@2", "klt@2"]
  assert list(result["phase_accuracy"]) == ["before_fine_tuning", "fine_tuning"]
  for name in names[1:]:
    info = result["compressed"][name]
    assert 2.0 - 0.5 < info["rate"] <= 2.0 and info["entropy_rate"] <= info["rate"] + 1e-6
  assert (tmp_path / "tq" / "frontier.md").exists() and (tmp_path / "tq" / "frontier.svg").exists()
  assert "Side information" in (tmp_path / "tq" / "frontier.md").read_text()

  # The file alone gives the reported accuracy; its blocks give the reported side information.
  layers, accuracy = _file_accuracy(config, str(tmp_path / "tq" / "compressed" / "klt_2.tq"))
  assert accuracy == pytest.approx(result["variants"][2]["accuracy"], abs=1e-6)
  assert result["compressed"]["klt@2"]["side_rate"] == pytest.approx(_side_rate(layers))
  assert all(layer.mode == "row" for layer in layers)

  config.method.checkpoint = str(tmp_path / "nowhere")
  with pytest.raises(train.ConfigError, match="method.checkpoint"):
    train.validate(config)


def test_column_mode_and_fine_tuning_everything_through_the_loop(fp_run, tmp_path):
  from qflax import train
  config = _tq_config(fp_run, transforms=("klt",), mode="column", fine_tune="all")
  result = train.train_and_evaluate(config, str(tmp_path / "tq"))
  info = result["compressed"]["klt@2"]
  assert 2.0 - 0.5 < info["rate"] <= 2.0 and info["transform_domain_macs"] > 0
  layers, accuracy = _file_accuracy(config, str(tmp_path / "tq" / "compressed" / "klt_2.tq"))
  assert all(layer.mode == "column" for layer in layers) and any(layer.s_rates for layer in layers)
  assert accuracy == pytest.approx(result["variants"][1]["accuracy"], abs=1e-6)
  assert info["side_rate"] == pytest.approx(_side_rate(layers))


def test_fine_tuning_decays_every_entry_of_s_and_t(tiny_config):
  from qflax import methods
  tiny_config.method = {"name": "tq", "bit_axis": "auto", "checkpoint": "unused"}
  tiny_config.quant.calibrate_batches = 1
  tiny_config.optimizer.update(name="sgd", momentum=0.0, learning_rate=0.1, weight_decay=0.5, schedule="constant")
  method = methods.create(tiny_config, methods.Task(4, (8, 8, 1), 3))
  phase = method.phases[0]
  assert phase.trains == ("compressed",) and phase.evaluate_before
  params = {"compressed": {"S": {"layer": jnp.ones((2, 2))}, "T": {"layer": jnp.full((2, 3), 2.0)}}}
  updates, _ = phase.optimizer.update(jax.tree_util.tree_map(jnp.zeros_like, params), phase.optimizer.init(params),
                                      params)
  np.testing.assert_allclose(updates["compressed"]["S"]["layer"], -0.05)
  np.testing.assert_allclose(updates["compressed"]["T"]["layer"], -0.1)


def _fine_tune_method(fine_tune):
  from conftest import make_tiny_config
  from qflax import methods
  config = make_tiny_config()
  config.method = {"name": "tq", "bit_axis": "auto", "checkpoint": "unused", "transforms": ("identity",),
                   "target_rates": (4.0,), "num_blocks": 1, "distortion": "weight", "fine_tune": fine_tune}
  config.quant.calibrate_batches = 1
  return methods.create(config, methods.Task(4, (8, 8, 1), 3))


def _prepared(method, variables, x):
  """The loop's fresh state (start loaded from ``variables``, then prepared) without compiling the init."""
  shapes = jax.eval_shape(method.init_state, jax.random.key(0))
  state = method.load_start(jax.tree_util.tree_map(lambda a: np.zeros(a.shape, a.dtype), shapes),
                            method.options.starts[0], variables)
  return method.start_phase(method.prepare(state, [x]), 0)


def test_fine_tune_all_trains_biases_batchnorm_and_statistics_transforms_does_not(compressed):
  from batches import tiny_batch
  _, variables, _, x, _, _, _, _ = compressed
  x, y = x[:16], tiny_batch()[1]
  leaves = lambda tree: [np.asarray(a) for a in jax.tree_util.tree_leaves(tree)]
  changed = lambda a, b: any(not np.array_equal(u, v) for u, v in zip(leaves(a), leaves(b)))
  for mode in ("all", "transforms"):
    method = _fine_tune_method(mode)
    before = _prepared(method, variables, x)
    after, _ = jax.jit(method.train_step, static_argnums=4)(before, x, y, jax.random.key(1), 0)
    assert changed(before.params["compressed"]["T"], after.params["compressed"]["T"])
    assert not changed(before.params["model"], after.params["model"])           # fp32 stays the loaded model
    assert not changed(before.batch_stats["model"], after.batch_stats["model"])
    variant = lambda s: method.network(s, 1).variables
    others = lambda v: (v["params"]["classifier"]["bias"], v["params"]["stem_bn"], v["params"]["blocks_1"]["bn"])
    assert changed(others(variant(before)), others(variant(after))) == (mode == "all")
    assert changed(variant(before)["batch_stats"], variant(after)["batch_stats"]) == (mode == "all")
    assert ("others" in after.params["compressed"]) == (mode == "all")


def test_weight_error_allocation_differs_from_output_and_is_the_weight_mse(compressed):
  _, variables, _, x, logits_fn, _, _, by_output = compressed
  params = variables["params"]
  layers = tq.analyse(logits_fn, params, x, transform="klt", num_blocks=2, distortion="weight")
  distortion, sizes = tq.compress.block_table(layers)
  total = tq.compress.total_weights(layers)
  by_weight = allocation.allocation_for_rate(tq.frontier(layers), 3.0, distortion, sizes, total)
  assert not np.array_equal(by_weight.rates, by_output.rates)
  # One block's entries: ||S^ T^ - W||_F^2 / N with only that block quantized.
  f, (lo, hi) = layers[1].factorisation, layers[1].bounds[0]
  for rate in (1, 3):
    t, s = f.T.copy(), f.S.copy()
    t[lo:hi] = allocation.midtread_numpy(f.T[lo:hi], rate, layers[1].t_choice[0].steps[rate])
    s[:, lo:hi] = allocation.midtread_numpy(f.S[:, lo:hi], rate, layers[1].s_choice[0].steps[rate])
    w = f.S @ f.T
    assert layers[1].t_choice[0].distortion[rate] == pytest.approx(np.sum((f.S @ t - w) ** 2) / total)
    assert layers[1].s_choice[0].distortion[rate] == pytest.approx(np.sum((s @ f.T - w) ** 2) / total)
  # Without a basis the blocks add up exactly: the predicted distortion is the network's weight MSE.
  layers = tq.analyse(logits_fn, params, x, transform="identity", num_blocks=2, distortion="weight")
  distortion, sizes = tq.compress.block_table(layers)
  point = allocation.allocation_for_rate(tq.frontier(layers), 2.0, distortion, sizes, total)
  quantized = tq.quantize_layers(layers, point.rates)
  flat = {tuple(q.path): q for q in quantized}
  error = sum(np.sum((flat[l.path].S @ flat[l.path].T - l.factorisation.S @ l.factorisation.T) ** 2) for l in layers)
  assert point.distortion == pytest.approx(error / total, rel=1e-9)


def test_column_mode_transform_domain_equals_the_reconstructed_network(compressed):
  model, variables, plan, x, logits_fn, _, _, _ = compressed
  layers = tq.analyse(logits_fn, variables["params"], x, transform="klt", mode="column", num_blocks=2,
                      distortion="weight")
  assert all(layer.factorisation.mode == "column" and layer.s_choice is not None for layer in layers)
  distortion, sizes = tq.compress.block_table(layers)
  rates = allocation.allocation_for_rate(tq.frontier(layers), 3.0, distortion, sizes,
                                         tq.compress.total_weights(layers)).rates.copy()
  rates[2] = 0                          # prune one T block of the second layer
  quantized = tq.quantize_layers(layers, rates)
  reconstructed = tq.reconstruct(variables["params"], quantized)
  macs = {}
  with tq.transform_domain(quantized, macs):
    got = model.apply({**variables, "params": reconstructed}, x, plan)
  np.testing.assert_allclose(got, logits_fn(reconstructed, x), rtol=1e-4, atol=1e-5)
  assert set(macs) == {layer.path for layer in quantized}


def test_elt_regulariser_uses_the_frobenius_norm_by_default_or_the_spectral_norm():
  from qflax.methods.tq.method import TQOptions
  rng = np.random.default_rng(6)
  w = rng.normal(size=(6, 20))
  c_ww, c_gg, eps = w @ w.T, _spd(rng, 6), 0.3
  norms = {"frobenius": np.sqrt(np.sum(c_gg ** 2)), "spectral": np.linalg.eigvalsh(c_gg).max()}
  bases = {}
  for norm, value in norms.items():
    c = c_gg + eps * value * np.eye(6)
    np.testing.assert_allclose(tq.transforms.regularised(c_gg, eps, norm), c, rtol=1e-12)
    u, _ = tq.elt_basis(c_ww, c_gg, eps, norm)
    d = u.T @ c_ww @ u
    np.testing.assert_allclose(d, np.diag(np.diag(d)), atol=1e-8 * np.abs(d).max())
    np.testing.assert_allclose(u.T @ np.linalg.inv(c) @ u, np.eye(6), atol=1e-8)
    bases[norm] = u
  assert not np.allclose(np.abs(bases["frobenius"]), np.abs(bases["spectral"]), atol=1e-3)
  np.testing.assert_array_equal(tq.elt_basis(c_ww, c_gg, eps)[0], bases["frobenius"])
  assert {f.name: f.default for f in dataclasses.fields(TQOptions)}["eps_norm"] == "frobenius"


def _covariances_all_at_once(logits_fn, params, images, key, paths, mode):
  """The former estimate: every image's full gradient at once (vmap), then ``sum G G^T / N``."""
  v = jax.random.normal(key, (len(images), logits_fn(params, images[:1]).shape[-1]))
  grads = jax.vmap(lambda x, vi: jax.grad(lambda p: jnp.sum(logits_fn(p, x[None])[0] * vi))(params))(images, v)
  flat = traverse_util.flatten_dict(flax.core.unfreeze(grads))
  out = {}
  for path in paths:
    rows = np.stack([kernel_matrix(g, mode) for g in np.asarray(flat[path], np.float64)])
    out[path] = np.einsum("nij,nkj->ik", rows, rows) / len(images)
  return out


def test_gradient_covariances_accumulated_in_chunks_equal_all_at_once():
  from qflax.methods.tq.method import TQOptions
  from qflax.options import ConfigError
  model = models.get_model("convnet", 4, models.QuantSpec(), widths=(4, 8))
  x = jnp.asarray(np.random.default_rng(7).normal(size=(10, 8, 8, 1)), jnp.float32)
  plan = qnn.uniform_plan(model.num_blocks, 32, (32,))
  variables = model.init(jax.random.key(0), x[:1], plan)
  logits_fn = lambda p, images: model.apply({**variables, "params": p}, images, plan)
  params, paths = variables["params"], tq.compress.kernel_paths(variables["params"])
  for mode, chunk in (("row", 3), ("column", 16)):        # several padded chunks; one chunk, padded
    expected = _covariances_all_at_once(logits_fn, params, x, jax.random.key(1), paths, mode)
    got = tq.compress.gradient_covariances(logits_fn, params, x, jax.random.key(1), paths, mode=mode, chunk=chunk)
    for path in paths:
      np.testing.assert_allclose(got[path], expected[path], rtol=1e-6, atol=1e-9 * np.abs(expected[path]).max())
  from conftest import make_tiny_config
  config = make_tiny_config()
  config.method = {"name": "tq", "checkpoint": "unused"}
  config.quant.calibrate_batches = 1
  assert TQOptions.from_config(config).covariance_chunk == 8
  config.method.covariance_chunk = 0
  with pytest.raises(ConfigError, match="method.covariance_chunk"):
    TQOptions.from_config(config)
