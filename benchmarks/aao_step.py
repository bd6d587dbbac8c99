"""Cost of the AAO step against the per-bit-width steps it replaces, side by side.

AAO with |B| = 5 (32, 8, 6, 4, 2; swapping on, so 5 pure + 4 hybrid forwards)
against |B| times the ``qat`` step at one bit-width, for CIFAR ResNet-20 at batch
128. The joint step should cost no more than the sum of its parts (ratio <= 1
means it does not). The bit axis runs as an unrolled loop; ``--vmap`` adds the
same step with the pure and hybrid forwards vmapped over the bit axis.

  python benchmarks/aao_step.py [--rounds 5] [--iters 3] [--model resnet20] [--vmap]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import jax

from qflax import methods
from qflax.train import default_config

BITS = (32, 8, 6, 4, 2)


def _step(model, method, bits, swap=True, bit_axis="loop"):
  c = default_config()
  c.model.name = model
  c.method.name = method
  c.method.bit_axis = bit_axis   # explicit: "auto" would pick per backend
  c.bits = bits
  if method == "aao":
    c.method.swap = swap
  m = methods.create(c, methods.Task(100, (32, 32, 3), 100))
  x = jax.random.normal(jax.random.key(0), (128, 32, 32, 3))
  y = jax.random.randint(jax.random.key(1), (128,), 0, 100)
  state = m.init_state(jax.random.key(2))
  step = jax.jit(lambda s, k: m.train_step(s, x, y, k, 0))
  state, _ = jax.block_until_ready(step(state, jax.random.key(3)))

  def run(i=[0]):
    nonlocal state
    i[0] += 1
    state, metrics = step(state, jax.random.key(i[0]))
    jax.block_until_ready(metrics)
  return run


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--iters", type=int, default=3)
  parser.add_argument("--model", default="resnet20")
  parser.add_argument("--vmap", action="store_true", help="also time the bit axis as vmap (slow on CPU)")
  args = parser.parse_args()
  variants = {"aao, 5 bit-widths, swapping": _step(args.model, "aao", BITS),
              "aao, 5 bit-widths, no swapping": _step(args.model, "aao", BITS, swap=False),
              "qat, one bit-width (w4a4)": _step(args.model, "qat", (4,))}
  if args.vmap:
    variants["aao, 5 bit-widths, swapping, vmap"] = _step(args.model, "aao", BITS, bit_axis="vmap")
  times = {k: [] for k in variants}
  for _ in range(args.rounds):
    for name, run in variants.items():
      start = time.perf_counter()
      for _ in range(args.iters):
        run()
      times[name].append((time.perf_counter() - start) / args.iters)
  med = {k: statistics.median(v) for k, v in times.items()}
  parts = len(BITS) * med["qat, one bit-width (w4a4)"]
  print(f"backend: {jax.default_backend()} ({jax.devices()[0].device_kind}); jax {jax.__version__}; "
        f"python {platform.python_version()}; {args.model}, batch 128; rounds={args.rounds} iters={args.iters}\n")
  print("| step | ms / step | images / s | vs 5 x qat step |")
  print("|---|---:|---:|---:|")
  for name, t in med.items():
    print(f"| {name} | {t * 1e3:.1f} | {128 / t:,.0f} | {t / parts:.2f}x |")
  print(f"| 5 x qat step (sum of parts) | {parts * 1e3:.1f} | {128 / parts:,.0f} | 1.00x |")


if __name__ == "__main__":
  main()
