"""The per-layer pieces of the Gauss-Newton trace (:mod:`gradlab.curvature.gauss_newton`).

A :class:`Layer` wraps one parameterised module of the network and answers two questions about
the per-example Jacobian ``J_n`` of the module's output with respect to its own weight and bias,
without ever forming a per-example gradient where it can avoid it:

* :meth:`Layer.sqnorm`: ``|J_n^T g_n|^2`` for an output gradient ``g`` (the "ghost norm" of
  Goodfellow 2015, "Efficient per-example gradient computations"), summed into ``tr(G)``;
* :meth:`Layer.perturbation`: a random output perturbation with the covariance of ``J_n v``
  for a Rademacher parameter vector ``v`` drawn per example (Martens, Sutskever & Swersky,
  "Estimating the Hessian by back-propagating curvature", ICML 2012), for the residual estimate.

Supported: ``Linear``, ``Conv1d``/``Conv2d`` (groups 1, zero padding), ``BatchNorm`` in eval
mode, ``LayerNorm``, ``GroupNorm``; anything else raises :class:`Unsupported`.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradlab.curvature.sampling import rademacher
from gradlab.core.errors import GradlabError
from gradlab.core.modelstate import BATCH_NORMS

#: Modules whose weight and bias the Gauss-Newton trace differentiates.
SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d, BATCH_NORMS, nn.LayerNorm, nn.GroupNorm)


class Unsupported(GradlabError):
    """The model or loss falls outside what the Gauss-Newton trace handles (the message says why)."""


def _trained(module: nn.Module, name: str, wanted: set) -> bool:
    p = getattr(module, name, None)
    return isinstance(p, nn.Parameter) and id(p) in wanted


def _unfold(module, a: Tensor) -> Tensor:
    """Patches ``(N, K, L)`` of a Conv1d/Conv2d input (Conv1d as a 1 x k Conv2d)."""
    if isinstance(module, nn.Conv1d):
        ks, st, pd, dl = (1,) + module.kernel_size, (1,) + module.stride, (0,) + module.padding, (1,) + module.dilation
        a = a.unsqueeze(2)
    else:
        ks, st, pd, dl = module.kernel_size, module.stride, module.padding, module.dilation
    return F.unfold(a, ks, dilation=dl, padding=pd, stride=st)


def _normalized(module, a: Tensor) -> Tensor:
    """The normalised input ``x_hat`` that a norm layer's weight multiplies."""
    if isinstance(module, BATCH_NORMS):
        shape = (1, -1) + (1,) * (a.dim() - 2)
        return (a - module.running_mean.view(shape)) * torch.rsqrt(module.running_var.view(shape) + module.eps)
    if isinstance(module, nn.GroupNorm):
        return F.group_norm(a, module.num_groups, eps=module.eps)
    return F.layer_norm(a, module.normalized_shape, eps=module.eps)


class Layer:
    """One parameterised layer: its input, the zero perturbation added to its output, and
    which of its weight/bias are differentiated."""

    def __init__(self, module: nn.Module, wanted: set):
        self.module = module
        self.w = _trained(module, "weight", wanted)
        self.b = _trained(module, "bias", wanted)
        self.a: Optional[Tensor] = None
        self.eps: Optional[Tensor] = None
        self.calls = 0
        self._cache: Optional[Tensor] = None  # patches (conv) or x_hat (norms)
        self._utu: Optional[Tensor] = None  # conv: patch Gram matrices, for the ghost norm
        self._sqrt_cov: Optional[Tensor] = None  # conv: square root of the output covariance

    def check(self) -> None:
        m = self.module
        if isinstance(m, (nn.Conv1d, nn.Conv2d)):
            if m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str):
                raise Unsupported(f"{type(m).__name__} with groups/padding mode/string padding is not supported")
        if isinstance(m, BATCH_NORMS) and (m.training or m.running_mean is None):
            raise Unsupported("BatchNorm in train mode couples the examples of a batch")

    # products with the per-example parameter Jacobian of this layer --------------------
    def prepare(self) -> None:
        m, a = self.module, self.a
        if isinstance(m, (nn.Conv1d, nn.Conv2d)):
            self._cache = _unfold(m, a)
        elif isinstance(m, (BATCH_NORMS, nn.GroupNorm, nn.LayerNorm)):
            self._cache = _normalized(m, a)
        elif isinstance(m, nn.Linear):
            self._cache = a.reshape(a.shape[0], -1, a.shape[-1])  # (N, T, in)
            self._a2 = self._cache[:, 0].pow(2).sum(1)  # |a_n|^2, used when T == 1

    def sqnorm(self, g: Tensor) -> Tensor:
        """Per-example ``|d(g_n . out_n) / d theta|^2`` for an output gradient ``g`` of shape
        ``(N, *out)``: shape ``(N,)``."""
        m, n = self.module, g.shape[0]
        out = g.new_zeros(n)
        if isinstance(m, nn.Linear):
            A = self._cache
            G = g.reshape(n, -1, g.shape[-1])
            if A.shape[1] == 1:  # the usual (N, in) input: ghost norm, nothing per example is formed
                g2 = G[:, 0].pow(2).sum(1)
                if self.w:
                    out += g2 * self._a2
                if self.b:
                    out += g2
                return out
            if self.w:  # per-example weight gradients: (N, out, T) @ (N, T, in)
                out += torch.bmm(G.transpose(1, 2), A).pow(2).sum((1, 2))
            if self.b:
                out += G.sum(1).pow(2).sum(1)
            return out
        if isinstance(m, (nn.Conv1d, nn.Conv2d)):
            G = g.reshape(n, g.shape[1], -1)  # (N, O, L)
            U = self._cache  # (N, K, L)
            o, kk, ll = G.shape[1], U.shape[1], U.shape[2]
            if self.w and ll * (o + kk) < o * kk:
                # ghost norm |G U^T|_F^2 = <G^T G, U^T U>: L x L Gram matrices, cheaper when the
                # output has few positions (the same choice as Opacus' ghost clipping)
                if self._utu is None:
                    self._utu = torch.bmm(U.transpose(1, 2), U)  # (N, L, L)
                out += (torch.bmm(G.transpose(1, 2), G) * self._utu).sum((1, 2))
            elif self.w:  # per-example weight gradients: (N, O, L) @ (N, L, K)
                out += torch.bmm(G, U.transpose(1, 2)).pow(2).sum((1, 2))
            if self.b:
                out += G.sum(2).pow(2).sum(1)
            return out
        # norm layers: per-channel (BatchNorm, GroupNorm) or elementwise (LayerNorm) affine,
        # shared across the dimensions summed here
        if isinstance(m, nn.LayerNorm):
            dims = tuple(range(1, g.dim() - len(m.normalized_shape)))
        else:
            dims = tuple(range(2, g.dim()))
        if self.w:
            t = g * self._cache
            out += (t.sum(dims) if dims else t).pow(2).flatten(1).sum(1)
        if self.b:
            out += (g.sum(dims) if dims else g).pow(2).flatten(1).sum(1)
        return out

    def perturbation(self, gen: torch.Generator) -> Tensor:
        """A random output perturbation whose per-example covariance equals that of
        ``J_theta v`` for a Rademacher parameter vector ``v`` drawn independently per example."""
        m, e = self.module, self.eps
        n, dt, dev = e.shape[0], e.dtype, e.device

        def rad(*shape):
            return rademacher(shape, gen, dtype=dt, device=dev)

        if isinstance(m, nn.Linear):
            A = self._cache
            if A.shape[1] == 1:
                scale = (self._a2 if self.w else 0.0) + (1.0 if self.b else 0.0)
                return rad(*e.shape) * torch.as_tensor(scale, dtype=dt, device=dev).sqrt().reshape(-1, 1)
            d = torch.zeros(n, A.shape[1], m.out_features, dtype=dt, device=dev)
            if self.w:
                d += torch.bmm(A, rad(n, m.in_features, m.out_features))
            if self.b:
                d += rad(n, 1, m.out_features)
            return d.reshape(e.shape)
        if isinstance(m, (nn.Conv1d, nn.Conv2d)):
            U = self._cache  # (N, K, L)
            k, ll = U.shape[1], U.shape[2]
            if self.w and ll < k:
                # fewer positions than patch entries: draw Rademacher in output space and shape it
                # by S = (U^T U [+ 1 1^T])^(1/2), the same covariance from L instead of K draws per
                # channel (random numbers dominate the cost here; the spread also drops, 0.38 -> 0.21-0.27 on
                # the benchmark CNN)
                if self._sqrt_cov is None:
                    cov = torch.bmm(U.transpose(1, 2), U)
                    if self.b:
                        cov += 1.0
                    lam, q = torch.linalg.eigh(cov)  # symmetric root: 10% less spread than Cholesky's
                    self._sqrt_cov = (q * lam.clamp_min(0).sqrt().unsqueeze(1)) @ q.transpose(1, 2)
                return torch.bmm(rad(n, m.out_channels, ll), self._sqrt_cov).reshape(e.shape)
            d = torch.zeros(n, m.out_channels, ll, dtype=dt, device=dev)
            if self.w:
                d += torch.bmm(rad(n, m.out_channels, k), U)
            if self.b:
                d += rad(n, m.out_channels, 1)
            return d.reshape(e.shape)
        if isinstance(m, nn.LayerNorm):
            k = len(m.normalized_shape)
            shape = (n,) + (1,) * (e.dim() - 1 - k) + tuple(m.normalized_shape)
        else:
            shape = (n, e.shape[1]) + (1,) * (e.dim() - 2)
        d = torch.zeros_like(e)
        if self.w:
            d += rad(*shape) * self._cache
        if self.b:
            d += rad(*shape)
        return d
