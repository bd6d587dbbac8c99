"""After training: load, evaluate and export a run, and the StableHLO artifact in plain JAX."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from qflax import export, train
from qflax.train import saved

# Methods and the options that make each a tiny run (``tiny_config`` is qat on synthetic data).
METHODS = {
    "qat": {},
    "aao": {"bits": (8, 2)},
    "qkd": {"bits": (2,), "method": {"teacher_model": "convnet", "teacher_options": {"widths": (4, 8, 8)},
                                     "phase_epochs": (0, 1, 1)}, "quant": {"weight_quantizer": "qil",
                                                                            "act_quantizer": "qil"}},
    "cmtkd": {"bits": (2,), "method": {"teacher_bits": (4,), "warmup_epochs": 1},
              "quant": {"weight_quantizer": "uniform_layer", "act_quantizer": "hwgq"}},
    "progressive": {"bits": (2,), "method": {"joint_kd": "mutual"},
                    "quant": {"weight_quantizer": "dorefa", "act_quantizer": "clamp"}},
}


def _configure(config, name):
  settings = METHODS[name]
  config.method = {"name": name, "bit_axis": "auto", **settings.get("method", {})}
  config.bits = settings.get("bits", config.bits)
  config.quant.update(settings.get("quant", {}))
  config.num_devices = 1
  return config


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """One finished tiny run per method, and a tq run of an fp run."""
  from conftest import make_tiny_config
  root = tmp_path_factory.mktemp("runs")
  out = {}
  for name in METHODS:
    config = _configure(make_tiny_config(), name)
    out[name] = (str(root / name), train.train_and_evaluate(config, str(root / name)))
  fp = make_tiny_config()
  fp.method.name, fp.bits, fp.num_devices = "fp", (32,), 1
  fp.model.options.head_type = "avg"
  train.train_and_evaluate(fp, str(root / "fp"))
  tq = fp.copy_and_resolve_references()
  tq.method = {"name": "tq", "bit_axis": "auto", "checkpoint": str(root / "fp"), "transforms": ("klt",),
               "target_rates": (2.0,), "num_blocks": 2}
  tq.quant.calibrate_batches = 1
  tq.optimizer.learning_rate = 1e-3
  out["tq"] = (str(root / "tq"), train.train_and_evaluate(tq, str(root / "tq")))
  return out


@pytest.mark.parametrize("name", list(METHODS) + ["tq"])
def test_load_and_evaluate_reproduce_the_reported_accuracy(runs, name):
  workdir, results = runs[name]
  run = saved.load(workdir)
  assert [v.name for v in run.variants] == [v["name"] for v in results["variants"]]
  accuracies = saved.evaluate(run)
  assert accuracies == {v["name"]: v["accuracy"] for v in results["variants"]}


@pytest.mark.parametrize("change", [{"num_classes": 5}, {"image_size": 12}])
def test_evaluating_on_data_the_model_cannot_take_is_one_line(runs, change):
  """Reported defect: another dataset's shape was a Flax traceback, and 5-class data on a
  4-class model was evaluated without complaint."""
  run = saved.load(runs["qat"][0])
  dataset = train.load(run.config).loop.dataset
  dataset = dataclasses.replace(dataset, synthetic=dataclasses.replace(dataset.synthetic, **change))
  with pytest.raises(train.ConfigError, match=r"the run was trained on 4 classes of shape \(8, 8, 1\)"):
    saved.evaluate(run, dataset)


def test_model_bytes_is_the_integer_file_and_export_round_trips(runs, tmp_path):
  workdir, results = runs["aao"]
  run = saved.load(workdir)
  manifest = saved.export(run, str(tmp_path))
  assert manifest["files"] == {"switchable.qfx": {"variants": ["w8a8", "w2a2"],
                                                  "bytes": (tmp_path / "switchable.qfx").stat().st_size}}
  loaded = export.load(str(tmp_path / "switchable.qfx"))
  images = np.random.default_rng(0).integers(0, 256, (8, 8, 8, 1)).astype(np.uint8)
  for k, variant in enumerate(run.variants):
    model, variables, plan = export.rebuild(loaded, variant.name)
    x = (images / 255.0 - np.asarray(run.mean)) / np.asarray(run.std)
    np.testing.assert_allclose(model.apply(variables, x.astype(np.float32), plan), run.predict(images, k),
                               rtol=1e-5, atol=1e-5)
    single = run.method.integer_model(run.state, [k])
    assert results["variants"][k]["model_bytes"] == len(export.to_bytes(single))
  sizes = [v["model_bytes"] for v in results["variants"]]
  assert sizes[1] < sizes[0]                      # w2a2 packs four codes a byte


def test_the_stablehlo_artifact_runs_without_qflax_training_code(runs, tmp_path):
  workdir, _ = runs["qkd"]                        # students and teachers: a cond on the variant index
  run = saved.load(workdir)
  saved.export(run, str(tmp_path))
  images = np.random.default_rng(1).integers(0, 256, (5, 8, 8, 1)).astype(np.uint8)
  np.save(tmp_path / "images.npy", images)
  script = f"""
import sys, jax, numpy as np
from jax import export
exported = export.deserialize(open({str(tmp_path / 'model.stablehlo')!r}, 'rb').read())
images = np.load({str(tmp_path / 'images.npy')!r})
out = [np.asarray(exported.call(images, np.int32(k))) for k in range(-1, {len(run.variants)} + 1)]
np.save({str(tmp_path / 'out.npy')!r}, np.stack(out))
assert not any(m.startswith('qflax') for m in sys.modules), [m for m in sys.modules if m.startswith('qflax')]
"""
  subprocess.run([sys.executable, "-c", script], check=True, timeout=300, env={"JAX_PLATFORMS": "cpu",
                                                                               "PATH": "/usr/bin:/bin"})
  out = np.load(tmp_path / "out.npy")
  for k in range(len(run.variants)):
    np.testing.assert_allclose(out[k + 1], run.predict(images, k), rtol=1e-5, atol=1e-5)
  # Reported defect: an index past the variants returned some variant's logits.
  assert np.isnan(out[0]).all() and np.isnan(out[-1]).all()
  manifest = json.loads((tmp_path / "manifest.json").read_text())
  assert manifest["variants"] == [v.name for v in run.variants]
  # Reported: nothing let a user tell a damaged artifact (it loads and gives other logits) from a good one.
  assert manifest["stablehlo"]["sha256"] == hashlib.sha256((tmp_path / "model.stablehlo").read_bytes()).hexdigest()
  assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []   # no temporary file left


def test_predict_names_the_image_shape_it_takes(runs):
  """Reported defect: a wrong image shape was a Flax/lax traceback."""
  run = saved.load(runs["qat"][0])
  for shape in ((8, 8, 1), (2, 12, 12, 1), (2, 8, 8, 3)):
    with pytest.raises(ValueError, match=r"images of shape \(batch, 8, 8, 1\) expected .* got " + re.escape(str(shape))):
      run.predict(np.zeros(shape, np.uint8), 0)


def test_a_workdir_that_holds_no_run_is_refused(tmp_path):
  with pytest.raises(train.CheckpointError, match="not a qflax run"):
    saved.load(str(tmp_path))
  (tmp_path / "config.json").write_text("{not json")
  with pytest.raises(train.CheckpointError, match="not JSON"):
    saved.load(str(tmp_path))


def test_loading_a_run_that_may_still_be_training_changes_nothing_in_it(runs, tmp_path, capsys):
  """Reported defect: --mode=evaluate/export deleted the partial checkpoint a live run was writing
  (Orbax's tmp-directory clean-up) and moved damaged checkpoints away under it."""
  workdir = tmp_path / "run"
  shutil.copytree(runs["qat"][0], workdir)
  checkpoints = workdir / "checkpoints"
  latest = max(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
  (checkpoints / f"{latest + 1}.orbax-checkpoint-tmp-1234567" / "state").mkdir(parents=True)
  for root, _, files in os.walk(checkpoints / str(latest) / "state"):
    for name in files:
      (pathlib.Path(root) / name).write_bytes(b"\0garbage")
  before = sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*"))
  run = saved.load(str(workdir))
  assert run.step < latest
  assert f"checkpoint {checkpoints / str(latest)}" in capsys.readouterr().out
  assert sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*")) == before


@pytest.mark.parametrize("field,value,match", [
    ("num_classes", 0, "num_classes 0"), ("input_shape", [8, 8], r"input_shape \(8, 8\)"),
    ("mean", [], r"mean \(\) and std"), ("std", [0.0], "std > 0"), ("mean", ["nan"], r"mean \(nan,\)"),
    ("steps_per_epoch", 0, "steps_per_epoch 0")])
def test_a_task_json_with_impossible_values_is_refused(runs, tmp_path, field, value, match):
  """Reported: an edited task.json gave tracebacks, or (std 0, mean NaN) garbage accuracies with exit code 0."""
  workdir = tmp_path / "run"
  shutil.copytree(runs["qat"][0], workdir)
  task = json.loads((workdir / "task.json").read_text())
  (workdir / "task.json").write_text(json.dumps({**task, field: value}))
  with pytest.raises(train.CheckpointError, match=f"task.json is damaged \\(.*{match}"):
    saved.load(str(workdir))


def test_a_config_json_whose_method_is_not_a_section_is_refused(runs, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(runs["qat"][0], workdir)
  config = json.loads((workdir / "config.json").read_text())
  (workdir / "config.json").write_text(json.dumps({**config, "method": 5}))
  with pytest.raises(train.ConfigError, match="method.name is missing"):
    saved.load(str(workdir))


def test_the_python_api_refuses_what_it_would_misread(runs):
  """Reported: checkpoint="bogus" loaded the latest, True was variant 1, NaN images gave NaN logits and
  an empty batch raised ZeroDivisionError; None as the workdir was a TypeError from os.path; float
  or integer images off the documented [0, 255] scale (e.g. already normalised) and bool images gave
  confident wrong logits."""
  with pytest.raises(TypeError, match="workdir must be a path to a run's directory, got None"):
    saved.load(None)
  with pytest.raises(ValueError, match="checkpoint='bogus'"):
    saved.load(runs["qat"][0], checkpoint="bogus")
  run = saved.load(runs["qat"][0])
  with pytest.raises(ValueError, match="variant True is not in this run"):
    run.predict(np.zeros((2, 8, 8, 1), np.uint8), True)
  with pytest.raises(ValueError, match="NaN"):
    run.predict(np.full((2, 8, 8, 1), np.nan, np.float32), 0)
  with pytest.raises(ValueError, match=r"from -1.5 to 0.0; expected pixel values in \[0, 255\]"):
    run.predict(np.concatenate([np.full((1, 8, 8, 1), -1.5), np.zeros((1, 8, 8, 1))]).astype(np.float32), 0)
  with pytest.raises(ValueError, match="NaN or infinite"):
    run.predict(np.full((2, 8, 8, 1), np.inf, np.float32), 0)
  for out_of_scale in (np.full((2, 8, 8, 1), 1000, np.int32), np.full((2, 8, 8, 1), -1, np.int8)):
    with pytest.raises(ValueError, match="expected pixel values in"):
      run.predict(out_of_scale, 0)
  for not_numbers in (np.ones((2, 8, 8, 1), bool), np.ones((2, 8, 8, 1), np.complex64)):
    with pytest.raises(TypeError, match=f"images of dtype {not_numbers.dtype}"):
      run.predict(not_numbers, 0)
  floats = np.linspace(0, 255, 2 * 8 * 8, dtype=np.float32).reshape(2, 8, 8, 1)
  assert np.isfinite(run.predict(floats, 0)).all()       # the whole documented range is accepted
  np.testing.assert_allclose(run.predict(floats.astype(np.int32), 0), run.predict(floats.astype(np.uint8), 0))
  assert run.predict(np.zeros((0, 8, 8, 1), np.uint8), 0).shape == (0, run.method.task.num_classes)
  assert run.predict(np.zeros((2, 8, 8, 1), np.uint8), np.int64(1)).shape == (2, run.method.task.num_classes)
