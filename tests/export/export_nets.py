"""Tiny exported networks shared by the export tests (built once per process)."""

from __future__ import annotations

import functools
import json

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from qflax import export, models, quant
from qflax import nn as qnn
from qflax.export._src import trace

BIT_SET = (32, 8, 4, 2)
VARIANTS = {f"w{b}a{b}": b for b in BIT_SET}

# name -> (model, options, input shape, weight q., activation q., signed activation q., first/last)
CASES = {
    "convnet-sat-pact-fp": ("convnet", {"widths": (4, 8, 8)}, (12, 12, 1), "sat", "pact", "none", "fp"),
    "resnet8-dorefa-clamp-int8": ("resnet8", {"width": 0.25}, (8, 8, 3), "dorefa", "clamp", "none", "int8"),
    "preact8-lsq-lsq-fp": ("preact_resnet8", {"width": 0.25}, (8, 8, 3), "lsq", "lsq", "lsq_signed", "fp"),
    "mobilenet-qil-qil-int8": ("mobilenet_v2", {"width": 0.1, "cifar_stem": True}, (8, 8, 3), "qil", "qil",
                               "qil_signed", "int8"),
    "convnet-lsq-qilsigned-int8": ("convnet", {"widths": (4, 8, 8)}, (12, 12, 1), "lsq", "qil_signed", "none",
                                   "int8"),
    "convnet-uniform-hwgq-int8": ("convnet", {"widths": (4, 8, 8)}, (12, 12, 1), "uniform_layer", "hwgq", "none",
                                  "int8"),
}

_RANGES = {"input_alpha": (1.0, 3.0), "input_step": (0.05, 0.3), "input_centre": (0.6, 1.2),
           "input_half_width": (0.4, 0.6)}


def _kernel_param(name: str, kernel: np.ndarray, bits: int) -> float:
  """LSQ's and QIL's weight initialisations, in numpy."""
  if name == "step":
    q_p = max(2 ** (min(bits, 8) - 1) - 1, 1)
    return 2.0 * np.abs(kernel).mean() / np.sqrt(q_p)
  return np.abs(kernel).max() / 2.0     # centre, half_width: the interval [0, max|w|]


def _layer(site, rng, bit_set):
  """Random variables of one probed layer, distinct per slot."""
  if site.kind == "norm":
    rows = (site.slots, *site.shape)
    return ({"scale": rng.uniform(0.5, 1.5, rows), "bias": rng.normal(0.0, 0.2, rows)},
            {"mean": rng.normal(0.0, 0.2, rows), "var": rng.uniform(0.5, 2.0, rows)})
  kernel = rng.normal(0.0, 1.0 / np.sqrt(np.prod(site.shape[:-1])), site.shape)
  params = {"kernel": kernel}
  if site.use_bias:
    params["bias"] = rng.normal(0.0, 0.2, site.shape[-1:])
  for name in quant.get_quantizer(site.act_quantizer, "activation").param_names:
    params[f"input_{name}"] = rng.uniform(*_RANGES[f"input_{name}"], site.slots)
  bits = bit_set if site.slots == len(bit_set) else (8,)
  for name in quant.get_quantizer(site.weight_quantizer, "weight").param_names:
    params[f"kernel_{name}"] = np.array([_kernel_param(name, kernel, b) for b in bits])
  return params, {}


def random_variables(name, options, shape, spec, seed: int = 0):
  """Random variables shaped by the export probe (one abstract trace, no RNG kernels to compile),
  with distinct values per BatchNorm / quantizer slot, so a variant reading the wrong slot shows."""
  model = models.get_model(name, 10, spec, **options)
  sites = trace.probe_named(name, json.loads(json.dumps(options)), 10, spec, shape, model.num_blocks)
  rng = np.random.default_rng(seed)
  flat = {}
  for path, site in sites.items():
    params, stats = _layer(site, rng, spec.bit_set)
    keys = tuple(path.split("/"))
    flat.update({("params", *keys, k): v for k, v in params.items()})
    flat.update({("batch_stats", *keys, k): v for k, v in stats.items()})
  return traverse_util.unflatten_dict({k: jnp.asarray(v, jnp.float32) for k, v in flat.items()})


def inputs(shape, batch: int = 1, seed: int = 1):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(batch, *shape)), jnp.float32)


# MobileNetV2 (17 blocks) is the costly one to compile: two variants; the others export all four.
CASE_VARIANTS = {"mobilenet-qil-qil-int8": ("w8a8", "w2a2")}


def variants(case: str) -> tuple[str, ...]:
  return CASE_VARIANTS.get(case, tuple(VARIANTS))


@functools.lru_cache(maxsize=None)
def build(case: str):
  """``(model, variables, plans, integer_model)`` for a case of :data:`CASES`."""
  name, options, shape, wq, aq, signed, first_last = CASES[case]
  spec = models.QuantSpec(bit_set=BIT_SET, weight_quantizer=wq, act_quantizer=aq, signed_act_quantizer=signed,
                          first_last=first_last)
  model = models.get_model(name, 10, spec, **options)
  plans = {v: qnn.uniform_plan(model.num_blocks, VARIANTS[v], BIT_SET) for v in variants(case)}
  variables = random_variables(name, options, shape, spec)
  im = export.integer_model(model, variables, plans, model_name=name, model_options=options, num_classes=10,
                            spec=spec, input_shape=shape)
  return model, variables, plans, im
