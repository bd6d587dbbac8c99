"""CMT-KD step time and memory with 3 teachers: vmapped teachers against a Python
loop, each with and without rematerialised teacher segments.

CIFAR ResNet-20 (teachers at 8/6/4 bits, a 2-bit student, HWGQ activations) at
batch 128, interleaved rounds, median per step. Memory is XLA's compiled
estimate for the step (arguments + outputs + temporaries - donated aliases), the
number XLA plans its buffers with, on any backend.

  python benchmarks/cmtkd_step.py [--rounds 5] [--iters 3] [--model resnet20] [--batch 128]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import jax

from qflax import methods
from qflax.train import default_config

VARIANTS = {"loop": ("loop", False), "loop + remat": ("loop", True), "vmap": ("vmap", False),
            "vmap + remat": ("vmap", True)}


def _step(model, batch, bit_axis, remat):
  c = default_config()
  c.model.name = model
  c.method.name = "cmtkd"
  c.method.bit_axis = bit_axis
  c.method.remat_teachers = remat
  c.method.teacher_bits = (8, 6, 4)
  c.bits = (2,)
  c.quant.weight_quantizer = "uniform_layer"
  c.quant.act_quantizer = "hwgq"
  m = methods.create(c, methods.Task(100, (32, 32, 3), 100))
  x = jax.random.normal(jax.random.key(0), (batch, 32, 32, 3))
  y = jax.random.randint(jax.random.key(1), (batch,), 0, 100)
  state = jax.jit(m.init_state)(jax.random.key(2))
  step = jax.jit(lambda s, k: m.train_step(s, x, y, k, 0), donate_argnums=0)
  compiled = step.lower(state, jax.random.key(3)).compile()
  analysis = compiled.memory_analysis()
  estimate = (analysis.argument_size_in_bytes + analysis.output_size_in_bytes + analysis.temp_size_in_bytes
              - analysis.alias_size_in_bytes) if analysis is not None else 0
  state, _ = jax.block_until_ready(step(state, jax.random.key(3)))

  def run(i=[0]):
    nonlocal state
    i[0] += 1
    state, metrics = step(state, jax.random.key(i[0]))
    jax.block_until_ready(metrics)
  return run, estimate


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--iters", type=int, default=3)
  parser.add_argument("--model", default="resnet20")
  parser.add_argument("--batch", type=int, default=128)
  args = parser.parse_args()
  print(f"backend: {jax.default_backend()} ({jax.devices()[0].device_kind}); jax {jax.__version__}; "
        f"python {platform.python_version()}; {args.model}, batch {args.batch}, 3 teachers + student; "
        f"rounds={args.rounds} iters={args.iters}\n", flush=True)
  runs = {}
  for name, (bit_axis, remat) in VARIANTS.items():
    start = time.perf_counter()
    runs[name] = _step(args.model, args.batch, bit_axis, remat)
    print(f"{name}: compiled and ran once in {time.perf_counter() - start:.0f} s", flush=True)
  times = {k: [] for k in runs}
  for _ in range(args.rounds):                       # interleaved, so drift hits every variant alike
    for name, (run, _) in runs.items():
      start = time.perf_counter()
      for _ in range(args.iters):
        run()
      times[name].append((time.perf_counter() - start) / args.iters)
  base = statistics.median(times["loop"])
  print("\n| teachers | ms / step | images / s | vs loop | XLA memory estimate (MiB) |")
  print("|---|---:|---:|---:|---:|")
  for name, t in times.items():
    t = statistics.median(t)
    print(f"| {name} | {t * 1e3:.1f} | {args.batch / t:,.0f} | {t / base:.2f}x | {runs[name][1] / 2**20:,.0f} |")


if __name__ == "__main__":
  main()
