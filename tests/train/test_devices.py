"""XLA:CPU thread pools for fake CPU devices (``qflax/train/devices.py``): with eight
devices on two cores XLA's pools had one thread per device, and an all-reduce could
wait for a device that had no thread left (aborting after 40 s)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from qflax.train import devices


def test_two_pool_threads_per_device_when_the_cores_are_fewer(monkeypatch):
  monkeypatch.setattr(devices, "_cores", lambda: 2)
  environ = {}
  assert devices.configure_cpu_thread_pools(environ, devices=8) == 16 and environ == {"PJRT_NPROC": "16"}
  for given in ({"PJRT_NPROC": "3"}, {"NPROC": "4"}):       # the user's choice stays
    environ = dict(given)
    assert devices.configure_cpu_thread_pools(environ, devices=8) is None and environ == given
  assert devices.configure_cpu_thread_pools({}, devices=1) is None
  monkeypatch.setattr(devices, "_cores", lambda: 16)
  assert devices.configure_cpu_thread_pools({}, devices=8) is None   # XLA's default is enough


# The quickstart recipe shrunk to the tiny synthetic task, as a user would type it.
_TINY = ["--config", "quickstart", "--config.model.options.widths=(4, 8, 8)", "--config.dataset.name=synthetic",
         "--config.dataset.synthetic.num_train=48", "--config.dataset.synthetic.num_test=40",
         "--config.dataset.synthetic.image_size=8", "--config.dataset.synthetic.channels=1",
         "--config.dataset.synthetic.num_classes=4", "--config.batch_size=16", "--config.eval_batch_size=0",
         "--config.num_epochs=1", "--config.quant.monitor=False"]

_RUN = """
import collections, json, os, sys
from qflax import cli
code = cli.run({argv!r})
import jax
threads = collections.Counter(open(f"/proc/self/task/{{t}}/comm").read().strip() for t in os.listdir("/proc/self/task"))
print(json.dumps({{"code": code, "devices": jax.device_count(), "pool": threads["tf_XLAEigen"]}}))
"""


def test_launch_on_eight_fake_cpu_devices_gives_them_sixteen_pool_threads_and_trains(tmp_path):
  env = {k: v for k, v in os.environ.items() if k not in ("PJRT_NPROC", "NPROC", "XLA_FLAGS")}
  # LLVM's optimisations off: half the compile time, which is most of this run.
  env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="8", XLA_FLAGS="--xla_backend_optimization_level=0")
  script = _RUN.format(argv=_TINY + ["--workdir", str(tmp_path / "run")])
  out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  report = json.loads(out.stdout.strip().splitlines()[-1])
  assert report["code"] == 0 and report["devices"] == 8, out.stderr[-3000:]
  assert report["pool"] == (16 if devices._cores() < 16 else devices._cores())
  assert json.loads((tmp_path / "run" / "results.json").read_text())["epochs"] == 1
