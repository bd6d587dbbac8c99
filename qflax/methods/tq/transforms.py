"""The ``Theta = S T`` factorisation of a layer and its transforms (KLT, ELT, identity).

Young, Wang, Taubman, Girod, "Transform Quantization for CNN Compression",
TPAMI 2021. A layer's weights, reshaped to a matrix ``W`` whose rows are input
channels (row transform) or output channels (column transform), are written
``W = S T`` with ``T = A W`` and ``A = S^-1``; ``T`` and ``S`` are what gets
quantized. All linear algebra runs in float64 on the host.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import scipy.linalg

TRANSFORMS = ("identity", "klt", "elt")
MODES = ("row", "column")
EPS_NORMS = ("frobenius", "spectral")


class Factorisation(NamedTuple):
  """``matrix = S @ T`` (float64); ``shape`` and ``mode`` undo :func:`kernel_matrix`."""
  S: np.ndarray
  T: np.ndarray
  shape: tuple[int, ...]
  mode: str


def kernel_matrix(kernel: np.ndarray, mode: str = "row") -> np.ndarray:
  """A Flax kernel (``(kh, kw, in, out)`` or ``(in, out)``) as a matrix whose rows are the
  input channels (``row``) or the output channels (``column``)."""
  k = np.asarray(kernel, np.float64)
  if k.ndim == 2:
    k = k[None, None]
  kh, kw, m, n = k.shape
  if mode == "row":
    return k.transpose(2, 3, 0, 1).reshape(m, n * kh * kw)
  return k.transpose(3, 2, 0, 1).reshape(n, m * kh * kw)


def matrix_kernel(matrix: np.ndarray, shape: tuple[int, ...], mode: str = "row") -> np.ndarray:
  """Inverse of :func:`kernel_matrix`."""
  kh, kw, m, n = (1, 1, *shape) if len(shape) == 2 else shape
  if mode == "row":
    k = matrix.reshape(m, n, kh, kw).transpose(2, 3, 0, 1)
  else:
    k = matrix.reshape(n, m, kh, kw).transpose(2, 3, 1, 0)
  return k.reshape(shape)


def klt_basis(c_ww: np.ndarray) -> np.ndarray:
  """Eigenvectors of ``C_ww = W W^T`` by decreasing eigenvalue (columns, orthonormal)."""
  values, vectors = np.linalg.eigh(c_ww)
  return vectors[:, np.argsort(values)[::-1]]


def regularised(c_gg: np.ndarray, eps: float = 1e-3, norm: str = "frobenius") -> np.ndarray:
  """``C = C_gg + eps ||C_gg|| I`` with the Frobenius norm ``||C||_F = sqrt(sum C_ij^2)`` (the norm
  of the authors' released code) or the spectral norm ``||C||_2 = max |eigenvalue|``."""
  if norm not in EPS_NORMS:
    raise ValueError(f"norm={norm!r} is unknown; allowed: {EPS_NORMS}")
  c = np.asarray(c_gg, np.float64)
  return c + eps * np.linalg.norm(c, "fro" if norm == "frobenius" else 2) * np.eye(len(c))


def elt_basis(c_ww: np.ndarray, c_gg: np.ndarray, eps: float = 1e-3,
              norm: str = "frobenius") -> tuple[np.ndarray, np.ndarray]:
  """``(U, eigenvalues)`` with ``U^T C_ww U`` diagonal and ``U^T C^-1 U = I``, where
  ``C = C_gg + eps ||C_gg|| I`` (:func:`regularised`; ``norm`` picks the matrix norm): the
  generalised symmetric eigenproblem ``eigh(C_ww, C^-1)`` (the end-to-end learned transform
  of Young et al., TPAMI 2021), by decreasing eigenvalue."""
  c = regularised(c_gg, eps, norm)
  values, u = scipy.linalg.eigh(np.asarray(c_ww, np.float64), np.linalg.inv(c))
  order = np.argsort(values)[::-1]
  return u[:, order], values[order]


def factorise(kernel, transform: str = "klt", *, mode: str = "row", c_gg=None, eps: float = 1e-3,
              eps_norm: str = "frobenius", groups: int = 1) -> Factorisation:
  """``W = S T`` for one layer (identity for grouped convolutions).

  ``klt``: ``S = U`` (orthonormal eigenvectors of ``W W^T``). ``elt``: ``S`` = the
  columns of ``inv(U^T)`` normalised to unit length, ``U`` from :func:`elt_basis`
  (``c_gg`` is the covariance of the output gradients with respect to the rows
  of ``W``; ``eps`` and ``eps_norm`` regularise it). ``A = inv(S)``, ``T = A W``.

  Example:
    >>> f = factorise(kernel, "klt");  np.allclose(f.S @ f.T, kernel_matrix(kernel))
  """
  if transform not in TRANSFORMS:
    raise ValueError(f"transform={transform!r} is unknown; allowed: {TRANSFORMS}")
  if mode not in MODES:
    raise ValueError(f"mode={mode!r} is unknown; allowed: {MODES}")
  w = kernel_matrix(kernel, mode)
  rows = len(w)
  if transform == "identity" or groups > 1:
    s = np.eye(rows)
  elif transform == "klt":
    s = klt_basis(w @ w.T)
  else:
    if c_gg is None:
      raise ValueError("the ELT needs c_gg, the gradient covariance of the layer")
    u, _ = elt_basis(w @ w.T, c_gg, eps, eps_norm)
    s = np.linalg.inv(u.T)
    s = s / np.linalg.norm(s, axis=0, keepdims=True)
  t = np.linalg.solve(s, w)
  return Factorisation(s, t, tuple(np.shape(kernel)), mode)
