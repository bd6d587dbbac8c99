"""``launch.py`` as users run it: config file, overrides, errors, resumption."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import LAUNCHER_ENV

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--config.dataset.name=synthetic", "--config.model.options.widths=(4,8,8)",
        "--config.dataset.synthetic.num_train=64", "--config.dataset.synthetic.num_test=32",
        "--config.dataset.synthetic.image_size=8", "--config.dataset.synthetic.channels=1",
        "--config.num_epochs=1", "--config.batch_size=32", "--config.bits=(32,2)"]


# A user's bare environment, and the tests' compilation cache (launches of one tiny config compile once).
_ENV = {"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin", **LAUNCHER_ENV}


def _launch(*args):
  return subprocess.run([sys.executable, str(ROOT / "launch.py"), *args], capture_output=True, text=True,
                        timeout=600, cwd=ROOT, env=_ENV)


def test_launch_trains_with_overrides_and_resumes(tmp_path):
  workdir = tmp_path / "run"
  first = _launch("--config", str(ROOT / "configs" / "quickstart.py"), "--workdir", str(workdir), *TINY)
  assert first.returncode == 0, first.stderr
  results = json.loads((workdir / "results.json").read_text())
  assert [v["name"] for v in results["variants"]] == ["fp32", "w2a2"] and results["dataset"] == "synthetic"
  assert "step 2/2" in first.stderr and "results:" in first.stderr
  again = _launch("--config", str(ROOT / "configs" / "quickstart.py"), "--workdir", str(workdir), *TINY)
  assert again.returncode == 0 and "resuming at step 2" in again.stderr


def test_launch_reports_a_bad_field_and_exits_2(tmp_path):
  out = _launch("--workdir", str(tmp_path), *TINY[:-1], "--config.bits=(0,)")
  assert out.returncode == 2
  assert "error: config field bits=(0,) is invalid" in out.stderr
  assert not (tmp_path / "config.json").exists()


def _quick(*args):
  """launch.py on a tiny synthetic config: errors must come before any compute."""
  return _launch("--config", "quickstart", *TINY, *args)


def test_a_mistyped_field_on_the_command_line_is_one_line_with_a_suggestion(tmp_path):
  for typo, suggestion in (("--config.num_epoch=1", "num_epochs"), ("--config.optimizer.lr=0.01", "learning_rate")):
    out = _quick("--workdir", str(tmp_path), typo)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "did you mean" in lines[0] and suggestion in lines[0], out.stderr
  assert not (tmp_path / "config.json").exists()


def test_a_method_option_the_config_file_does_not_set_is_accepted_or_named(tmp_path):
  out = _quick("--workdir", str(tmp_path), "--config.method.teacher=fixed")      # quickstart is qat
  assert out.returncode == 2 and "method.teacher is unknown" in out.stderr and "Traceback" not in out.stderr
  out = _quick("--workdir", str(tmp_path / "aao"), "--config.method.name=aao", "--config.method.teacher=fixed",
               "--config.method.swap=False")
  assert out.returncode == 0, out.stderr
  assert json.loads((tmp_path / "aao" / "config.json").read_text())["method"]["teacher"] == "fixed"


def test_list_shows_methods_models_datasets_and_fields():
  out = _launch("--list")
  assert out.returncode == 0
  for text in ("methods:  fp, qat, aao", "resnet20", "imagenette", "aao_cifar100", "optimizer.learning_rate = 0.1",
               "method.aao:beta"):
    assert text in out.stdout, text


def test_phased_recipes_scale_their_phases_to_num_epochs(tmp_path):
  out = _launch("--config", "qkd_fashion_mnist", "--workdir", str(tmp_path), *TINY[:-1], "--config.bits=(2,)",
                "--config.num_epochs=4", "--config.method.teacher_options.widths=(4,8,8)", "--config.eval_batch_size=32")
  assert out.returncode == 0, out.stderr
  results = json.loads((tmp_path / "results.json").read_text())
  assert results["epochs"] == 4 and results["phases"] == ["teacher", "self_studying", "co_studying", "tutoring"]


def test_workdir_mistakes_are_one_line(tmp_path):
  (tmp_path / "file").write_text("")
  out = _quick("--workdir", str(tmp_path / "file"))
  assert out.returncode == 2 and "is a file" in out.stderr
  out = _launch("--mode=evaluate", "--workdir", str(tmp_path / "nothing"))
  assert out.returncode == 2 and "does not exist" in out.stderr and "Traceback" not in out.stderr


def test_evaluate_and_export_modes(tmp_path):
  workdir = tmp_path / "run"
  assert _quick("--workdir", str(workdir)).returncode == 0
  out = _launch("--mode=evaluate", "--workdir", str(workdir))
  assert out.returncode == 0, out.stderr
  assert "WARNING" not in out.stderr, out.stderr     # the checkpoints are opened read-only, quietly
  evaluation = json.loads((workdir / "evaluation.json").read_text())["accuracy"]
  results = json.loads((workdir / "results.json").read_text())
  assert evaluation == {v["name"]: v["accuracy"] for v in results["variants"]}
  out = _launch("--mode=export", "--workdir", str(workdir))
  assert out.returncode == 0, out.stderr
  assert (workdir / "export" / "model.stablehlo").exists() and (workdir / "export" / "fp32.qfx").exists()
  shutil.rmtree(workdir / "export")
  (workdir / "export").write_text("")     # reported: the error spoke of checkpoints being kept
  out = _launch("--mode=export", "--workdir", str(workdir))
  assert out.returncode == 2 and out.stderr.strip().splitlines() == [
      f"error: File exists ({workdir / 'export'})"], out.stderr


def test_bfloat16_from_the_command_line(tmp_path):
  out = _quick("--workdir", str(tmp_path / "bf16"), "--config.compute_dtype=bfloat16")
  assert out.returncode == 0, out.stderr
  assert json.loads((tmp_path / "bf16" / "config.json").read_text())["compute_dtype"] == "bfloat16"
  out = _quick("--workdir", str(tmp_path / "f16"), "--config.compute_dtype=float16")
  assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1 and "bfloat16" in out.stderr, out.stderr


def test_a_value_of_the_wrong_kind_names_the_kind_and_nan_gets_the_fields_own_check():
  """A NaN learning rate got ml_collections' "cannot be casted" message; it now reaches
  the field's check (which names the allowed values), and a wrong kind says what is expected."""
  import pytest

  from qflax import cli
  from qflax.train import config as config_lib

  for text in ("nan", "inf", "-inf"):
    config = config_lib.default_config()
    cli.apply_overrides(config, [("optimizer.learning_rate", text)])
    with pytest.raises(config_lib.ConfigError, match=r"optimizer.learning_rate=.* allowed: a finite number > 0"):
      config_lib.load(config)
  for path, text, match in (("optimizer.step_milestones", "(0.5, nan)", "a tuple of finite numbers"),
                            ("quant.act_param_init", "{'alpha': nan}", "a finite number > 0")):
    config = config_lib.default_config()
    cli.apply_overrides(config, [(path, text)])
    with pytest.raises(config_lib.ConfigError, match=match):
      config_lib.load(config)
  for path, text, expected in (("optimizer.learning_rate", "abc", "a number"), ("num_epochs", "abc", "an integer"),
                               ("quant.monitor", "yes", "True or False"), ("quant.act_param_init", "3", "a dict"),
                               ("optimizer.learning_rate", "True", "a number")):   # was taken as 1.0
    with pytest.raises(cli.UsageError, match=f"{path}={text} is invalid: {expected} is expected$"):
      cli.apply_overrides(config_lib.default_config(), [(path, text)])
  with pytest.raises(cli.UsageError, match="num_epochs is a value, not a section"):
    cli.apply_overrides(config_lib.default_config(), [("num_epochs.x", "1")])


def test_a_warm_up_as_long_as_the_run_is_refused(tmp_path):
  out = _quick("--workdir", str(tmp_path), "--config.optimizer.warmup_epochs=1")   # TINY: num_epochs=1
  assert out.returncode == 2 and "optimizer.warmup_epochs=1.0 is invalid" in out.stderr, out.stderr
  assert len(out.stderr.strip().splitlines()) == 1 and not (tmp_path / "config.json").exists()


def test_a_write_that_fails_on_disk_is_one_line_naming_its_checkpoint(tmp_path):
  """Reported defect: a full disk printed Orbax's tracebacks (about 300 lines) before the
  error, and the error named the next save's step, not the one whose write failed. A
  per-file size limit (20 KiB, set by the shell: no Python runs between fork and exec)
  makes every checkpoint write fail the way a full disk does; with SIGXFSZ ignored the
  write fails (EFBIG) instead of killing the process."""
  args = [sys.executable, str(ROOT / "launch.py"), "--config", "quickstart", *TINY, "--workdir", str(tmp_path),
          "--config.checkpoint_every_steps=1"]
  out = subprocess.run(["/bin/bash", "-c", 'trap "" XFSZ; ulimit -f 20; exec "$@"', "bash", *args],
                       capture_output=True, text=True, timeout=600, cwd=ROOT,
                       env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1"})
  assert out.returncode == 2, out.stderr
  assert "Traceback" not in out.stderr and "ERROR:absl" not in out.stderr, out.stderr
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith(f"error: could not write checkpoint {tmp_path}/checkpoints/1 (File too large)"), last


def test_tensorstore_callbacks_into_a_closed_loop_are_not_printed(monkeypatch, capsys):
  """After a failed write, TensorStore sometimes completes futures into the event loop
  Orbax has closed: dozens of "Event loop is closed" tracebacks (unraisable errors) came
  before the one-line error. Other unraisable errors are still printed."""
  import gc

  from qflax import cli

  class Raises:
    def __init__(self, error):
      self.error = error

    def __del__(self):
      raise self.error
  monkeypatch.setattr(sys, "unraisablehook", sys.__unraisablehook__)
  cli._quiet_failed_checkpoint_writes()
  Raises(RuntimeError("Event loop is closed"))
  Raises(RuntimeError("something else"))
  gc.collect()
  err = capsys.readouterr().err
  assert "Event loop is closed" not in err and "something else" in err, err


def test_unretrieved_errors_of_a_failed_checkpoint_write_are_not_printed(caplog):
  """Reported defect (CI): after the one-line error, asyncio logged "Task exception was never
  retrieved" with a traceback for each array of the failed write, when the write's tasks
  were collected. Other unretrieved errors, in Orbax or elsewhere, are still logged."""
  import asyncio
  import gc
  import logging

  from qflax import cli

  def unretrieved(source, message):
    """A collected future whose error, raised in ``source``, nobody awaited: what asyncio logs."""
    namespace = {}
    exec(compile(f"def write():\n  raise ValueError({message!r})\n", source, "exec"), namespace)
    loop = asyncio.new_event_loop()
    future = loop.create_future()
    try:
      namespace["write"]()
    except ValueError as e:
      future.set_exception(e)
    loop.close()
    del future
    gc.collect()
    logged = [r for r in caplog.records if r.name == "asyncio" and "never retrieved" in r.getMessage()]
    caplog.clear()
    return bool(logged)
  cli._quiet_failed_checkpoint_writes()
  orbax = os.path.join(os.sep, "venv", "orbax", "checkpoint", "_src", "serialization", "serialization.py")
  failed_write = 'OUT_OF_RANGE: Error writing "params.w/0.0" in OCDBT database: Failed writing: File too large'
  with caplog.at_level(logging.ERROR, logger="asyncio"):
    assert not unretrieved(orbax, failed_write)
    assert unretrieved(orbax, "INVALID_ARGUMENT: Error reading metadata")
    assert unretrieved(os.path.join(os.sep, "venv", "mylib", "io.py"), failed_write)


def test_a_failed_write_of_metrics_is_one_line(tmp_path, capsys):
  """A full disk can hit the metrics log before a checkpoint: that was a traceback (rc 1).
  ``/dev/full`` fails every write with ENOSPC."""
  from qflax import cli
  (tmp_path / "metrics.jsonl").symlink_to("/dev/full")
  assert cli.run(["--config", "quickstart", *TINY, "--workdir", str(tmp_path)]) == 2
  assert capsys.readouterr().err.strip().splitlines()[-1] == (
      f"error: No space left on device ({tmp_path}/metrics.jsonl); the checkpoints written so far are kept")


def _main(argv, capsys):
  """``launch.py`` in this process: ``(exit code, stderr)``."""
  import pytest

  from qflax import cli
  with pytest.raises(SystemExit) as exited:
    cli.main(argv)
  return exited.value.code, capsys.readouterr().err


_BROKEN_CONFIGS = {
    "name_error.py": ("def get_config():\n  return undefined_name\n", "could not be loaded: NameError"),
    "raises.py": ("def get_config():\n  raise ValueError('boom')\n", "could not be loaded: ValueError: boom"),
    "not_callable.py": ("get_config = 5\n", "could not be loaded: TypeError"),
    "returns_none.py": ("def get_config():\n  return None\n", "get_config() returned NoneType"),
    "returns_dict.py": ("def get_config():\n  return {}\n", "get_config() returned dict"),
    "no_suffix.txt": ("def get_config():\n  return undefined_name\n", "could not be loaded: NameError"),
}


def test_a_config_file_that_fails_is_one_line_naming_it(tmp_path, capsys):
  """Reported: only SyntaxError, AttributeError and ImportError were caught (others were tracebacks),
  and a file without the .py suffix was "not found"."""
  for name, (text, expected) in _BROKEN_CONFIGS.items():
    (tmp_path / name).write_text(text)
    code, err = _main(["--config", str(tmp_path / name), "--workdir", str(tmp_path / "run")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, (name, err)
    assert err.startswith(f"error: config file {tmp_path / name}") and expected in err, (name, err)
  assert not (tmp_path / "run").exists()


def test_what_a_mode_would_ignore_is_refused(tmp_path, capsys):
  """Reported: export ignored --config.* overrides, evaluate ignored --config, --list ignored
  overrides and an empty --workdir= fell back to runs/<config> (all exit code 0)."""
  for argv, expected in (
      (["--mode=export", "--workdir", str(tmp_path), "--config.num_epochs=-5"], "--mode=export takes no --config.*"),
      (["--mode=evaluate", "--workdir", str(tmp_path), "--config", "quickstart"], "leave out --config"),
      (["--mode=evaluate", "--workdir", str(tmp_path), "--config.num_epochs=2"], "only --config.dataset.*"),
      (["--list", "--config.bogus=1"], "--list takes no"),
      (["--workdir=", "--config", "quickstart"], "--workdir is empty"), (["--config="], "--config is empty")):
    code, err = _main(argv, capsys)
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, (argv, err)


def test_a_damaged_idx_file_is_one_line(tmp_path, capsys):
  """Reported: the IDX reader's own error (a truncated file here) came as a traceback with exit code 1."""
  import numpy as np

  from qflax import data
  for stem, n in (("train", 64), ("t10k", 32)):
    data.write_idx(tmp_path / f"{stem}-images-idx3-ubyte", np.zeros((n, 8, 8), np.uint8))
    data.write_idx(tmp_path / f"{stem}-labels-idx1-ubyte", np.arange(n, dtype=np.uint8) % 4)
  images = tmp_path / "train-images-idx3-ubyte"
  images.write_bytes(images.read_bytes()[:-100])
  code, err = _main(["--config", "quickstart", *TINY[1:], f"--config.dataset.name=idx:{tmp_path}",
                     "--workdir", str(tmp_path / "run")], capsys)
  assert code == 2 and err.startswith(f"error: {images}") and len(err.strip().splitlines()) == 1, err


def test_a_step_directory_beyond_the_run_is_refused_and_the_run_kept(tmp_path, capsys):
  """Reported: an empty ``checkpoints/99`` (not a checkpoint at all) was called a checkpoint
  "written by another config"."""
  argv = ["--config", "quickstart", *TINY, "--workdir", str(tmp_path)]
  assert _main(argv, capsys)[0] == 0
  (tmp_path / "checkpoints" / "99").mkdir()
  code, err = _main(argv, capsys)
  assert code == 2 and err.strip().splitlines()[-1] == (
      f"error: {tmp_path}/checkpoints/99 is beyond this run's 2 steps: a checkpoint of another config, or not a "
      "checkpoint at all; move it away or choose another --workdir"), err
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2", "99"]


def test_a_workdir_inside_a_file_is_refused_before_the_data_loads(tmp_path, capsys):
  """Reported: ``--workdir <file>/sub`` was "Not a directory ... the checkpoints written so far are
  kept", after the data had loaded."""
  (tmp_path / "file").write_text("")
  code, err = _main(["--config", "quickstart", *TINY, "--workdir", str(tmp_path / "file" / "sub")], capsys)
  assert code == 2 and err == f"error: --workdir {tmp_path / 'file' / 'sub'}: {tmp_path / 'file'} is a file, " \
                              "not a directory\n", err
