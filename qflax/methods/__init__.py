"""Training methods by name (see ``base.Method`` for the protocol)."""

from __future__ import annotations

from qflax.methods.aao import AAO
from qflax.methods.base import Method, Phase, TrainState, Variant
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


__all__ = ["AAO", "CMTKD", "FullPrecision", "Method", "Phase", "Progressive", "QAT", "QKD", "TrainState", "TransformQuantization", "Variant", "get_method", "method_names"]
