"""One linear-operator abstraction for every curvature solver.

A curvature matrix (a Hessian, a Gauss-Newton matrix, or a plain dense tensor in the tests) is
something that multiplies flat vectors. Solvers (:mod:`gradlab.curvature.eigen`,
:mod:`~gradlab.curvature.trace`, :mod:`~gradlab.curvature.density`) accept either a
:class:`CurvatureOperator` or a dense square tensor (wrapped by :func:`as_operator`), so the same
solver code is tested on a matrix whose spectrum is known exactly. The design follows curvlinops
(Dangel et al.): a subclass writes only :meth:`CurvatureOperator._matmat`.

Shapes: an operator of size ``n`` maps ``(n,)`` to ``(n,)`` (:meth:`matvec`) and ``(n, k)`` to
``(n, k)`` (:meth:`matmat`). Inputs are cast to the operator's dtype/device for the product and
the result is cast back to the input's dtype, so solvers keep their own state in float64 while a
float32 model computes the products (PEER_PITFALLS: float32 norms bias lambda_max).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from gradlab.core.errors import GradlabError


class CurvatureOperator(ABC):
    """A symmetric ``n x n`` linear map known only through products.

    Attributes:
        num_matvecs: how many matrix-vector products were computed so far (a ``matmat`` with
            ``k`` columns counts ``k``); solvers report differences of this counter.
    """

    def __init__(self, n: int, dtype: torch.dtype, device: torch.device):
        self.n = int(n)
        self.dtype = dtype
        self.device = torch.device(device)
        self.num_matvecs = 0

    @abstractmethod
    def _matmat(self, V: Tensor) -> Tensor:
        """``A @ V`` for ``V`` of shape ``(n, k)`` already in the operator's dtype and device."""

    def matmat(self, V: Tensor) -> Tensor:
        """``A @ V`` for ``V`` of shape ``(n, k)``; result in ``V``'s dtype and device."""
        if V.ndim != 2 or V.shape[0] != self.n:
            raise ValueError(f"matmat expects shape ({self.n}, k), got {tuple(V.shape)}")
        out = self._matmat(V.to(device=self.device, dtype=self.dtype))
        self.num_matvecs += V.shape[1]
        return out.to(device=V.device, dtype=V.dtype)

    def matvec(self, v: Tensor) -> Tensor:
        """``A @ v`` for ``v`` of shape ``(n,)``; result in ``v``'s dtype and device."""
        if v.ndim != 1:
            raise ValueError(f"matvec expects shape ({self.n},), got {tuple(v.shape)}")
        return self.matmat(v.unsqueeze(1)).squeeze(1)

    def to_dense(self) -> Tensor:
        """The full matrix from ``n`` products (small operators only; used by tests and debugging)."""
        eye = torch.eye(self.n, dtype=torch.float64, device=self.device)
        cols = [self.matmat(eye[:, i : i + 64]) for i in range(0, self.n, 64)]
        return torch.cat(cols, dim=1)


class DenseOperator(CurvatureOperator):
    """A dense symmetric tensor seen as an operator (the solvers' test reference)."""

    def __init__(self, A: Tensor):
        if A.ndim != 2 or A.shape[0] != A.shape[1]:
            raise GradlabError(f"a dense operator must be a square matrix, got shape {tuple(A.shape)}")
        super().__init__(A.shape[0], A.dtype, A.device)
        self.A = A

    def _matmat(self, V: Tensor) -> Tensor:
        return self.A @ V


def as_operator(A) -> CurvatureOperator:
    """Pass operators through; wrap a square tensor in :class:`DenseOperator`."""
    if isinstance(A, CurvatureOperator):
        return A
    if isinstance(A, Tensor):
        return DenseOperator(A)
    raise GradlabError(f"expected a CurvatureOperator or a square torch.Tensor, got {type(A).__name__}")
