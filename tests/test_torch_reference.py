"""The PyTorch reference of benchmarks/torch_reference.py computes what qflax does.

The quickstart ConvNet (fp and W4A4 SAT + PACT) with qflax's initial parameters
copied in: the SAT codes and fake-quantized kernels are bit-identical, and the
training-mode loss (batch-statistics BatchNorm) agrees to float32 rounding.

Tolerances: the loss to 1e-5 absolute (observed 2.4e-7 on 2 CPU cores). Quantization
is discontinuous, so bit-level agreement of the convolutions matters: with
``channels_last`` PyTorch's convolutions sum in another order (relative error ~1e-6),
which flips a few PACT roundings and moves the W4A4 loss by ~3e-4, so the check runs
on contiguous NCHW tensors. Gradients are compared only downstream of the last
max-pool (the classifier and the last block), to 1e-2 relative L2 error: near-ties
in pooled values break differently under the same 1e-6 noise and route upstream
gradients to other pixels, and a ReLU input within noise of 0 moves one element.
Skipped when torch is not installed (the optional ``bench`` extra).
"""

import os
import sys

import jax
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

torch = pytest.importorskip("torch")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import torch_reference as tr  # noqa: E402

from qflax import distill, methods, quant  # noqa: E402
from qflax.methods import networks  # noqa: E402
from qflax.train import load_config_file  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = 32
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _qflax(bits):
  c = load_config_file(os.path.join(ROOT, "qflax", "configs", "quickstart.py"))
  c.bits = (bits,)
  if bits == 32:
    c.method.name = "fp"
    c.quant.weight_quantizer = c.quant.act_quantizer = "none"
    c.quant.act_param_init = ml_collections.ConfigDict()
  method = methods.create(c, methods.Task(10, (28, 28, 1), 100))
  # XLA's backend optimisations only slow the compile of this one-off program.
  state = jax.jit(method.init_state, compiler_options=FAST_COMPILE)(jax.random.key(2))
  return (method, networks.replica(state.params["model"], 0), networks.replica(state.batch_stats["model"], 0),
          tuple(c.model.options.widths), float(c.quant.act_param_init.get("alpha", 8.0)))


@pytest.mark.parametrize("bits", [32, 4], ids=["fp", "w4a4"])
def test_convnet_matches_qflax(bits):
  method, params, batch_stats, widths, alpha = _qflax(bits)
  plan = networks.plan_at(method.plans, 0)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(BATCH, 28, 28, 1)).astype(np.float32)
  y = rng.integers(0, 10, BATCH)
  model = tr.ConvNet(10, widths, quantize=bits < 32, alpha=alpha)
  tr.load_flax_params(model, params, batch_stats)
  layers = [] if bits == 32 else [f"blocks_{i}" for i in range(len(model.blocks))]
  h = {name: np.abs(rng.normal(size=(4, 6, 6, params[name]["conv"]["kernel"].shape[2]))).astype(np.float32) * alpha
       for name in layers}

  @jax.jit
  def reference(params, x, y, h):   # one program: compiling is most of this test's time
    def loss_fn(p):
      logits, _ = method.model.apply({"params": p, "batch_stats": batch_stats}, x, plan, train=True,
                                     mutable=["batch_stats"])
      return distill.cross_entropy(logits, y)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    quantized = {}
    for name in layers:
      kernel, clip = params[name]["conv"]["kernel"], params[name]["conv"]["input_alpha"][0]
      quantized[name] = (quant.sat_weight_integer(kernel, bits).codes, quant.sat_weight(kernel, bits),
                         quant.pact(h[name], clip, bits))
    return loss, grads, quantized

  loss, grads, quantized = reference(params, x, y, h)

  nchw = lambda a: torch.from_numpy(np.ascontiguousarray(np.asarray(a).transpose(0, 3, 1, 2)))
  t_loss = torch.nn.functional.cross_entropy(model(nchw(x), tr.uniform_plan(len(model.blocks), bits, 0)),
                                             torch.from_numpy(y).long())
  t_loss.backward()
  assert abs(t_loss.item() - float(loss)) <= 1e-5

  for name, (codes, fake, activation) in quantized.items():
    layer = model.get_submodule(tr._torch_name((name, "conv")))
    w = layer.weight.detach()
    hwio = lambda a: np.asarray(a).transpose(3, 2, 0, 1)
    np.testing.assert_array_equal(tr.sat_codes(w, bits).numpy().astype(np.int32), hwio(codes))
    np.testing.assert_array_equal(tr.sat_weight(w, bits, layer.fan_out).detach().numpy(), hwio(fake))
    np.testing.assert_array_equal(tr.pact(nchw(h[name]), layer.input_alpha.detach()[0], bits).numpy(),
                                  nchw(activation).numpy())

  last = f"blocks_{len(model.blocks) - 1}"
  for path, g in traverse_util.flatten_dict(grads).items():
    if path[0] not in ("classifier", last):
      continue
    g = np.asarray(g)
    if path[-1] == "kernel":
      g = g.transpose(3, 2, 0, 1) if g.ndim == 4 else g.T
    t_g = model.get_parameter(tr._torch_name(path)).grad.numpy()
    # Relative L2 error: a ReLU input within rounding noise of 0 legitimately moves one element.
    assert np.linalg.norm(t_g - g) <= 1e-2 * np.linalg.norm(g) + 1e-8, "/".join(path)
