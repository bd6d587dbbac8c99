"""The seam between the loop and the methods: a toy method in this file alone trains
through the loop, structure exists before ``init_state``, and ``qflax.train`` reaches
methods only through the registry and the protocol."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp

from batches import build
from qflax import distill, methods, options, train
from qflax import nn as qnn
from qflax.methods import networks

ROOT = Path(__file__).resolve().parents[2]


@dataclasses.dataclass(frozen=True)
class CentroidOptions(methods.MethodOptions):
  shrink: float = options.number(0.0, minimum=0.0, maximum=1.0, doc="weight decay towards zero, per step")


@methods.register
class Centroid(methods.Method):
  """A toy method: a full-precision model trained with cross-entropy in one phase."""
  name = "toy_centroid"
  Options = CentroidOptions

  def __init__(self, opts, task):
    super().__init__(opts, task)
    self.model = networks.build_model(opts.run, task.num_classes)
    self.plan = qnn.uniform_plan(self.model.num_blocks, 32, (32,))
    self.phases = (self.phase("fit", opts.run.num_epochs, {"model": 1.0}),)
    self.variants = (methods.Variant("fp32", 32, 32),)

  def init_state(self, rng):
    variables = self.model.init(rng, self.sample_input, self.plan)
    return self.new_state({"model": variables["params"]}, {"model": variables["batch_stats"]})

  def train_step(self, state, x, y, rng, phase_index):
    def loss_fn(params):
      logits, updates = self.model.apply({"params": params, "batch_stats": state.batch_stats["model"]}, x, self.plan,
                                         train=True, mutable=["batch_stats"])
      return distill.cross_entropy(logits, y), (logits, updates["batch_stats"])
    (loss, (logits, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params["model"])
    grads = jax.tree_util.tree_map(lambda g, p: g + self.options.shrink * p, grads, state.params["model"])
    state = self.apply_gradients(state, phase_index, {"model": grads}, batch_stats={"model": stats})
    return state, {"loss": loss, "accuracy": distill.accuracy(logits, y)}

  def network(self, state, index):
    variables = {"params": state.params["model"], "batch_stats": state.batch_stats["model"]}
    return methods.VariantNetwork(self.model, variables, self.plan, self.options.run.model)


def test_a_method_defined_in_a_test_file_trains_through_the_loop(tiny_config, tmp_path):
  tiny_config.method = {"name": "toy_centroid", "bit_axis": "auto", "shrink": 0.01}
  tiny_config.bits = (32,)
  tiny_config.num_epochs = 2
  results = train.train_and_evaluate(tiny_config, str(tmp_path))
  assert [v["name"] for v in results["variants"]] == ["fp32"]
  assert results["method"] == "toy_centroid" and results["variants"][0]["model_bytes"] > 0
  tiny_config.method.shrink = 2.0
  try:
    train.validate(tiny_config)
    raise AssertionError("shrink=2.0 was accepted")
  except train.ConfigError as e:
    assert "method.shrink" in str(e)


def test_structure_exists_before_init_state(tiny_config):
  cmtkd = tiny_config.copy_and_resolve_references()
  cmtkd.method = {"name": "cmtkd", "bit_axis": "auto", "teacher_bits": (8, 4)}
  cmtkd.model.name, cmtkd.model.options = "resnet8", {}
  cmtkd.bits = (2,)
  method = build(cmtkd)
  assert method.fusion_points == (1, 2) == method.model.stage_ends   # before any init
  state = jax.eval_shape(method.init_state, jax.random.key(0))
  assert state.params["importance"]["logits"].shape == (2, 2)
  x = jnp.ones((4, 8, 8, 1))
  _, _, fused, *_ = method.forward(jax.jit(method.init_state)(jax.random.key(0)).params,
                                   jax.jit(method.init_state)(jax.random.key(0)).batch_stats, x, fuse=True,
                                   train_teachers=False)
  assert len(fused) == 2

  tq = tiny_config.copy_and_resolve_references()
  tq.method = {"name": "tq", "bit_axis": "auto", "checkpoint": "unused", "transforms": ("klt",),
               "target_rates": (2.0,), "num_blocks": 2}
  tq.quant.calibrate_batches = 1
  tq.bits = (32,)
  method = build(tq)
  kernels = [l.path for l in method.layers]
  assert kernels and all(p[-1] == "kernel" for p in kernels)
  state = jax.eval_shape(method.init_state, jax.random.key(0))
  for layer in method.layers:
    key = "/".join(layer.path)
    assert state.params["compressed"]["T"][key].shape == (1, layer.rows, layer.cols)
  assert state.extra["frontier"].shape[1] == method.frontier_size


def _method_imports(path: Path) -> list[tuple[str, str]]:
  """``(module, name)`` of every import from ``qflax.methods`` in a file."""
  out = []
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("qflax.methods"):
      out += [(node.module, a.name) for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module == "qflax":
      out += [("qflax.methods", "") for a in node.names if a.name == "methods"]
    elif isinstance(node, ast.Import):
      out += [(a.name, "") for a in node.names if a.name.startswith("qflax.methods")]
  return out


def test_train_reaches_methods_only_through_the_registry_and_the_protocol():
  submodules = {p.stem for p in (ROOT / "qflax" / "methods").iterdir() if p.stem != "__init__"}
  seen = []
  for path in sorted((ROOT / "qflax" / "train").glob("*.py")):
    for module, name in _method_imports(path):
      seen.append(module)
      assert module in ("qflax.methods", "qflax.methods.base"), (path.name, module)
      assert module != "qflax.methods" or name not in submodules - {"base"}, (path.name, name)
  assert "qflax.methods.base" in seen and "qflax.methods" in seen      # the check looked at real imports
