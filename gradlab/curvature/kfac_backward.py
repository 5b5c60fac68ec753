"""K-FAC's output-side statistics: all columns of the output factor in one batched backward pass.

The factor ``G`` of a layer is ``sum_k sum_r b_rk b_rk^T`` with ``b_k`` the gradient of
``z . S[k]`` back at the layer's output, for the ``K`` columns of ``S`` (K, N, C): the classes of
the type-2 factor, the Monte Carlo samples, or the one empirical column. Instead of ``K``
backward passes, :func:`output_moments` runs one ``torch.autograd.grad(..., is_grads_batched=True)``
(the backward pass vectorised over the columns) and takes the moment of the ``(K N, ...)``
gradients at once.

* **Memory**: the batched gradients of all layer outputs are ``K`` times the outputs' size (10x
  resnet20's activations at K = 10), so the columns go in chunks whose gradients stay within
  ``budget`` bytes (:data:`BUDGET`); a chunk is never smaller than one column.
* **CPU**: on a CPU a network with Conv2d outputs, or with large layer outputs, keeps one backward
  pass per column, which measured faster there (:func:`batches_well`).
* **No batching rule**: a backward that cannot be vectorised (an ``autograd.Function`` whose
  backward leaves torch, a ``.item()``) raises; the columns are then taken one backward pass each
  (the same sums). Ops merely lacking a fast batching rule run torch's own per-column fallback,
  correct and silent in this torch (its performance warning is opt-in).
* **fp16**: under fp16 autocast the layer outputs, hence their gradients, are float16, whose
  smallest positive value is about 6e-8; the columns of a confident model (``sqrt(p_k)`` with
  ``p_k ~ 1e-8``) vanish there. Each column ``k`` is then multiplied by a power of two ``s_k``
  bringing its largest entry to :data:`FP16_TARGET` before the backward pass, and its gradients
  are divided by ``s_k`` in float32 (exact) before the moment; a chunk whose gradients hold inf or
  NaN is retried with its scales halved (the idea of ``torch.amp.GradScaler``, per column, since
  the gradient is linear in each column separately). bfloat16 has float32's range and needs none.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from gradlab.curvature.cost import add_backward

#: Bytes the batched gradients of all layer outputs may take at once (one chunk of columns).
BUDGET = 2**28
#: On a CPU, the largest layer outputs of one column (bytes) for which the batched pass is used.
CPU_COLUMN_BYTES = 192 * 1024
#: Under fp16, each column is scaled so that its largest entry becomes this power of two.
FP16_TARGET = 2.0**10
#: fp16: how often a chunk's scales are halved after an overflow before its result is kept anyway.
MAX_HALVINGS = 40


def _column_scales(S: Tensor) -> Tensor:
    """Powers of two ``s_k`` (K,) with ``max |s_k S[k]|`` in ``[FP16_TARGET / 2, FP16_TARGET)``; 1
    for an all-zero column."""
    peak = S.detach().abs().flatten(1).amax(1).double()
    exp = torch.where(peak > 0, torch.floor(math.log2(FP16_TARGET) - torch.log2(peak.clamp_min(1e-300))),
                      torch.zeros_like(peak))
    return torch.exp2(exp.clamp(-100, 100)).to(S.dtype)


def batches_well(outs: Sequence[Tensor]) -> bool:
    """Whether the vectorised backward is expected to be the faster one: always on an accelerator
    (fewer, larger kernels); on a CPU only for small columns of networks without convolutions.
    There the backward is bound by arithmetic, and batching saves only per-pass overhead: on the
    digits MLP (K = 10) 0.75x the loop's time at batch 64-128, break-even at 192 and 1.3-1.5x
    at 384-512 (at most :data:`CPU_COLUMN_BYTES` of layer outputs per column pays); with Conv2d
    outputs (4-D) a convolution's input gradient over ``c`` columns folded into the batch is
    1.5-1.9x slower than ``c`` separate ones, and ``is_grads_batched`` has no batching rule for
    ``convolution_backward`` (it loops over the columns and concatenates), so on the benchmark CNNs
    the batched pass was slower (benchmarks/RESULTS.md)."""
    if any(o.device.type != "cpu" for o in outs):
        return True
    return all(o.dim() != 4 for o in outs) and sum(o.numel() * o.element_size() for o in outs) <= CPU_COLUMN_BYTES


def _grads(z: Tensor, outs: Sequence[Tensor], cols: Tensor, retain: bool) -> list[Optional[Tensor]]:
    """The gradients ``(c, *out.shape)`` of ``z . cols[k]`` at each output (None: it does not reach
    ``z``): one batched backward pass for ``c > 1`` columns, a plain one for a single column."""
    if cols.shape[0] == 1:
        grads = torch.autograd.grad(z, outs, cols[0], retain_graph=retain, allow_unused=True)
        return [None if g is None else g.unsqueeze(0) for g in grads]
    return list(torch.autograd.grad(z, outs, cols, retain_graph=retain, allow_unused=True, is_grads_batched=True))


def _scaled_grads(z: Tensor, outs: Sequence[Tensor], part: Tensor, s: Optional[Tensor],
                  retain: bool) -> tuple[list[Optional[Tensor]], Optional[Tensor]]:
    """:func:`_grads` of ``part``, each column times ``s`` (fp16; None: unscaled), halving ``s``
    while the gradients overflow; returns the gradients and the scales they were taken with."""
    if s is None:
        return _grads(z, outs, part, retain), None
    for tries in range(MAX_HALVINGS + 1):
        grads = _grads(z, outs, part * s.view(-1, *[1] * (part.dim() - 1)), True)
        if all(g is None or bool(torch.isfinite(g).all()) for g in grads):
            break  # (else: overflow at every scale tried; the inf/NaN are left to show)
        s = s / 2
    return grads, s


def output_moments(z: Tensor, outs: Sequence[Tensor], S: Tensor, moment: Callable[[Tensor], Tensor], *,
                   dtype: Optional[torch.dtype] = None, budget: Optional[int] = None,
                   batched: Optional[bool] = None) -> list[Optional[Tensor]]:
    """``sum_k moment(b_k)`` for each of ``outs``, ``b_k = d(z . S[k]) / d out`` (module docstring).

    Args:
        z: the outputs with their graph; the last backward pass frees the graph unless a fallback
            or an fp16 retry might still need it (then the caller's references free it).
        outs: tensors on the path to ``z`` (the layers' outputs); one that ``z`` does not depend on
            gives None.
        S: the columns (K, *z.shape), in ``z``'s dtype.
        moment: the moment of a gradient batch ``(c N, *out.shape[1:])`` (K-FAC's ``output_moment``).
        dtype: the moments' dtype (default ``z``'s): gradients in another one (fp16/bf16 under
            autocast) are converted first.
        budget: bytes the batched gradients of one chunk may take (default :data:`BUDGET`); a
            budget below one column's gradients means one backward pass per column.
        batched: False: one backward pass per column (the reference loop); True: batched chunks;
            None (default): :func:`batches_well` of ``outs``.
    """
    batched = batches_well(outs) if batched is None else batched
    dtype = dtype or z.dtype
    K = S.shape[0]
    per_column = sum(o.numel() for o in outs) * torch.finfo(dtype).bits // 8
    budget = BUDGET if budget is None else budget
    chunk = max(1, min(K, budget // max(per_column, 1))) if batched else 1
    scales = _column_scales(S) if any(o.dtype == torch.float16 for o in outs) else None
    G: list[Optional[Tensor]] = [None] * len(outs)
    tested = chunk == 1  # plain backward passes need no fallback; batched ones once one has worked
    start = 0
    while start < K:
        stop = min(K, start + chunk)
        s = None if scales is None else scales[start:stop]
        try:
            grads, s = _scaled_grads(z, outs, S[start:stop], s, retain=not (stop == K and tested))
        except RuntimeError:  # e.g. "Batching rule not implemented": one backward pass per column
            if tested:
                raise
            chunk = tested = 1
            continue
        tested = True
        add_backward(stop - start - 1, z.shape[0])  # c columns in one pass: c passes' work (cost accounting)
        with torch.autocast(z.device.type, enabled=False):  # the moments in ``dtype``, never in fp16
            for j, g in enumerate(grads):
                if g is None:
                    continue
                g = g.to(dtype)
                if s is not None:  # unscale in the moments' dtype (a power of two: exact)
                    g = g / s.to(dtype).view(-1, *[1] * (g.dim() - 1))
                m = moment(g.flatten(0, 1))
                G[j] = m if G[j] is None else G[j].add_(m)
        start = stop
    return G
