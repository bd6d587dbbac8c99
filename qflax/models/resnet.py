"""ResNets: CIFAR ResNet-20/32/56 (post- and pre-activation), ResNet-8 for 28x28,
ImageNet ResNet-18/34/50, and the TSM video variant.

He et al., "Deep Residual Learning", CVPR 2016 (CIFAR and ImageNet variants);
He et al., "Identity Mappings in Deep Residual Networks", ECCV 2016 (pre-activation);
Lin, Gan, Han, "TSM: Temporal Shift Module", ICCV 2019 (video).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from qflax import nn as qnn
from qflax.models.common import Network, QuantSpec, global_avg_pool, positive_int, positive_number


def temporal_shift(x, num_frames: int, fold_div: int = 8):
  """TSM: 1/8 of the channels move one frame forward in time, 1/8 one frame back.

  ``x`` is ``(batch * num_frames, H, W, C)``; frame ``t`` receives channels
  ``[0, C/8)`` from frame ``t - 1`` and ``[C/8, 2C/8)`` from frame ``t + 1``
  (zeros at the clip ends); the rest stay.
  """
  n, h, w, c = x.shape
  v = x.reshape(n // num_frames, num_frames, h, w, c)
  fold = c // fold_div
  zeros = jnp.zeros_like(v[:, :1, ..., :fold])
  forward = jnp.concatenate([zeros, v[:, :-1, ..., :fold]], axis=1)
  backward = jnp.concatenate([v[:, 1:, ..., fold:2 * fold], zeros], axis=1)
  return jnp.concatenate([forward, backward, v[..., 2 * fold:]], axis=-1).reshape(x.shape)


class ResidualBlock(nn.Module):
  """Fields shared by the residual blocks; ``num_frames > 0`` adds the temporal shift."""
  features: int
  strides: int
  spec: QuantSpec
  num_frames: int = 0


class BasicBlock(ResidualBlock):
  """Post-activation basic block: ``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))``."""

  @nn.compact
  def __call__(self, x, p: qnn.BlockPrecision, train: bool):
    ura = not train
    branch = temporal_shift(x, self.num_frames) if self.num_frames else x
    y = self.spec.conv(self.features, (3, 3), self.strides, 1, name="conv1")(branch, p)
    y = nn.relu(self.spec.bn("bn1")(y, p.slot, ura))
    y = self.spec.conv(self.features, (3, 3), 1, 1, name="conv2")(y, p)
    y = self.spec.bn("bn2")(y, p.slot, ura)
    shortcut = x
    if self.strides != 1 or x.shape[-1] != self.features:
      shortcut = self.spec.conv(self.features, (1, 1), self.strides, 0, name="shortcut_conv")(x, p)
      shortcut = self.spec.bn("shortcut_bn")(shortcut, p.slot, ura)
    return nn.relu(y + shortcut)


class PreActBlock(ResidualBlock):
  """Pre-activation block: ``conv(relu(bn(conv(relu(bn(x)))))) + shortcut``."""

  @nn.compact
  def __call__(self, x, p: qnn.BlockPrecision, train: bool):
    ura = not train
    y = nn.relu(self.spec.bn("bn1")(x, p.slot, ura))
    shortcut = x
    if self.strides != 1 or x.shape[-1] != self.features:
      shortcut = self.spec.conv(self.features, (1, 1), self.strides, 0, name="shortcut_conv")(y, p)
    if self.num_frames:
      y = temporal_shift(y, self.num_frames)
    y = self.spec.conv(self.features, (3, 3), self.strides, 1, name="conv1")(y, p)
    y = nn.relu(self.spec.bn("bn2")(y, p.slot, ura))
    y = self.spec.conv(self.features, (3, 3), 1, 1, name="conv2")(y, p)
    return y + shortcut


class Bottleneck(ResidualBlock):
  """ImageNet bottleneck (expansion 4, stride on the 3x3 conv, as in torchvision)."""

  @nn.compact
  def __call__(self, x, p: qnn.BlockPrecision, train: bool):
    ura = not train
    out = self.features * 4
    branch = temporal_shift(x, self.num_frames) if self.num_frames else x
    y = nn.relu(self.spec.bn("bn1")(self.spec.conv(self.features, (1, 1), 1, 0, name="conv1")(branch, p),
                                    p.slot, ura))
    y = nn.relu(self.spec.bn("bn2")(self.spec.conv(self.features, (3, 3), self.strides, 1, name="conv2")(y, p),
                                    p.slot, ura))
    y = self.spec.bn("bn3")(self.spec.conv(out, (1, 1), 1, 0, name="conv3")(y, p), p.slot, ura)
    shortcut = x
    if self.strides != 1 or x.shape[-1] != out:
      shortcut = self.spec.conv(out, (1, 1), self.strides, 0, name="shortcut_conv")(x, p)
      shortcut = self.spec.bn("shortcut_bn")(shortcut, p.slot, ura)
    return nn.relu(y + shortcut)


BLOCKS = {"basic": BasicBlock, "preact": PreActBlock, "bottleneck": Bottleneck}


class ResNet(Network):
  """A ResNet with a CIFAR (3x3 stem) or ImageNet (7x7 stem + max-pool) layout.

  Attributes:
    stage_sizes: blocks per stage.
    stage_widths: channels of each stage (bottleneck: before the x4 expansion).
    block: ``"basic"``, ``"preact"`` or ``"bottleneck"``.
    imagenet_stem: 7x7/2 conv + 3x3/2 max-pool instead of a 3x3 conv.
    num_frames: > 0 makes it a TSM video network over clips ``(B, T, H, W, C)``.
  """
  stage_sizes: Sequence[int]
  stage_widths: Sequence[int]
  num_classes: int
  spec: QuantSpec = QuantSpec()
  block: str = "basic"
  imagenet_stem: bool = False
  num_frames: int = 0

  def block_layout(self):
    expansion = 4 if self.block == "bottleneck" else 1
    return tuple((features * expansion, 2 if stage > 0 and i == 0 else 1)
                 for stage, (size, features) in enumerate(zip(self.stage_sizes, self.stage_widths))
                 for i in range(size))

  def setup(self):
    if self.block not in BLOCKS:
      raise ValueError(f"block={self.block!r} is unknown; allowed: {tuple(BLOCKS)}")
    fixed, self.fixed_precision = self.spec.fixed_layer_settings()
    width = self.stage_widths[0]
    if self.imagenet_stem:
      self.stem_conv = qnn.QuantConv(width, (7, 7), 2, 3, **fixed)
    else:
      self.stem_conv = qnn.QuantConv(width, (3, 3), 1, 1, **fixed)
    self.stem_bn = None if self.block == "preact" else qnn.SwitchableBatchNorm(1)
    blocks = []
    for stage, (size, features) in enumerate(zip(self.stage_sizes, self.stage_widths)):
      for i in range(size):
        strides = 2 if stage > 0 and i == 0 else 1
        blocks.append(BLOCKS[self.block](features, strides, self.spec, self.num_frames))
    self.blocks = blocks
    self.final_bn = self.spec.bn() if self.block == "preact" else None
    self.classifier = qnn.QuantDense(self.num_classes, **self.spec.fixed_layer_settings("classifier")[0])

  def stem(self, x, train: bool = False):
    if self.num_frames:
      x = x.reshape((-1,) + x.shape[2:])   # (B, T, H, W, C) -> (B*T, H, W, C)
    h = self.stem_conv(x, self.fixed_precision)
    if self.stem_bn is not None:
      h = nn.relu(self.stem_bn(h, 0, not train))
    if self.imagenet_stem:
      h = nn.max_pool(h, (3, 3), (2, 2), ((1, 1), (1, 1)))
    return h

  def head(self, h, plan: qnn.PrecisionPlan, train: bool = False):
    if self.final_bn is not None:
      h = nn.relu(self.final_bn(h, plan.slot[-1], not train))
    logits = self.classifier(global_avg_pool(h), self.fixed_precision)
    if self.num_frames:
      logits = logits.reshape(-1, self.num_frames, logits.shape[-1]).mean(axis=1)
    return logits


def _frames(num_frames) -> int:
  return 0 if num_frames == 0 and not isinstance(num_frames, bool) else positive_int("num_frames", num_frames)


def cifar_resnet(depth: int, num_classes: int, spec: QuantSpec = QuantSpec(), *, preact: bool = False,
                 width: float = 1.0, num_frames: int = 0) -> ResNet:
  """CIFAR ResNet-(6n+2): three stages of n blocks, widths 16/32/64 x ``width``."""
  if (depth - 2) % 6 or depth < 8:
    raise ValueError(f"CIFAR ResNet depth must be 6n + 2 with n >= 1, got {depth}")
  n = (depth - 2) // 6
  width = positive_number("width", width)
  widths = tuple(max(int(round(w * width)), 1) for w in (16, 32, 64))
  num_frames = _frames(num_frames)
  return ResNet((n, n, n), widths, num_classes, spec, "preact" if preact else "basic", False, num_frames)


def imagenet_resnet(depth: int, num_classes: int, spec: QuantSpec = QuantSpec(), *,
                    num_frames: int = 0) -> ResNet:
  """ImageNet ResNet-18/34 (basic) or -50 (bottleneck)."""
  layouts = {18: ((2, 2, 2, 2), "basic"), 34: ((3, 4, 6, 3), "basic"), 50: ((3, 4, 6, 3), "bottleneck")}
  if depth not in layouts:
    raise ValueError(f"ImageNet ResNet depth must be one of {tuple(layouts)}, got {depth}")
  sizes, block = layouts[depth]
  num_frames = _frames(num_frames)
  return ResNet(sizes, (64, 128, 256, 512), num_classes, spec, block, True, num_frames)
