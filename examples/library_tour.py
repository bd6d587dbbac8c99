"""qflax in a minute: one small network trained at 4 bits, evaluated at every bit-width.

A two-layer QuantDense network with SAT weights and PACT activations learns a
synthetic 10-class problem with its weights shared by the bit set (32, 8, 4, 2);
each step sums the losses at every bit-width (precision is data, so one jitted
step serves all of them). It then prints the accuracy per bit-width and the
packed integer size of the hidden layer's weights.

  python examples/library_tour.py
"""

from __future__ import annotations

import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from qflax import nn as qnn
from qflax import quant

BIT_SET = (32, 8, 4, 2)


class TinyNet(nn.Module):
  @nn.compact
  def __call__(self, x, plan: qnn.PrecisionPlan, train: bool):
    hidden = qnn.QuantDense(128, weight_quantizer="sat", act_quantizer="none", bit_set=BIT_SET)(x, plan.block(0))
    hidden = qnn.SwitchableBatchNorm(len(BIT_SET))(hidden, plan.slot[0], use_running_average=not train)
    hidden = nn.relu(hidden)
    return qnn.QuantDense(10, weight_quantizer="sat", act_quantizer="pact", bit_set=BIT_SET,
                          act_param_init={"alpha": 4.0})(hidden, plan.block(1))


def synthetic(n, seed):
  rng = np.random.default_rng(seed)
  centres = np.random.default_rng(0).normal(size=(10, 32)).astype(np.float32)
  labels = rng.integers(0, 10, n)
  return centres[labels] + rng.normal(size=(n, 32)).astype(np.float32) * 1.2, labels


def main():
  x_train, y_train = synthetic(8192, 1)
  x_test, y_test = synthetic(2048, 2)
  model = TinyNet()
  plans = [qnn.uniform_plan(2, b, BIT_SET) for b in BIT_SET]
  variables = model.init(jax.random.key(0), x_train[:2], plans[0], train=False)
  tx = optax.adam(3e-3)
  opt_state = tx.init(variables["params"])

  @jax.jit
  def train_step(params, batch_stats, opt_state, x, y):
    def loss_fn(params):
      total, stats = 0.0, batch_stats
      for plan in plans:   # one term per bit-width, weights shared
        logits, updates = model.apply({"params": params, "batch_stats": stats}, x, plan, train=True,
                                      mutable=["batch_stats"])
        stats = updates["batch_stats"]
        total += optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      return total, stats
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss

  @jax.jit
  def accuracy(variables, plan):
    logits = model.apply(variables, x_test, plan, train=False)
    return jnp.mean(jnp.argmax(logits, -1) == y_test)

  params, batch_stats = variables["params"], variables["batch_stats"]
  start = time.time()
  for step in range(300):
    idx = np.random.default_rng(step).integers(0, len(x_train), 256)
    params, batch_stats, opt_state, loss = train_step(params, batch_stats, opt_state, x_train[idx], y_train[idx])
    if step % 100 == 0:
      print(f"step {step:3d}  summed loss {float(loss):.3f}")
  print(f"trained in {time.time() - start:.1f}s on {jax.default_backend()}")
  trained = {"params": params, "batch_stats": batch_stats}
  for bits, plan in zip(BIT_SET, plans):
    size = "full precision" if bits == 32 else (
        f"{quant.packed_size_bytes(params['QuantDense_0']['kernel'].size, bits)} bytes packed")
    print(f"w{bits}a{bits}: test accuracy {float(accuracy(trained, plan)):.3f}   hidden weights: {size}")


if __name__ == "__main__":
  main()
