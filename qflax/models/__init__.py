"""Networks built from ``qflax.nn`` layers, all taking a precision plan.

Example:
  >>> from qflax import models, nn as qnn
  >>> spec = models.QuantSpec(bit_set=(32, 4, 2), weight_quantizer="sat", act_quantizer="pact")
  >>> model = models.get_model("resnet20", num_classes=100, spec=spec)
  >>> plan = qnn.uniform_plan(model.num_blocks, 4, spec.bit_set)
  >>> variables = model.init(key, x, plan)
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Mapping

from qflax.models.common import FIRST_LAST, Network, QuantSpec, count_macs, count_params, macs_by_layer
from qflax.models.convnet import ConvNet, convnet
from qflax.models.mobilenet_v2 import MobileNetV2, mobilenet_v2
from qflax.models.resnet import ResNet, cifar_resnet, imagenet_resnet, temporal_shift

_REGISTRY: dict[str, Callable[..., Network]] = {
    **{f"resnet{d}": functools.partial(cifar_resnet, d) for d in (8, 20, 32, 56)},
    **{f"preact_resnet{d}": functools.partial(cifar_resnet, d, preact=True) for d in (8, 20, 32, 56)},
    **{f"resnet{d}": functools.partial(imagenet_resnet, d) for d in (18, 34, 50)},
    "mobilenet_v2": mobilenet_v2,
    "convnet": convnet,
    **{f"tsm_resnet{d}": functools.partial(cifar_resnet, d, num_frames=8) for d in (8, 20)},
    **{f"tsm_resnet{d}": functools.partial(imagenet_resnet, d, num_frames=8) for d in (18, 50)},
}


def model_names() -> tuple[str, ...]:
  return tuple(sorted(_REGISTRY))


def builder_options(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
  """``options`` with the builder's defaults filled in, so that two option sets that
  build the same network compare equal.

  Example:
    >>> builder_options("convnet", {"widths": (8, 8, 8)})
    {'widths': (8, 8, 8), 'head_type': 'flatten'}
  """
  if name not in _REGISTRY:
    raise ValueError(f"model {name!r} is unknown; allowed: {model_names()}")
  defaults = {p.name: p.default for p in inspect.signature(_REGISTRY[name]).parameters.values()
              if p.default is not p.empty and p.name != "spec"}
  return {**defaults, **options}


def get_model(name: str, num_classes: int, spec: QuantSpec = QuantSpec(), **options) -> Network:
  """A registered model by name; ``options`` are the builder's keyword arguments
  (``width``, ``num_frames``, ``cifar_stem``, ``widths``, ``head_type``); bad values
  raise ``ValueError`` here, before any initialisation."""
  if name not in _REGISTRY:
    raise ValueError(f"model {name!r} is unknown; allowed: {model_names()}")
  if not isinstance(num_classes, int) or num_classes < 1:
    raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
  try:
    return _REGISTRY[name](num_classes=num_classes, spec=spec, **options)
  except TypeError as e:
    raise ValueError(f"bad options for model {name!r}: {e}") from None


__all__ = ["ConvNet", "FIRST_LAST", "MobileNetV2", "Network", "QuantSpec", "ResNet", "builder_options",
           "cifar_resnet", "count_macs", "count_params", "get_model", "imagenet_resnet", "macs_by_layer", "model_names",
           "temporal_shift"]
