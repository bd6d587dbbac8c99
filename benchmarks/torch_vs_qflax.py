"""qflax against PyTorch: the same networks and train steps, side by side in one process.

Rows: CIFAR ResNet-20 (100 classes, 32x32x3) and the quickstart ConvNet (10
classes, 28x28x1) with the ``fp`` step, the ``qat`` step at W4A4 (SAT weights, PACT
activations), the AAO step (|B| = 5: 32, 8, 6, 4, 2 with swapping, 5 pure + 4 hybrid
forwards) and the CMT-KD step (teachers 8/6/4, a 2-bit student; SAT + PACT on both
sides, where ``benchmarks/cmtkd_step.py`` uses uniform_layer + HWGQ). Variants per
row: the jitted qflax step (fp32, bit axis as a loop), PyTorch eager
(``benchmarks/torch_reference.py``: channels-last, fused optimizer) and the same
with ``torch.compile`` of the forward (the backward is compiled by AOTAutograd; the
fused optimizer step runs eagerly). All variants run in interleaved rounds (every
row's every variant once per round); the median step time per variant is reported.

``torch.compile`` is not applied to AAO: PyTorch's idiomatic form takes bit-widths
as Python ints, so every random swap mask is a new graph (qflax passes them as
data and compiles once).

  python benchmarks/torch_vs_qflax.py [--rounds 5] [--iters 1] [--rows resnet20:fp:128,...]
                                      [--no-compile] [--bf16] [--profile]

``--profile`` (alone, no timing rows unless --rows is given) breaks down the qflax CPU
step for ResNet-20 qat W4A4 at batch 128: op counts of the compiled HLO, per-thunk
times from ``jax.profiler`` (fusions by what they compute), convolutions timed one
by one, and grouped convolutions from ``vmap`` over the bit axis against the loop.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_reference as tr  # noqa: E402

from qflax import methods  # noqa: E402
from qflax.train import default_config, load_config_file  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AAO_BITS = (32, 8, 6, 4, 2)
DEFAULT_ROWS = ("resnet20:fp:128,resnet20:qat:128,resnet20:aao:128,resnet20:cmtkd:128,"
                "resnet20:fp:1024,resnet20:qat:1024,convnet:fp:128,convnet:qat:128,convnet:fp:1024,convnet:qat:1024")
STEP_NAMES = {"fp": "fp", "qat": "qat w4a4", "aao": "aao, 5 bits, swapping", "cmtkd": "cmtkd, 3 teachers"}


# --- qflax ------------------------------------------------------------------------


def qflax_config(model: str, step: str, bit_axis: str = "loop", compute_dtype: str = "float32"):
  if model == "convnet":
    c = load_config_file(os.path.join(ROOT, "qflax", "configs", "quickstart.py"))
    shape, classes = (28, 28, 1), 10
  else:
    c = default_config()
    c.model.name = model
    shape, classes = (32, 32, 3), 100
  c.method.name = step
  c.method.bit_axis = bit_axis
  c.compute_dtype = compute_dtype
  if step == "fp":
    c.bits = (32,)
    c.quant.weight_quantizer = c.quant.act_quantizer = "none"
    c.quant.act_param_init = ml_collections.ConfigDict()   # "none" has no clip to initialise
  elif step == "qat":
    c.bits = (4,)
  elif step == "aao":
    c.bits = AAO_BITS
  elif step == "cmtkd":
    c.bits = (2,)
    c.method.teacher_bits = (8, 6, 4)
  return c, shape, classes


def qflax_step(model, step, x, y, bit_axis="loop", compute_dtype="float32"):
  """``(run, first-call seconds, compiled)`` for the jitted qflax step on device arrays."""
  config, shape, classes = qflax_config(model, step, bit_axis, compute_dtype)
  m = methods.create(config, methods.Task(classes, shape, 100))
  state = jax.jit(m.init_state)(jax.random.key(2))
  fn = jax.jit(lambda s, x, y, k: m.train_step(s, x, y, k, 0), donate_argnums=0)
  start = time.perf_counter()
  compiled = fn.lower(state, x, y, jax.random.key(3)).compile()
  state, metrics = compiled(state, x, y, jax.random.key(3))
  jax.block_until_ready(metrics)
  first = time.perf_counter() - start
  counter = [3]

  def run():
    nonlocal state
    counter[0] += 1
    state, metrics = compiled(state, x, y, jax.random.key(counter[0]))
    jax.block_until_ready(metrics["loss"])
  return run, first, compiled


# --- PyTorch ----------------------------------------------------------------------


def torch_step(model, step, x, y, compiled: bool):
  """``(run, first-call seconds)`` for the PyTorch step (channels-last, fused optimizer)."""
  torch.manual_seed(0)
  cl = torch.channels_last
  if model == "convnet":
    build = lambda **kw: tr.ConvNet(10, (16, 32, 64), alpha=4.0, **kw)
    optimizer = lambda mods: tr.adam(mods)
  else:
    build = lambda **kw: tr.CifarResNet(20, 100, alpha=8.0, **kw)
    optimizer = lambda mods: tr.sgd(mods)
  if step in ("fp", "qat"):
    net = build(quantize=step == "qat", num_slots=1).to(memory_format=cl)
    bits = 32 if step == "fp" else 4
    forward = torch.compile(net) if compiled else net
    fn = tr.QATStep(net, optimizer([net]), tr.uniform_plan(len(net.blocks), bits, 0), forward=forward)
  elif step == "aao":
    if compiled:
      raise NotImplementedError("AAO is not compiled (bit-widths as Python ints: every swap mask is a new graph)")
    net = build(quantize=True, num_slots=len(AAO_BITS)).to(memory_format=cl)
    fn = tr.AAOStep(net, optimizer([net]), AAO_BITS)
  elif step == "cmtkd":
    nets = [build(quantize=True, num_slots=4).to(memory_format=cl) for _ in range(4)]
    fn = tr.CMTKDStep(nets[:3], nets[3], tr.cmtkd_sgd)
    if compiled:
      fn.loss = torch.compile(fn.loss)
  else:
    raise ValueError(step)
  start = time.perf_counter()
  fn(x, y)
  first = time.perf_counter() - start
  return (lambda: fn(x, y)), first


# --- timing -----------------------------------------------------------------------


def machine_line(args) -> str:
  cpu = platform.processor() or "cpu"
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    pass
  load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
  return (f"machine: {cpu}, {os.cpu_count()} cores (load average {load}); jax {jax.__version__} "
          f"({jax.default_backend()}), torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"python {platform.python_version()}; rounds={args.rounds} iters={args.iters}")


def time_rows(args):
  rows = []
  for spec in args.rows.split(","):
    model, step, batch = spec.split(":")
    rows.append((model, step, int(batch)))
  variants = {}   # (row, variant) -> run
  firsts = {}
  for row in rows:
    model, step, batch = row
    shape = (28, 28, 1) if model == "convnet" else (32, 32, 3)
    classes = 10 if model == "convnet" else 100
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch,) + shape).astype(np.float32)
    y = rng.integers(0, classes, batch)
    run, firsts[row, "qflax"], _ = qflax_step(model, step, jnp.asarray(x), jnp.asarray(y))
    variants[row, "qflax"] = run
    if args.bf16:
      variants[row, "bf16"], firsts[row, "bf16"], _ = qflax_step(model, step, jnp.asarray(x), jnp.asarray(y),
                                                                 compute_dtype="bfloat16")
    tx = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).to(memory_format=torch.channels_last)
    ty = torch.from_numpy(y).long()
    variants[row, "eager"], firsts[row, "eager"] = torch_step(model, step, tx, ty, compiled=False)
    if args.compile and step != "aao":
      try:
        variants[row, "compile"], firsts[row, "compile"] = torch_step(model, step, tx, ty, compiled=True)
      except Exception as e:   # report, keep timing the rest
        firsts[row, "compile"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
    print(f"built {model} {step} {batch}: " + ", ".join(
        f"{k} first call {v:.1f} s" if isinstance(v, float) else f"{k} {v}"
        for (r, k), v in firsts.items() if r == row), file=sys.stderr, flush=True)
  times = {k: [] for k in variants}
  for r in range(args.rounds):
    for key, run in variants.items():
      start = time.perf_counter()
      for _ in range(args.iters):
        run()
      times[key].append((time.perf_counter() - start) / args.iters)
    print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
  return rows, {k: statistics.median(v) for k, v in times.items()}, firsts


def print_table(rows, med, firsts):
  print("\n| model | step | batch | qflax jit ms | qflax img/s | torch eager ms | eager img/s | eager / qflax "
        "| torch.compile ms | compiled img/s | compiled / qflax | qflax bf16 ms | bf16 / qflax |")
  print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
  for row in rows:
    model, step, batch = row
    q = med[row, "qflax"]
    cells = [model, STEP_NAMES[step], str(batch), f"{q * 1e3:,.0f}", f"{batch / q:,.0f}"]
    for v in ("eager", "compile"):
      t = med.get((row, v))
      if t is None:
        reason = "not compiled" if step == "aao" else firsts.get((row, v), "skipped")
        cells += [str(reason) if v == "compile" else "-", "-", "-"]
      else:
        cells += [f"{t * 1e3:,.0f}", f"{batch / t:,.0f}", f"{t / q:.2f}x"]
    t = med.get((row, "bf16"))
    cells += ["-", "-"] if t is None else [f"{t * 1e3:,.0f}", f"{t / q:.2f}x"]
    print("| " + " | ".join(cells) + " |")
  print("\nFirst call (compile + one step), seconds:\n")
  print("| model | step | batch | qflax jit | torch eager | torch.compile |")
  print("|---|---|---:|---:|---:|---:|")
  for row in rows:
    cells = [firsts.get((row, v)) for v in ("qflax", "eager", "compile")]
    cells = [f"{c:.1f}" if isinstance(c, float) else ("-" if c is None else str(c)) for c in cells]
    print(f"| {row[0]} | {STEP_NAMES[row[1]]} | {row[2]} | " + " | ".join(cells) + " |")


# --- profile ----------------------------------------------------------------------

_QUANT_SCOPES = re.compile(r"/(conv1|conv2|shortcut_conv|conv)/")
_BN_SCOPES = re.compile(r"/(bn1|bn2|shortcut_bn|stem_bn|bn)/")


def _computations(hlo: str):
  """``{computation name: (header, [instruction lines])}`` and the ENTRY's name."""
  comps, entry, name = {}, None, None
  for line in hlo.splitlines():
    header = re.match(r"^(ENTRY )?%(\S+) \(.*\{$", line)
    if header:
      name = header.group(2)
      comps[name] = []
      if header.group(1):
        entry = name
    elif line.startswith("}"):
      name = None
    elif name is not None and line.strip().startswith(("%", "ROOT")):
      comps[name].append(line.strip())
  return comps, entry


def _called(line):
  return re.findall(r"(?:calls|to_apply)=%([\w.\-]+)", line)


def _contains(comps, name, opcode, seen=None):
  seen = set() if seen is None else seen
  if name in seen or name not in comps:
    return False
  seen.add(name)
  for line in comps[name]:
    if re.search(rf"\s{opcode}\(", line):
      return True
    if any(_contains(comps, c, opcode, seen) for c in _called(line)):
      return True
  return False


def classify_thunks(hlo: str):
  """ENTRY instruction name -> ``conv`` / ``quantizer`` / ``batchnorm`` / ``other``,
  and op counts."""
  comps, entry = _computations(hlo)
  kinds, counts = {}, collections.Counter()
  for line in comps[entry]:
    m = re.match(r"(?:ROOT )?%([\w.\-]+) = \S+ ([\w\-]+)\(", line)
    if not m:
      continue
    name, opcode = m.groups()
    op_name = re.search(r'op_name="([^"]*)"', line)
    op_name = op_name.group(1) if op_name else ""
    calls = _called(line)
    if opcode == "convolution" or any(_contains(comps, c, "convolution") for c in calls):
      kind = "conv"
    elif _QUANT_SCOPES.search(op_name):
      kind = "quantizer"
    elif _BN_SCOPES.search(op_name):
      kind = "batchnorm"
    else:
      kind = "other"
    kinds[name] = kind
    counts[opcode] += 1
    counts["kind:" + kind] += 1
  return kinds, counts


def conv_specs(hlo: str):
  """Every convolution of a compiled module: operand shapes and window attributes."""
  comps, _ = _computations(hlo)
  specs = []
  for lines in comps.values():
    shapes = {}
    for line in lines:
      m = re.match(r"(?:ROOT )?%([\w.\-]+) = f32\[([\d,]*)\]\S* (\w[\w\-]*)\(", line)
      if m:
        shapes[m.group(1)] = tuple(int(d) for d in m.group(2).split(",") if d)
      if " convolution(" not in line:
        continue
      ops = re.search(r"convolution\(%([\w.\-]+), %([\w.\-]+)\)", line).groups()
      window = re.search(r"window=\{([^}]*)\}", line).group(1)
      attrs = dict(item.split("=") for item in window.split())
      dims = re.search(r"dim_labels=(\S+?),", line + ",").group(1)
      fgc = int((re.search(r"feature_group_count=(\d+)", line) or [0, 1])[1])
      bgc = int((re.search(r"batch_group_count=(\d+)", line) or [0, 1])[1])
      if ops[0] not in shapes or ops[1] not in shapes:
        continue
      specs.append((shapes[ops[0]], shapes[ops[1]], attrs.get("stride"), attrs.get("pad"), attrs.get("lhs_dilate"),
                    attrs.get("rhs_dilate"), dims, fgc, bgc))
  return specs


def _pairs(text, n=2, default=1):
  return tuple(int(v) for v in text.split("x")) if text else (default,) * n


def time_conv(spec, reps=3):
  lhs, rhs, stride, pad, lhs_dil, rhs_dil, dims, fgc, bgc = spec
  if dims != "b01f_01io->b01f":
    return None
  padding = [tuple(int(v) for v in p.split("_")) for p in pad.split("x")] if pad else [(0, 0), (0, 0)]
  fn = jax.jit(lambda a, b: jax.lax.conv_general_dilated(
      a, b, _pairs(stride), padding, _pairs(lhs_dil), _pairs(rhs_dil), ("NHWC", "HWIO", "NHWC"),
      feature_group_count=fgc, batch_group_count=bgc))
  a, b = jnp.ones(lhs, jnp.float32), jnp.ones(rhs, jnp.float32)
  fn(a, b).block_until_ready()
  best = float("inf")
  for _ in range(reps):
    start = time.perf_counter()
    fn(a, b).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return best


def trace_thunks(run, kinds, steps=3):
  """Per-kind sums of thunk durations from ``jax.profiler`` over ``steps`` steps, per step."""
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d, create_perfetto_trace=True):
      for _ in range(steps):
        run()
    path = glob.glob(os.path.join(d, "**", "*trace.json.gz"), recursive=True)[0]
    with gzip.open(path) as f:
      events = json.load(f)["traceEvents"]
  sums = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and "hlo_op" in e.get("args", {}):
      sums[kinds.get(e["args"]["hlo_op"], "other")] += e["dur"] * 1e-6 / steps
  return sums


def median_time(run, rounds=5):
  out = []
  for _ in range(rounds):
    start = time.perf_counter()
    run()
    out.append(time.perf_counter() - start)
  return statistics.median(out)


def profile(rounds):
  print("\n## Profile: qflax ResNet-20 qat w4a4, batch 128, CPU\n")
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(128, 32, 32, 3)).astype(np.float32))
  y = jnp.asarray(rng.integers(0, 100, 128))
  results = {}
  for label, step, axis in (("fp", "fp", "loop"), ("qat w4a4", "qat", "loop")):
    run, _, compiled = qflax_step("resnet20", step, x, y, axis)
    hlo = compiled.as_text()
    kinds, counts = classify_thunks(hlo)
    specs = conv_specs(hlo)
    t = median_time(run, rounds)
    conv_times = [time_conv(s) for s in specs]
    conv = sum(c for c in conv_times if c)
    thunks = trace_thunks(run, kinds)
    results[label] = t
    print(f"{label}: step {t * 1e3:.0f} ms (median of {rounds}); ENTRY ops {sum(v for k, v in counts.items() if not k.startswith('kind:'))}"
          f" ({counts['fusion']} fusions); {len(specs)} convolutions, timed one by one: {conv * 1e3:.0f} ms "
          f"({conv / t:.0%} of the step)")
    print("  thunk time per step from jax.profiler (convolution thunks run asynchronously, so their "
          "trace time is not their cost): " + ", ".join(
              f"{k} {v * 1e3:.0f} ms ({counts['kind:' + k]} ops)" for k, v in sorted(thunks.items())))
  print(f"qat / fp step time: {results['qat w4a4'] / results['fp']:.2f}x")

  print("\n### vmap over the bit axis (qat 32+4)\n")
  for axis in ("loop", "vmap"):
    config, shape, classes = qflax_config("resnet20", "qat", axis)
    config.bits = (32, 4)
    m = methods.create(config, methods.Task(classes, shape, 100))
    state = jax.jit(m.init_state)(jax.random.key(2))
    hlo = jax.jit(lambda s, x, y: m.train_step(s, x, y, jax.random.key(3), 0)).lower(state, x, y).compile().as_text()
    specs = conv_specs(hlo)
    grouped = [s for s in specs if s[7] > 1 or s[8] > 1]
    conv_times = [time_conv(s, reps=1) for s in specs]
    plain = sum(c for s, c in zip(specs, conv_times) if c and s[7] == 1 and s[8] == 1)
    group = sum(c for s, c in zip(specs, conv_times) if c and (s[7] > 1 or s[8] > 1))
    print(f"{axis}: {len(specs)} convolutions, {len(grouped)} grouped "
          f"(feature_group_count or batch_group_count > 1); timed one by one: ungrouped {plain * 1e3:.0f} ms, "
          f"grouped {group * 1e3:.0f} ms")
  # One layer: the vmapped form of two 3x3 convs (stacked kernels) against the two convs.
  grouped = time_conv(((128, 32, 32, 32), (3, 3, 16, 32), None, "1_1x1_1", None, None, "b01f_01io->b01f", 2, 1))
  single = time_conv(((128, 32, 32, 16), (3, 3, 16, 16), None, "1_1x1_1", None, None, "b01f_01io->b01f", 1, 1))
  print(f"one 3x3 conv 16->16 on 128x32x32, two models: grouped (feature_group_count=2) {grouped * 1e3:.1f} ms "
        f"against 2 x ungrouped {2 * single * 1e3:.1f} ms ({grouped / (2 * single):.1f}x)")


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--iters", type=int, default=1)
  parser.add_argument("--rows", default=None, help=f"model:step:batch,... (default {DEFAULT_ROWS})")
  parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip torch.compile")
  parser.add_argument("--bf16", action="store_true", help="also time the qflax step with compute_dtype=bfloat16")
  parser.add_argument("--profile", action="store_true", help="profile the qflax ResNet-20 qat step (CPU)")
  args = parser.parse_args()
  if args.rows is None and not args.profile:
    args.rows = DEFAULT_ROWS
  print(machine_line(args), flush=True)
  if args.rows:
    rows, med, firsts = time_rows(args)
    print_table(rows, med, firsts)
  if args.profile:
    profile(args.rounds)
  print(f"\nload average at the end: {', '.join(f'{v:.1f}' for v in os.getloadavg())}")


if __name__ == "__main__":
  main()
