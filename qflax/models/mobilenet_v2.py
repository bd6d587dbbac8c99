"""MobileNetV2 (Sandler et al., CVPR 2018) with quantized inverted residuals."""

from __future__ import annotations

import flax.linen as nn

from qflax import nn as qnn
from qflax.models.common import Network, QuantSpec, global_avg_pool, positive_number

# (expansion t, output channels c, repeats n, first stride s), from the paper.
INVERTED_RESIDUAL_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                             (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def make_divisible(v: float, divisor: int = 8) -> int:
  new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
  return new_v + divisor if new_v < 0.9 * v else new_v


def relu6(x):
  return nn.relu6(x)


class InvertedResidual(nn.Module):
  """Expand 1x1 -> depthwise 3x3 -> linear project 1x1, residual when shapes match.

  The expansion conv's input is the previous block's linear output, which can be
  negative, so it uses the spec's signed activation quantizer (QKD, Kim et al.).
  """
  features: int
  strides: int
  expansion: int
  spec: QuantSpec
  signed_input: bool = True

  @nn.compact
  def __call__(self, x, p: qnn.BlockPrecision, train: bool):
    ura = not train
    hidden = x.shape[-1] * self.expansion
    y = x
    if self.expansion != 1:
      y = self.spec.conv(hidden, (1, 1), 1, 0, signed_input=self.signed_input, name="expand")(y, p)
      y = relu6(self.spec.bn("expand_bn")(y, p.slot, ura))
    y = self.spec.conv(hidden, (3, 3), self.strides, 1, groups=hidden,
                       signed_input=self.signed_input and self.expansion == 1, name="depthwise")(y, p)
    y = relu6(self.spec.bn("depthwise_bn")(y, p.slot, ura))
    y = self.spec.bn("project_bn")(self.spec.conv(self.features, (1, 1), 1, 0, name="project")(y, p), p.slot, ura)
    if self.strides == 1 and x.shape[-1] == self.features:
      y = y + x
    return y


class MobileNetV2(Network):
  """MobileNetV2 with a width multiplier; ``cifar_stem`` uses stride 1 for small inputs."""
  num_classes: int
  spec: QuantSpec = QuantSpec()
  width: float = 1.0
  cifar_stem: bool = False

  def block_settings(self) -> list[tuple[int, int, int]]:
    """Per block ``(expansion, output channels, stride)``."""
    out = []
    for t, c, n, s in INVERTED_RESIDUAL_SETTING:
      for i in range(n):
        stride = 1 if i or (self.cifar_stem and c == 24) else s
        out.append((t, make_divisible(c * self.width), stride))
    return out

  def block_layout(self):
    return tuple((c, s) for _, c, s in self.block_settings())

  def setup(self):
    fixed, self.fixed_precision = self.spec.fixed_layer_settings()
    stem_channels = make_divisible(32 * self.width)
    self.stem_conv = qnn.QuantConv(stem_channels, (3, 3), 1 if self.cifar_stem else 2, 1, **fixed)
    self.stem_bn = qnn.SwitchableBatchNorm(1)
    self.blocks = [InvertedResidual(c, s, t, self.spec, signed_input=i > 0)
                   for i, (t, c, s) in enumerate(self.block_settings())]
    self.last_channels = make_divisible(1280 * max(1.0, self.width))
    self.last_conv = self.spec.conv(self.last_channels, (1, 1), 1, 0, signed_input=True)
    self.last_bn = self.spec.bn()
    self.classifier = qnn.QuantDense(self.num_classes, **self.spec.fixed_layer_settings("classifier")[0])

  def stem(self, x, train: bool = False):
    return relu6(self.stem_bn(self.stem_conv(x, self.fixed_precision), 0, not train))

  def head(self, h, plan: qnn.PrecisionPlan, train: bool = False):
    last = plan.block(plan.num_blocks - 1)
    h = relu6(self.last_bn(self.last_conv(h, last), last.slot, not train))
    return self.classifier(global_avg_pool(h), self.fixed_precision)


def mobilenet_v2(num_classes: int, spec: QuantSpec = QuantSpec(), *, width: float = 1.0, cifar_stem: bool = False):
  """A :class:`MobileNetV2`, its options checked."""
  if not isinstance(cifar_stem, bool):
    raise ValueError(f"cifar_stem={cifar_stem!r} must be True or False")
  return MobileNetV2(num_classes, spec, positive_number("width", width), cifar_stem)
