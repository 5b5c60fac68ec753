"""Per-example Jacobians of a batched map: dense, and their Gram matrices applied matrix-free.

:func:`per_example_jacobian` and :func:`singular_values` are the dense path (every singular
value); :class:`JacobianGram` is the operator for Lanczos when the maps are too large for it.

For a map ``f`` applied to a batch ``h`` (B, *in) that treats examples independently (every zoo
model in eval mode does), the Jacobian of the batched map is block-diagonal with one block
``J_b`` (m, n) per example, ``m`` = output numel and ``n`` = input numel of one example. The
Gram matrix of each block on its smaller side,

    G_b = J_b^T J_b  (n x n, when n <= m)    or    G_b = J_b J_b^T  (m x m, otherwise),

has the squared singular values of ``J_b`` as its non-zero eigenvalues. :class:`JacobianGram`
applies all ``B`` of them at once: ``V`` (B, p) -> ``(G_1 v_1, ..., G_B v_B)`` (B, p), the
``matvec`` that :func:`gradlab.curvature.batched.batched_lanczos` takes, with ``p = min(m, n)``.

One forward pass is recorded and reused by every product: ``J^T u`` is a backward pass, and
``J v`` is the derivative of the (linear in ``u``) map ``u -> J^T u`` in direction ``v`` (the
double-backward trick; Pearlmutter 1994 for the R-operator idea), which needs no second forward
pass and no forward-mode support from the model's layers. Products take and return float64 (the
Lanczos basis is float64) and run in the map's own dtype.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from torch.func import jvp, vjp, vmap

from gradlab.curvature.sampling import rademacher


def per_example_jacobian(fn: Callable[[Tensor], Tensor], h: Tensor) -> Tensor:
    """Dense per-example Jacobians ``(B, m, n)`` of a batched map ``fn`` at ``h`` (B, ...).

    ``fn`` must treat examples independently (every zoo model in eval mode does), so the
    Jacobian of the batched map is block-diagonal. Then ``vmap`` over the one-hot basis of the
    output of one vector-Jacobian product of the *batched* map (the rows of every example's
    Jacobian at once: ``jacrev``'s construction, m products) or, when the input is the smaller
    side, over the input basis of a Jacobian-vector product (``jacfwd``'s, n products). Running
    the batched map instead of ``vmap`` over single examples keeps convolutions batched (several
    times faster on a ResNet block on CPU).
    """
    b = h.shape[0]
    with torch.no_grad():
        out = fn(h[:1])
    m, n = out[0].numel(), h[0].numel()
    if m <= n:
        out, pullback = vjp(fn, h)
        basis = torch.eye(m, dtype=out.dtype, device=out.device).view(m, 1, *out.shape[1:])
        rows = vmap(lambda u: pullback(u)[0])(basis.expand(m, *out.shape))  # (m, B, *in)
        return rows.reshape(m, b, n).transpose(0, 1).contiguous()  # contiguous: later casts read memory in order
    basis = torch.eye(n, dtype=h.dtype, device=h.device).view(n, 1, *h.shape[1:])
    cols = vmap(lambda v: jvp(fn, (h,), (v,))[1])(basis.expand(n, *h.shape))  # (n, B, *out)
    return cols.reshape(n, b, m).permute(1, 2, 0).contiguous()


def singular_values(jac: Tensor) -> Tensor:
    """Singular values (B, min(m, n)) float64, descending, of per-example Jacobians (B, m, n).

    A very rectangular Jacobian (the end-to-end map: classes x input pixels) goes through the
    float64 eigenvalues of its small Gram matrix, far cheaper than an SVD; the Gram's float64
    rounding (~1e-16 of the largest squared value) is far below the float32 Jacobian's own.
    Near-square maps use ``svdvals`` directly.
    """
    m, n = jac.shape[-2:]
    if 4 * min(m, n) > max(m, n):
        return torch.linalg.svdvals(jac).double()
    j64 = jac.double()
    gram = j64 @ j64.transpose(-1, -2) if m <= n else j64.transpose(-1, -2) @ j64
    return torch.linalg.eigvalsh(gram).clamp_min(0).sqrt().flip(-1)


class JacobianGram:
    """Block-diagonal per-example Gram operator of ``fn`` at ``h`` (see the module docstring).

    Args:
        fn: the batched map, ``(B, *in) -> (B, *out)``, examples independent.
        h: the point, shape (B, *in); it is detached, so no gradient reaches it.
    Attributes:
        batch, in_dim, out_dim: ``B``, ``n`` and ``m``; ``size``: ``p = min(m, n)``;
        side: ``"input"`` (``G = J^T J``) or ``"output"`` (``G = J J^T``);
        num_products: batched Gram products so far (each serves every example once).
    """

    def __init__(self, fn: Callable[[Tensor], Tensor], h: Tensor):
        with torch.enable_grad():
            self._h = h.detach().requires_grad_(True)
            self._out = fn(self._h)
            self._dummy = torch.zeros_like(self._out, requires_grad=True)
            # J^T dummy, kept with its graph: its derivative in dummy is J (double backward)
            self._jt_dummy = torch.autograd.grad(self._out, self._h, self._dummy, create_graph=True)[0]
        self.batch = h.shape[0]
        self.in_dim = h[0].numel()
        self.out_dim = self._out[0].numel()
        self.side = "input" if self.in_dim <= self.out_dim else "output"
        self.size = min(self.in_dim, self.out_dim)
        self.dtype = h.dtype
        self.device = h.device
        self.num_products = 0

    def jvp(self, v: Tensor) -> Tensor:
        """``J_b v_b`` for every example: (B, n) -> (B, m), float64."""
        with torch.enable_grad():
            r = torch.autograd.grad(self._jt_dummy, self._dummy, v.to(self.dtype).view_as(self._h),
                                    retain_graph=True)[0]
        return r.reshape(self.batch, self.out_dim).double()

    def vjp(self, u: Tensor) -> Tensor:
        """``J_b^T u_b`` for every example: (B, m) -> (B, n), float64."""
        with torch.enable_grad():
            r = torch.autograd.grad(self._out, self._h, u.to(self.dtype).view_as(self._out), retain_graph=True)[0]
        return r.reshape(self.batch, self.in_dim).double()

    def __call__(self, v: Tensor) -> Tensor:
        """``G_b v_b`` for every example: (B, p) -> (B, p), float64."""
        self.num_products += 1
        if self.side == "input":
            return self.vjp(self.jvp(v))
        return self.jvp(self.vjp(v))

    matvec = __call__

    def moments(self, num_probes: int = 16, generator: Optional[torch.Generator] = None) -> Tensor:
        """Hutchinson estimates (Hutchinson 1990) of ``(tr G_b / p, tr G_b^2 / p)``, shape (B, 2).

        With ``z`` Rademacher, ``E[z^T G z] = tr G`` and ``E[|G z|^2] = tr G^2``; ``tr G / p`` is
        the mean squared singular value of ``J_b`` over its ``p`` singular values.
        """
        b, p = self.batch, self.size
        out = torch.zeros(b, 2, dtype=torch.float64, device=self.device)
        for _ in range(num_probes):
            z = rademacher((b, p), generator, device=self.device)
            gz = self(z)
            out[:, 0] += (z * gz).sum(-1)
            out[:, 1] += gz.pow(2).sum(-1)
        return out / (num_probes * p)

    def to_dense(self) -> Tensor:
        """The ``B`` Gram matrices (B, p, p) from ``p`` products (small maps; tests)."""
        eye = torch.eye(self.size, dtype=torch.float64, device=self.device)
        cols = [self(eye[i].expand(self.batch, self.size)) for i in range(self.size)]
        return torch.stack(cols, dim=-1)


__all__ = ["JacobianGram", "per_example_jacobian", "singular_values"]
