"""Blocks, step sizes and Lagrangian bit allocation (Young et al., TPAMI 2021).

Each layer's ``T`` (rows) and ``S`` (the matching columns) are cut into blocks;
every block gets one bit-depth ``R`` in 0..8 (0 prunes it) and one step ``D``
for the mid-tread quantizer ``q(t, R, D) = D clip(round(t / D), -2^(R-1), 2^(R-1) - 1)``.
The distortion of a choice is the network's output MSE on calibration images
with only that block quantized (or, for the weight-error baseline, the block's
weight error); blocks are assumed to add up.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np

MAX_RATE = 8


def row_blocks(num_rows: int, num_blocks: int = 16) -> list[np.ndarray]:
  """Row indices of up to ``num_blocks`` contiguous, nearly equal blocks."""
  return [b for b in np.array_split(np.arange(num_rows), min(num_blocks, num_rows)) if len(b)]


def midtread_numpy(t: np.ndarray, rate: int, step: float) -> np.ndarray:
  """The mid-tread quantizer on host arrays (``rate = 0`` gives zeros)."""
  if rate == 0:
    return np.zeros_like(t)
  half = 2.0 ** (rate - 1)
  return step * np.clip(np.round(t / step), -half, half - 1)


class BlockChoice(NamedTuple):
  """Per rate ``R = 0..8``: the best step and the output MSE it gives."""
  steps: np.ndarray        # (9,)
  distortion: np.ndarray   # (9,)


def search_steps(block: np.ndarray, distortion_of: Callable[[np.ndarray], float], *, grid: float = 0.25,
                 span: float = 6.0) -> BlockChoice:
  """For ``R = 1..8``, the step ``D = 2^s`` (``s`` on a ``grid`` around ``log2 RMS(block)``)
  with the least ``distortion_of(quantized block)``; the search walks down from the
  centre and up from it and stops in each direction once the distortion rises.
  ``R = 0`` is the pruned block."""
  rms = float(np.sqrt(np.mean(np.square(block)))) or 1e-8
  centre = np.log2(rms)
  steps = np.zeros(MAX_RATE + 1)
  distortion = np.zeros(MAX_RATE + 1)
  distortion[0] = distortion_of(np.zeros_like(block))
  for rate in range(1, MAX_RATE + 1):
    # A good step shrinks about twice per extra bit; centre the walk there.
    start = centre + 1.0 - (rate - 1)
    best = (np.inf, 2.0 ** start)
    for direction in (-1, 1):
      previous = np.inf
      s = start if direction < 0 else start + grid
      while abs(s - start) <= span:
        d = distortion_of(midtread_numpy(block, rate, 2.0 ** s))
        if d < best[0]:
          best = (d, 2.0 ** s)
        if d > previous:
          break
        previous = d
        s += direction * grid
    distortion[rate], steps[rate] = best
  return BlockChoice(steps, distortion)


def allocate(distortion: np.ndarray, sizes: np.ndarray, lam: float) -> np.ndarray:
  """Per block the rate minimising ``D_block(R) + lam * numel(block) * R``."""
  rates = np.arange(distortion.shape[1])
  return np.argmin(distortion + lam * sizes[:, None] * rates[None, :], axis=1)


class FrontierPoint(NamedTuple):
  log2_lambda: float
  rate: float                  # bits per original weight
  distortion: float            # predicted output MSE (sum over blocks)
  rates: np.ndarray            # per block


def sweep_exponents(start: float = -30.0, stop: float = 10.0, step: float = 0.5) -> np.ndarray:
  """The exponents ``s`` of the Lagrange multipliers ``lambda = 2^s`` of a sweep."""
  return np.arange(start, stop + step / 2, step)


def lambda_sweep(distortion: np.ndarray, sizes: np.ndarray, total_weights: int, **sweep) -> list[FrontierPoint]:
  """The rate-distortion frontier: one point per ``lambda = 2^s`` for ``s`` in
  :func:`sweep_exponents` (``start``, ``stop``, ``step``); rates fall as ``lambda`` grows."""
  points = []
  for s in sweep_exponents(**sweep):
    rates = allocate(distortion, sizes, 2.0 ** s)
    bits = float(np.sum(rates * sizes)) / total_weights
    points.append(FrontierPoint(float(s), bits, float(np.sum(distortion[np.arange(len(rates)), rates])), rates))
  return points


def allocation_for_rate(points: list[FrontierPoint], target: float, distortion: np.ndarray, sizes: np.ndarray,
                        total_weights: int) -> FrontierPoint:
  """The allocation for ``target`` bits per weight.

  Takes the frontier point with the highest rate not above ``target``, then adds
  single bits greedily (the block with the largest distortion drop per added
  weight-bit that still fits), so the result falls short of the target by less
  than one bit of one block, ``max(sizes) / total_weights`` bits per weight (unless
  no added bit lowers the distortion).
  """
  feasible = [p for p in points if p.rate <= target + 1e-12]
  if not feasible:
    raise ValueError(f"no allocation reaches {target} bits per weight (lowest: {min(p.rate for p in points):.3f})")
  best = max(feasible, key=lambda p: (p.rate, -p.distortion))
  rates = best.rates.copy()
  budget = target * total_weights - float(np.sum(rates * sizes))
  while True:
    room = rates < distortion.shape[1] - 1
    fits = room & (sizes <= budget + 1e-9)
    if not fits.any():
      break
    index = np.arange(len(rates))
    gain = np.where(fits, (distortion[index, rates] - distortion[index, np.minimum(rates + 1, distortion.shape[1] - 1)])
                    / sizes, -np.inf)
    j = int(np.argmax(gain))
    if gain[j] <= 0:         # more bits would not lower the distortion anywhere
      break
    rates[j] += 1
    budget -= sizes[j]
  rate = float(np.sum(rates * sizes)) / total_weights
  return FrontierPoint(best.log2_lambda, rate, float(np.sum(distortion[np.arange(len(rates)), rates])), rates)


def entropy_bits(codes: np.ndarray) -> float:
  """Empirical entropy of integer codes, in bits per code."""
  _, counts = np.unique(np.asarray(codes).reshape(-1), return_counts=True)
  p = counts / counts.sum()
  return float(-(p * np.log2(p)).sum()) if len(counts) > 1 else 0.0
