"""Training throughput of the ``fp`` and ``qat`` steps, side by side in one run.

Times the jitted train step (the method's ``train_step`` on a device-resident
batch) for CIFAR ResNet-20 at batch 128 and the quickstart ConvNet, for:
``fp``; ``qat`` at W4A4; and ``qat`` with two dedicated models (32 and 4 bits)
with the bit axis as an unrolled loop and as ``vmap``. Variants are timed in
interleaved rounds; the median is reported with the ratio to ``fp``.

  python benchmarks/train_throughput.py [--rounds 5] [--iters 3] [--models resnet20,convnet]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import jax

from qflax import methods
from qflax.train import default_config, load_config_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(model: str, method: str, bits, bit_axis: str = "loop"):
  if model == "convnet":
    c = load_config_file(os.path.join(ROOT, "configs", "quickstart.py"))
    shape, classes = (28, 28, 1), 10
  else:
    c = default_config()
    c.model.name = model
    shape, classes = (32, 32, 3), 100
  c.method.name = method
  c.method.bit_axis = bit_axis
  c.bits = tuple(bits)
  if method == "fp":
    c.quant.weight_quantizer = c.quant.act_quantizer = "none"
  c.batch_size = 128
  return c, shape, classes


def _step(model, method, bits, bit_axis="loop"):
  config, shape, classes = _config(model, method, bits, bit_axis)
  m = methods.create(config, methods.Task(classes, shape, 100))
  x = jax.random.normal(jax.random.key(0), (config.batch_size,) + shape)
  y = jax.random.randint(jax.random.key(1), (config.batch_size,), 0, classes)
  state = m.init_state(jax.random.key(2))
  step = jax.jit(lambda s, x, y: m.train_step(s, x, y, jax.random.key(3), 0))
  state, _ = jax.block_until_ready(step(state, x, y))   # compile

  def run():
    nonlocal state
    state, metrics = step(state, x, y)
    jax.block_until_ready(metrics)
  return run, config.batch_size


VARIANTS = [("fp", "fp", (32,), "loop"), ("qat w4a4", "qat", (4,), "loop"),
            ("qat 32+4, loop", "qat", (32, 4), "loop"), ("qat 32+4, vmap", "qat", (32, 4), "vmap")]


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--iters", type=int, default=3)
  parser.add_argument("--models", default="resnet20,convnet")
  args = parser.parse_args()
  device = jax.devices()[0]
  print(f"backend: {jax.default_backend()} ({device.device_kind}); jax {jax.__version__}; "
        f"python {platform.python_version()}; rounds={args.rounds} iters={args.iters}")
  for model in args.models.split(","):
    steps = {name: _step(model, method, bits, axis) for name, method, bits, axis in VARIANTS}
    times = {name: [] for name in steps}
    for _ in range(args.rounds):
      for name, (run, _) in steps.items():
        start = time.perf_counter()
        for _ in range(args.iters):
          run()
        times[name].append((time.perf_counter() - start) / args.iters)
    base = statistics.median(times["fp"])
    print(f"\n{model}, batch 128, jitted train step (median)\n")
    print("| variant | ms / step | images / s | step time vs fp |")
    print("|---|---:|---:|---:|")
    for name, (_, batch) in steps.items():
      t = statistics.median(times[name])
      print(f"| {name} | {t * 1e3:.1f} | {batch / t:,.0f} | {t / base:.2f}x |")


if __name__ == "__main__":
  main()
