"""Integer inference against the fake-quantized float forward, on CPU: time and memory.

For the quickstart ConvNet (widths 16/32/64, 28x28x1) and CIFAR ResNet-20 (32x32x3), SAT
weights + PACT activations, full-precision first / last layers, each at w4a4 and w2a2, batch
256, this times three jitted forwards of one exported variant:

- fake-quant: the trained model as evaluated during training (``model.apply``; it re-quantizes
  every kernel on each call);
- rebuilt float: ``export.rebuild`` (dequantized kernels, no weight quantizer);
- integer: ``export.integer_forward`` (int8 operands, int32 accumulation, float32 between layers).

Rounds are interleaved (each round runs every path of every configuration ``--iters`` times);
the table gives the median over ``--rounds`` rounds. Memory: the exported file's bytes (this
variant alone, and the two-variant file) against the same tensors in float32, and the compiled
programs' ``memory_analysis()`` (arguments + outputs + temporaries; XLA reports no true peak).
Weights are random (untrained): timing and sizes do not depend on their values.

  python benchmarks/integer_inference.py [--rounds 5] [--iters 2] [--batch 256]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import jax
import numpy as np

from qflax import export, models
from qflax import nn as qnn

BIT_SET = (32, 4, 2)
MODELS = {"convnet": ({"widths": (16, 32, 64)}, (28, 28, 1)), "resnet20": ({}, (32, 32, 3))}


def _program_bytes(fn, *args) -> int | None:
  """Arguments + outputs + temporaries of the compiled program, or None where not reported."""
  try:
    m = jax.jit(fn).lower(*args).compile().memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)
  except Exception:   # noqa: BLE001 - memory_analysis is optional per backend
    return None


def _configuration(name: str, batch: int):
  """Per variant: the three timed paths (closures), and the size figures."""
  options, shape = MODELS[name]
  spec = models.QuantSpec(bit_set=BIT_SET, weight_quantizer="sat", act_quantizer="pact")
  model = models.get_model(name, 10, spec, **options)
  plans = {f"w{b}a{b}": qnn.uniform_plan(model.num_blocks, b, BIT_SET) for b in (4, 2)}
  x = jax.random.uniform(jax.random.key(1), (batch, *shape)) * 2.0
  variables = jax.jit(lambda x: model.init(jax.random.key(0), x[:1], plans["w4a4"], train=False))(x)
  im = export.integer_model(model, variables, plans, model_name=name, model_options=options, num_classes=10,
                            spec=spec, input_shape=shape)
  both_bytes = len(export.to_bytes(im))
  out = {}
  for variant, plan in plans.items():
    rebuilt, rebuilt_variables, rebuilt_plan = export.rebuild(im, variant)
    apply_fn, operands = export.integer_forward(im, variant)
    fake = lambda v, x, p: model.apply(v, x, p, train=False)
    float_fn = lambda v, x, p, m=rebuilt: m.apply(v, x, p, train=False)
    paths = {"fake-quant": (jax.jit(fake), (variables, x, plan)),
             "rebuilt float": (jax.jit(float_fn), (rebuilt_variables, x, rebuilt_plan)),
             "integer": (jax.jit(apply_fn), (operands, x))}
    logits = {k: np.asarray(jax.block_until_ready(f(*a))) for k, (f, a) in paths.items()}
    alone = im._replace(variants={variant: im.variants[variant]})
    alone = alone._replace(tensors={t: v for t, v in im.tensors.items() if t in _names(alone)})
    out[variant] = {
        "paths": paths,
        "agreement": float(np.mean(logits["integer"].argmax(-1) == logits["fake-quant"].argmax(-1))),
        "file": len(export.to_bytes(alone)), "both": both_bytes, "float": export.float_parameter_bytes(im, variant),
        "programs": {k: _program_bytes(f, *a) for k, (f, a) in paths.items()}}
  return out


def _names(im) -> set[str]:
  return {n for v in im.variants.values() for layer in v.layers.values() for n in layer if isinstance(n, str)}


def _kib(n):
  return "n/a" if n is None else f"{n / 1024:,.0f}"


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--iters", type=int, default=2, help="calls per path per round")
  parser.add_argument("--batch", type=int, default=256)
  args = parser.parse_args()

  configs = {(name, v): c for name in MODELS for v, c in _configuration(name, args.batch).items()}
  times = {(key, p): [] for key, c in configs.items() for p in c["paths"]}
  for _ in range(args.rounds):
    for key, c in configs.items():
      for p, (fn, fn_args) in c["paths"].items():
        start = time.perf_counter()
        for _ in range(args.iters):
          jax.block_until_ready(fn(*fn_args))
        times[key, p].append((time.perf_counter() - start) / args.iters)

  print(f"backend: {jax.default_backend()} ({jax.devices()[0].device_kind}); jax {jax.__version__}; "
        f"python {platform.python_version()}; batch {args.batch}; rounds={args.rounds} iters={args.iters}")
  print()
  print("| model | variant | fake-quant ms | rebuilt float ms | integer ms | integer / fake-quant | argmax agree "
        "| file KiB (variant / both) | float32 KiB | program KiB (fake / float / integer) |")
  print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
  for (name, variant), c in configs.items():
    ms = {p: statistics.median(times[(name, variant), p]) * 1e3 for p in c["paths"]}
    programs = " / ".join(_kib(c["programs"][p]) for p in c["paths"])
    print(f"| {name} | {variant} | {ms['fake-quant']:.1f} | {ms['rebuilt float']:.1f} | {ms['integer']:.1f} "
          f"| {ms['integer'] / ms['fake-quant']:.2f}x | {c['agreement']:.3f} | {_kib(c['file'])} / {_kib(c['both'])} "
          f"| {_kib(c['float'])} | {programs} |")


if __name__ == "__main__":
  main()
