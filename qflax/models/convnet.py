"""A small ConvNet for 28x28 inputs (Fashion-MNIST-sized quick runs)."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn

from qflax import nn as qnn
from qflax.models.common import Network, QuantSpec, global_avg_pool, positive_int


class ConvBlock(nn.Module):
  """``maxpool?(relu(bn(conv3x3(x))))``; one quantizable block."""
  features: int
  pool: bool
  spec: QuantSpec

  @nn.compact
  def __call__(self, x, p: qnn.BlockPrecision, train: bool):
    y = nn.relu(self.spec.bn("bn")(self.spec.conv(self.features, name="conv")(x, p), p.slot, not train))
    return nn.max_pool(y, (2, 2), (2, 2)) if self.pool else y


HEADS = ("flatten", "avg")


class ConvNet(Network):
  """Full-precision (or int8) 3x3 stem, then ``widths`` conv blocks (pooling after the
  first two), then the classifier on the flattened features (``head="flatten"``,
  keeps the spatial layout) or on their global average (``head="avg"``)."""
  num_classes: int
  spec: QuantSpec = QuantSpec()
  widths: Sequence[int] = (32, 64, 128)
  head_type: str = "flatten"

  def block_layout(self):
    return tuple((w, 2 if i < 2 else 1) for i, w in enumerate(self.widths))

  def setup(self):
    if self.head_type not in HEADS:
      raise ValueError(f"head_type={self.head_type!r} is unknown; allowed: {HEADS}")
    fixed, self.fixed_precision = self.spec.fixed_layer_settings()
    self.stem_conv = qnn.QuantConv(self.widths[0], (3, 3), **fixed)
    self.stem_bn = qnn.SwitchableBatchNorm(1)
    self.blocks = [ConvBlock(w, i < 2, self.spec) for i, w in enumerate(self.widths)]
    self.classifier = qnn.QuantDense(self.num_classes, **self.spec.fixed_layer_settings("classifier")[0])

  def stem(self, x, train: bool = False):
    return nn.relu(self.stem_bn(self.stem_conv(x, self.fixed_precision), 0, not train))

  def head(self, h, plan: qnn.PrecisionPlan, train: bool = False):
    features = h.reshape(h.shape[0], -1) if self.head_type == "flatten" else global_avg_pool(h)
    return self.classifier(features, self.fixed_precision)


def convnet(num_classes: int, spec: QuantSpec = QuantSpec(), *, widths=(32, 64, 128), head_type: str = "flatten"):
  """A :class:`ConvNet`, its options checked (``widths``: positive channel counts)."""
  if isinstance(widths, (str, bytes)) or not isinstance(widths, (tuple, list)) or not widths:
    raise ValueError(f"widths={widths!r} must be a non-empty tuple of channel counts")
  widths = tuple(positive_int("widths entry", w) for w in widths)
  if head_type not in HEADS:
    raise ValueError(f"head_type={head_type!r} is unknown; allowed: {HEADS}")
  return ConvNet(num_classes, spec, widths, head_type)
