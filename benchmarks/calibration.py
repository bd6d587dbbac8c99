"""Quantizer calibration (``qflax.nn.calibrate``): one jitted forward pass against op by op.

AAO's ``prepare`` on CIFAR ResNet-20 at bit-widths (32, 8, 4, 2): PACT clips from
``--batches`` calibration batches of 128 images, per bit-width slot (the MSE search
over 32 candidate clips per layer). Then QKD-style QIL weight intervals (the MSE
search over candidate ratios per layer) at (4, 2). "op by op" is the same function
with its jit switched off, which is how it ran before; "jitted" includes compiling
(no persistent cache; each ``prepare`` builds its forward function anew, so a second
call compiles again), timed before and after the op-by-op run.

  python benchmarks/calibration.py [--model resnet20] [--batches 4]
"""

from __future__ import annotations

import argparse
import platform
import time
from unittest import mock

import jax

from qflax import methods
from qflax.nn._src import calibration
from qflax.train import default_config


def _method(model, name, bits, weight_quantizer, act_quantizer):
  c = default_config()
  c.model.name = model
  c.method.name = name
  c.bits = bits
  c.quant.weight_quantizer = weight_quantizer
  c.quant.act_quantizer = act_quantizer
  c.quant.act_param_init = {}
  m = methods.create(c, methods.Task(100, (32, 32, 3), 100))
  return m, m.init_state(jax.random.key(0))


def _seconds(fn):
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", default="resnet20")
  parser.add_argument("--batches", type=int, default=4)
  args = parser.parse_args()
  jax.config.update("jax_enable_compilation_cache", False)
  images = jax.random.uniform(jax.random.key(1), (args.batches, 128, 32, 32, 3))
  batches = list(images)
  cases = {"aao (32, 8, 4, 2), PACT clips": _method(args.model, "aao", (32, 8, 4, 2), "sat", "pact"),
           "qat (4, 2), QIL intervals": _method(args.model, "qat", (4, 2), "qil", "qil")}
  print(f"{platform.processor() or platform.machine()}, {jax.devices()[0].device_kind}, jax {jax.__version__}; "
        f"{args.model}, {args.batches} batches of 128")
  print("| calibration | op by op (s) | jitted, 1st (s) | jitted, 2nd (s) | op by op / slower jitted |")
  print("|---|---:|---:|---:|---:|")
  for label, (m, state) in cases.items():
    run = lambda: m.prepare(state, batches).params   # noqa: E731
    first = _seconds(run)
    with mock.patch.object(calibration, "_sown", calibration._sown.__wrapped__):
      eager = _seconds(run)
    second = _seconds(run)
    print(f"| {label} | {eager:.1f} | {first:.1f} | {second:.1f} | {eager / max(first, second):.1f}x |")


if __name__ == "__main__":
  main()
