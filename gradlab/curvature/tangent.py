"""Forward-mode ``J v`` that reuses the kept forward pass's layer outputs.

``torch.func.jvp`` (or dual tensors) of a network recomputes the primal forward pass along with
the tangents: for a convolution ``y = conv(x, W) + b`` it computes ``conv(x, W)`` again, then the
tangent ``dy = conv(dx, W) + conv(x, dW) + db``, so a third of the convolution work of every
``J v`` is the primal that the operator already computed (and keeps, for ``J^T w``). Eval-mode
BatchNorm adds its general (batch-statistics) tangent formula on top.

:class:`CachedTangents` records, during that kept forward pass, the inputs and outputs of the
layers whose tangents have a closed form in them: ``Conv1d/2d/3d`` (zero padding), ``Linear``
and BatchNorm in eval mode (running statistics: an affine map per channel). In the tangent pass
those layers return the recorded output as the primal and compute only the tangent from the
recorded input: ``dy = conv(dx, W) + conv(x, dW) + db`` (the terms whose tangent is absent are
skipped), ``dy = dx s + dgamma xhat + dbeta`` for BatchNorm (``s = gamma / sqrt(var + eps)``).
Every other operation (activations, additions, pooling, layers of other types) runs under dual
tensors as before. The result equals the plain dual-tensor ``J v`` up to rounding (tested
against ``torch.func.jvp`` and dense Jacobians).

A layer is replaced only if its type is exactly one of those (a subclass may override
``forward``) and it is called, in the tangent pass, in the same order and with inputs of the
same shape as in the recorded pass; otherwise the tangent pass falls back to the plain one.
"""

from __future__ import annotations

import contextlib

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor, nn

CONVS = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class Mismatch(Exception):
    """The tangent pass called a recorded layer differently from the recorded pass."""


def cacheable(m: nn.Module) -> bool:
    """Whether ``m``'s tangent is computed from its recorded input and output (module docstring)."""
    t = type(m)
    if "forward" in vars(m):  # the instance's forward already replaced (by its user): leave it
        return False
    if t in CONVS:
        return m.padding_mode == "zeros"
    if t is nn.Linear:
        return True
    if t in NORMS:  # eval mode with running statistics: an affine map per channel
        return not m.training and m.running_mean is not None and m.running_var is not None
    return False


def _split(t):
    """``(primal, tangent or None)`` of a dual tensor, parameter or plain tensor."""
    if t is None:
        return None, None
    p, d = fwAD.unpack_dual(t)
    return p, d


def _conv_tangent(m: nn.Module, x: Tensor, dx, w: Tensor, dw, db):
    conv = CONVS[type(m)]
    kw = dict(stride=m.stride, padding=m.padding, dilation=m.dilation, groups=m.groups)
    dy = None
    if dx is not None:
        dy = conv(dx, w, None, **kw)
    if dw is not None:
        t = conv(x, dw, None, **kw)
        dy = t if dy is None else dy.add_(t)
    if db is not None:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        dy = db.view(shape) if dy is None else dy.add_(db.view(shape))
    return dy


def _linear_tangent(x: Tensor, dx, w: Tensor, dw, db):
    dy = None
    if dx is not None:
        dy = F.linear(dx, w)
    if dw is not None:
        t = F.linear(x, dw)
        dy = t if dy is None else dy.add_(t)
    if db is not None:
        dy = db if dy is None else dy.add_(db)
    return dy


def _norm_affine(m: nn.Module, x: Tensor, w, dims: int) -> tuple[Tensor, Tensor]:
    """Eval-mode BatchNorm as ``y = x * scale + shift`` per channel (shapes broadcast on ``x``)."""
    shape = (1, -1) + (1,) * (dims - 2)
    inv = torch.rsqrt(m.running_var + m.eps)
    scale = inv if w is None else inv * w
    shift = -m.running_mean * scale
    return scale.view(shape), shift.view(shape)


def _norm_tangent(m: nn.Module, x: Tensor, dx, dw, db, scale: Tensor):
    """``dx * scale + dgamma * xhat + dbeta`` with ``xhat = (x - mean) / sqrt(var + eps)``, the
    ``x`` terms folded into one per-channel affine map of ``x``."""
    shape = scale.shape
    const = None if db is None else db.view(shape)
    dy = None
    if dw is not None:
        a = torch.rsqrt(m.running_var + m.eps) * dw
        c = -m.running_mean * a
        const = c.view(shape) if const is None else const + c.view(shape)
        dy = torch.addcmul(const, x, a.view(shape))
    if dx is not None:
        dy = dx * scale if dy is None else dy.addcmul_(dx, scale)
        if dw is None and const is not None:
            dy.add_(const)
    return const if dy is None else dy


class CachedTangents:
    """Records the cacheable layers' inputs and outputs in one forward pass (:meth:`record`) and
    replays them in dual-tensor passes (:meth:`replay`); module docstring."""

    def __init__(self, model: nn.Module):
        self.layers = [m for m in model.modules() if cacheable(m)]
        self.calls: dict[int, list[tuple[Tensor, Tensor]]] = {id(m): [] for m in self.layers}

    @contextlib.contextmanager
    def record(self):
        def hook(m, inputs, out):
            if len(inputs) == 1 and isinstance(inputs[0], Tensor) and isinstance(out, Tensor):
                # outputs copied: a later in-place operation (a ReLU(inplace=True)) may change them;
                # inputs are saved by autograd for J^T w, which fails if they change
                kept = None if type(m) in NORMS else out.detach().clone()
                self.calls[id(m)].append((inputs[0].detach(), kept))

        handles = [m.register_forward_hook(hook) for m in self.layers]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @contextlib.contextmanager
    def replay(self):
        """Inside a ``fwAD.dual_level``: the recorded layers return ``make_dual(output, tangent)``."""
        counters = {id(m): 0 for m in self.layers}

        def make(m):
            def forward(inp):
                k = counters[id(m)]
                recorded = self.calls[id(m)]
                x_in, dx = _split(inp)
                if k >= len(recorded) or recorded[k][0].shape != x_in.shape:
                    raise Mismatch
                counters[id(m)] = k + 1
                x, out = recorded[k]
                w, dw = _split(getattr(m, "weight", None))
                b, db = _split(getattr(m, "bias", None))
                if type(m) in CONVS:
                    dy = _conv_tangent(m, x, dx, w, dw, db)
                elif type(m) is nn.Linear:
                    dy = _linear_tangent(x, dx, w, dw, db)
                else:
                    scale, shift = _norm_affine(m, x, w, x.dim())
                    if b is not None:
                        shift = shift + b.view(shift.shape)
                    dy = _norm_tangent(m, x, dx, dw, db, scale)
                    out = torch.addcmul(shift, x, scale)  # fresh: the caller may change it in place
                if out is recorded[k][1]:
                    out = out.clone()  # fresh, as above
                if dy is None:
                    return out
                return fwAD.make_dual(out, dy if dy.shape == out.shape else dy.expand_as(out).contiguous())

            return forward

        for m in self.layers:
            m.forward = make(m)
        try:
            yield
        finally:
            for m in self.layers:
                del m.forward
