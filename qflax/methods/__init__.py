"""Training methods by name (see ``base`` for the protocol).

Example:
  >>> method = methods.create(config, methods.Task(num_classes=10, input_shape=(28, 28, 1), steps_per_epoch=468))
  >>> state = jax.jit(method.init_state)(jax.random.key(0))
"""

from __future__ import annotations

from qflax.methods.aao import AAO
from qflax.methods.base import (Method, MethodOptions, Phase, Start, Task, TrainState, Variant, VariantNetwork,
                                apply_network)
from qflax.methods.cmtkd import CMTKD
from qflax.methods.progressive import Progressive
from qflax.methods.qat import QAT, FullPrecision
from qflax.methods.qkd import QKD
from qflax.methods.tq.method import TransformQuantization

_REGISTRY: dict[str, type[Method]] = {m.name: m for m in (FullPrecision, QAT, AAO, QKD, CMTKD, Progressive,
                                                          TransformQuantization)}


def method_names() -> tuple[str, ...]:
  return tuple(_REGISTRY)


def get_method(name: str) -> type[Method]:
  if name not in _REGISTRY:
    raise ValueError(f"method.name={name!r} is unknown; allowed: {method_names()}")
  return _REGISTRY[name]


def register(cls: type[Method]) -> type[Method]:
  """Adds a method to the registry under ``cls.name`` (usable as a class decorator);
  ``method.name=<name>`` then selects it from any config, with no change to the loop."""
  if not isinstance(getattr(cls, "name", None), str) or not issubclass(cls, Method):
    raise TypeError(f"{cls!r} is not a Method subclass with a name")
  _REGISTRY[cls.name] = cls
  return cls


def create(config, task: Task) -> Method:
  """The method ``config.method.name`` with its options from ``config`` (validated)."""
  cls = get_method(config.method.name)
  return cls(cls.Options.from_config(config), task)


__all__ = ["AAO", "CMTKD", "FullPrecision", "Method", "MethodOptions", "Phase", "Progressive", "QAT", "QKD", "Start",
           "Task", "TrainState", "TransformQuantization", "Variant", "VariantNetwork", "apply_network", "create",
           "get_method", "method_names", "register"]
