"""``launch.py`` as users run it: config file, overrides, errors, resumption."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--config.dataset.name=synthetic", "--config.model.options.widths=(4,8,8)",
        "--config.dataset.synthetic.num_train=64", "--config.dataset.synthetic.num_test=32",
        "--config.dataset.synthetic.image_size=8", "--config.dataset.synthetic.channels=1",
        "--config.num_epochs=1", "--config.batch_size=32", "--config.bits=(32,2)"]


def _launch(*args):
  return subprocess.run([sys.executable, str(ROOT / "launch.py"), *args], capture_output=True, text=True,
                        timeout=600, cwd=ROOT, env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})


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
