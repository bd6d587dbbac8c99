"""metrics.jsonl + TensorBoard (tensorboardX, read back by TensorBoard itself) and the console progress line."""

from __future__ import annotations

import io
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from conftest import tensorboard_events

from qflax.train import metrics as metrics_lib

pytest.importorskip("tensorboard")
pytest.importorskip("tensorboardX")

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _jsonl(workdir):
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_scalars_histograms_text_and_hparams_read_back_by_tensorboard(tmp_path):
  log = metrics_lib.MetricsLog(str(tmp_path))
  for step in (1, 2, 3):
    log.write(step, "train", {"loss": 1.0 / step, "accuracy": 0.25 * step}, epoch=0)
  log.histograms(3, {"params/kernel": np.arange(12.0).reshape(3, 4), "params/nan": [np.nan, 1.0, 2.0]})
  log.text("config", "lr **0.1**")
  log.hparams({"method": "qat", "lr": 0.1, "bits": (32, 4), "remat": False}, {"hparams/accuracy": 0.9}, step=3)
  log.close()
  assert [r["step"] for r in _jsonl(tmp_path)] == [1, 2, 3] and _jsonl(tmp_path)[0]["epoch"] == 0
  assert os.listdir(tmp_path / "tensorboard") and all(
      os.path.isfile(tmp_path / "tensorboard" / n) for n in os.listdir(tmp_path / "tensorboard"))
  acc = tensorboard_events(tmp_path / "tensorboard")
  assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
  assert acc.Scalars("hparams/accuracy")[0].value == pytest.approx(0.9)
  histogram = acc.Histograms("params/kernel")[0]
  assert histogram.step == 3 and histogram.histogram_value.num == 12 and histogram.histogram_value.max == 11.0
  assert acc.Histograms("params/nan")[0].histogram_value.num == 2   # the NaN is left out
  text = acc.Tensors("config/text_summary")[0]
  assert b"lr **0.1**" in text.tensor_proto.string_val[0]
  hparams_tags = acc.PluginTagToContent("hparams")
  assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(hparams_tags)


def test_resume_step_drops_later_rows_in_jsonl_and_tensorboard(tmp_path):
  killed = metrics_lib.MetricsLog(str(tmp_path))
  for step in range(1, 7):
    killed.write(step, "train", {"loss": float(step)})
  killed.write(4, "eval", {"accuracy": 0.5})
  killed.close()
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 7, "spl')   # torn by the kill
  resumed = metrics_lib.MetricsLog(str(tmp_path), resume_step=4)   # the last checkpoint was at step 4
  assert resumed.dropped == 3
  assert [(r["step"], r["split"]) for r in _jsonl(tmp_path)] == [(1, "train"), (2, "train"), (3, "train"),
                                                                 (4, "train"), (4, "eval")]
  for step in range(5, 8):
    resumed.write(step, "train", {"loss": 10.0 * step})
  resumed.close()
  assert [r["step"] for r in _jsonl(tmp_path) if r["split"] == "train"] == list(range(1, 8))
  assert len(os.listdir(tmp_path / "tensorboard")) == 2   # the killed run's file is kept, not overwritten
  expected = [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 50.0), (6, 60.0), (7, 70.0)]
  assert [(e.step, e.value) for e in tensorboard_events(tmp_path / "tensorboard").Scalars("train/loss")] == expected


def test_resume_without_a_log_and_without_later_rows(tmp_path):
  metrics_lib.MetricsLog(str(tmp_path), resume_step=0).close()
  assert (tmp_path / "metrics.jsonl").read_text() == ""
  log = metrics_lib.MetricsLog(str(tmp_path))
  log.write(1, "train", {"loss": 1.0})
  log.close()
  before = (tmp_path / "metrics.jsonl").stat().st_mtime_ns
  assert metrics_lib.MetricsLog(str(tmp_path), resume_step=1).dropped == 0
  assert (tmp_path / "metrics.jsonl").stat().st_mtime_ns == before   # nothing to drop: not rewritten


_FILL_THE_EVENT_FILE = """
import sys
from qflax.train.metrics import MetricsLog
log = MetricsLog(sys.argv[1])
log.write(1, "train", {"loss": 1.0})
try:
  log.text("config", "x" * 100_000)
except OSError as e:
  print(e)
log.close()
"""


def test_a_failed_tensorboard_write_is_raised_in_the_caller_naming_its_file(tmp_path):
  """tensorboardX's writer thread and its atexit flush printed tracebacks after the run had stopped, and
  the error named no file. A per-file size limit (20 KiB) that the event file exceeds and metrics.jsonl
  does not stands in for a full disk."""
  out = subprocess.run(["/bin/bash", "-c", 'trap "" XFSZ; ulimit -f 20; exec "$@"', "bash",
                        sys.executable, "-c", _FILL_THE_EVENT_FILE, str(tmp_path)],
                       capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
  assert out.returncode == 0 and "Traceback" not in out.stderr and "Exception" not in out.stderr, out.stderr
  (event_file,) = os.listdir(tmp_path / "tensorboard")
  assert out.stdout.strip() == f"[Errno 27] File too large: '{tmp_path / 'tensorboard' / event_file}'"
  assert [r["step"] for r in _jsonl(tmp_path)] == [1]

class _FakeTty(io.StringIO):
  def isatty(self):
    return True


def _update(progress, step, **kw):
  args = dict(phase="fine_tune_after_warmup", epoch=9, epochs=200, loss=1.23456, accuracy=0.5,
              images_per_second=12345.0, steps_per_second=10.0)
  progress.update(step, **{**args, **kw})


def _drawn(stream):
  return [line for line in stream.getvalue().split("\r") if line]


@pytest.mark.parametrize("columns", [80, 40, 200])
def test_progress_fits_the_terminal_width(monkeypatch, columns):
  monkeypatch.setenv("COLUMNS", str(columns))
  stream = _FakeTty()
  progress = metrics_lib.Progress(200000, stream)
  _update(progress, 12345)
  _update(progress, 12346, images_per_second=5.0)
  for line in _drawn(stream):
    assert len(line) < columns, line   # never wraps (and leaves the last column free)
    assert "12345/200000" in line or "12346/200000" in line
  if columns == 200:
    assert _drawn(stream)[0].startswith("[") and "fine_tune_after_warmup epoch 10/200" in _drawn(stream)[0]
  progress.message("done")
  assert stream.getvalue().endswith("\ndone\n")


def test_progress_shows_unknown_rates_as_dashes(monkeypatch):
  monkeypatch.setenv("COLUMNS", "80")
  for unknown in (None, 0.0):
    stream = _FakeTty()
    _update(metrics_lib.Progress(100, stream), 1, images_per_second=unknown, steps_per_second=unknown)
    line = _drawn(stream)[0]
    assert "-- img/s" in line and "ETA --:--" in line and "0 img/s" not in line


def test_progress_in_a_log_prints_full_lines():
  stream = io.StringIO()
  progress = metrics_lib.Progress(100, stream)
  _update(progress, 50, images_per_second=100.0)
  assert stream.getvalue().endswith("100 img/s ETA 00:05\n") and "step 50/100" in stream.getvalue()
