"""Fake-quantization overhead of QuantConv against a plain Flax Conv.

Jitted forward + backward of a 3x3, 64 -> 64 convolution on 32x32 inputs,
batch 128 (NHWC), for every registered quantizer (bits passed as traced data,
as in training). The variants are timed in interleaved rounds in one process
and the median per variant is reported with its ratio to the plain conv.

  python benchmarks/quant_overhead.py [--rounds 7] [--iters 5] [--markdown]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from qflax import nn as qnn
from qflax import quant

BATCH, SIZE, CHANNELS = 128, 32, 64


def _variants():
  yield "plain flax Conv", None
  yield "QuantConv, none/none (32 bit)", ("none", "none", 32)
  for name in quant.quantizer_names("weight"):
    if name != "none":
      yield f"weight {name}", (name, "none", 4)
  for name in quant.quantizer_names("activation"):
    if name != "none":
      yield f"activation {name}", ("none", name, 4)
  yield "sat + pact (AAO default)", ("sat", "pact", 4)
  yield "sat + pact at 32 bit", ("sat", "pact", 32)


def _step_fn(spec):
  x = jax.random.normal(jax.random.key(0), (BATCH, SIZE, SIZE, CHANNELS))
  if spec is None:
    model = nn.Conv(CHANNELS, (3, 3), use_bias=False)
    params = model.init(jax.random.key(1), x)["params"]
    fwd = lambda p, x, bits: model.apply({"params": p}, x)
  else:
    wq, aq, _ = spec
    model = qnn.QuantConv(CHANNELS, (3, 3), weight_quantizer=wq, act_quantizer=aq, bit_set=(32, 8, 4, 2))
    params = model.init(jax.random.key(1), x, qnn.BlockPrecision(4, 4, 2))["params"]
    fwd = lambda p, x, bits: model.apply({"params": p}, x, qnn.BlockPrecision(bits, bits, 2))

  @jax.jit
  def step(p, x, bits):
    loss, grads = jax.value_and_grad(lambda p, x: jnp.mean(fwd(p, x, bits) ** 2), argnums=(0, 1))(p, x)
    return loss, grads

  bits = jnp.int32(spec[2] if spec else 32)
  jax.block_until_ready(step(params, x, bits))   # compile
  return lambda: jax.block_until_ready(step(params, x, bits))


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--rounds", type=int, default=7)
  parser.add_argument("--iters", type=int, default=5, help="steps per variant per round")
  args = parser.parse_args()

  variants = list(_variants())
  steps = {name: _step_fn(spec) for name, spec in variants}
  times = {name: [] for name, _ in variants}
  for _ in range(args.rounds):
    for name, _ in variants:
      start = time.perf_counter()
      for _ in range(args.iters):
        steps[name]()
      times[name].append((time.perf_counter() - start) / args.iters)

  base = statistics.median(times["plain flax Conv"])
  device = jax.devices()[0]
  print(f"backend: {jax.default_backend()} ({device.device_kind}), {jax.device_count()} device(s); "
        f"jax {jax.__version__}; python {platform.python_version()}; "
        f"rounds={args.rounds} iters={args.iters}")
  print(f"QuantConv 3x3 {CHANNELS}->{CHANNELS}, {SIZE}x{SIZE}, batch {BATCH}, jitted forward+backward, median step")
  print()
  print("| variant | ms / step | vs plain conv |")
  print("|---|---:|---:|")
  for name, _ in variants:
    t = statistics.median(times[name])
    print(f"| {name} | {t * 1e3:.2f} | {t / base:.3f}x |")


if __name__ == "__main__":
  main()
