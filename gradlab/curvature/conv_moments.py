"""The second moment of a stride-1 convolution's input patches without forming the patches.

K-FAC's input factor of a ``Conv2d`` (:mod:`gradlab.curvature.kfac`) needs, for the patches
``u`` (N, K, L) that ``F.unfold`` extracts (``K = C kh kw``, ``L`` output positions),

    core = sum_{n,l} u_nl u_nl^T   (K, K),     total = sum_{n,l} u_nl   (K,).

Through ``unfold`` that is a copy of the input ``kh kw`` times and ``K^2 N L`` multiply-adds.
At stride 1 (dilation 1) the patches are shifted copies of one image, so the block of ``core``
for kernel offsets ``k, k'`` is a windowed correlation of the input at the shift
``D = k' - k``:

    core[k, k'] = sum_{q in window(k)} x(q) x(q + D)^T      (C, C; x zero outside the image),

``window(k)`` the input positions that kernel offset ``k`` reads. Only ``(2 kh - 1)(2 kw - 1)``
shifts occur (25 for 3x3 against 81 blocks), and ``C_{-D} = C_D^T``. Each full correlation
``C_D`` (the sum over every position of the image) is one ``(C, M) x (M, C)`` product of two
slices of the input padded by ``kh - 1`` rows and ``kw - 1`` columns and flattened (a shift in
the flat index is the 2-D shift: the padding keeps it from wrapping into the next row or image),
so no shifted copy is made. A window differs from the whole image by at most ``kh - 1 - ph``
rows at the top or bottom and ``kw - 1 - pw`` columns at a side (one of each for a 3x3
convolution with padding 1); their terms are subtracted (rows and columns) and the corners added
back, all from small strips. The result equals the ``unfold`` moments up to rounding (tested
against them in float64); the work is about ``13 / 81`` of theirs for a 3x3 kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def applies(m: nn.Module, x: Tensor) -> bool:
    """Whether :func:`patch_moments` handles the convolution ``m`` on input ``x`` (N, C, H, W):
    stride 1, dilation 1, a kernel larger than 1x1, border strips at most half the image."""
    (kh, kw), (ph, pw) = m.kernel_size, m.padding
    if tuple(m.stride) != (1, 1) or tuple(m.dilation) != (1, 1) or kh * kw == 1 or x.dim() != 4:
        return False
    tr, tc = max(0, kh - 1 - ph), max(0, kw - 1 - pw)
    ho, wo = x.shape[2] + 2 * ph - kh + 1, x.shape[3] + 2 * pw - kw + 1
    return ho >= 1 and wo >= 1 and 2 * tr <= x.shape[2] and 2 * tc <= x.shape[3]


def _excluded(k: int, pad: int, out: int, size: int) -> list[int]:
    """Input rows (or columns) that kernel offset ``k`` never reads: outside ``[k - pad, k - pad + out)``."""
    lo, hi = k - pad, k - pad + out
    return [r for r in range(size) if r < lo or r >= hi]


def _shifted(a: Tensor, b: Tensor, d: int) -> Tensor:
    """``sum_f a_f b_{f+d}^T`` for (C, F) rows (``f + d`` outside ``[0, F)`` left out)."""
    f = a.shape[1]
    return a[:, : f - d] @ b[:, d:].T if d >= 0 else a[:, -d:] @ b[:, : f + d].T


def patch_moments(x: Tensor, kernel_size: tuple[int, int], padding: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """``(core, total)`` of ``F.unfold(x, kernel_size, padding=padding)`` at stride 1 (module docstring);
    ``core`` (K, K) and ``total`` (K,) in ``unfold``'s order ``(c, i, j)``."""
    (kh, kw), (ph, pw) = kernel_size, padding
    n, c, h, w = x.shape
    ho, wo = h + 2 * ph - kh + 1, w + 2 * pw - kw + 1
    pr, pc = kh - 1, kw - 1
    xp = F.pad(x, (pc, pc, pr, pr))  # (N, C, H2, W2), image at rows pr.., columns pc..
    w2 = w + 2 * pc
    flat = xp.transpose(0, 1).reshape(c, -1)  # (C, M)
    m = flat.shape[1]
    shifts = [(dr, dc) for dr in range(-pr, pr + 1) for dc in range(-pc, pc + 1)]
    index = {s: i for i, s in enumerate(shifts)}
    full = [None] * len(shifts)
    for dr, dc in shifts:  # C_D = sum_f x_f x_{f+d}^T, d the flat shift; C_{-D} = C_D^T
        d = dr * w2 + dc
        if d >= 0:
            full[index[(dr, dc)]] = flat[:, : m - d] @ flat[:, d:].T
    for dr, dc in shifts:
        if full[index[(dr, dc)]] is None:
            full[index[(dr, dc)]] = full[index[(-dr, -dc)]].T
    full = torch.stack(full)  # (S, C, C)

    ex_r = [_excluded(i, ph, ho, h) for i in range(kh)]
    ex_c = [_excluded(j, pw, wo, w) for j in range(kw)]
    rows = sorted({r for e in ex_r for r in e})
    cols = sorted({q for e in ex_c for q in e})

    s = len(shifts)
    row_t = x.new_zeros(kh, s, c, c)
    col_t = x.new_zeros(kw, s, c, c)
    corner_t = x.new_zeros(kh, kw, s, c, c)
    mem_r = x.new_tensor([[float(r in e) for r in rows] for e in ex_r])  # (kh, R)
    mem_c = x.new_tensor([[float(q in e) for q in cols] for e in ex_c])  # (kw, Q)
    if rows:  # per excluded row r: sum over n and columns of x(r, .) x(r + dr, . + dc)^T
        per_row = []
        for r in rows:
            lines = xp[:, :, r: r + 2 * pr + 1].permute(2, 1, 0, 3).reshape(2 * pr + 1, c, -1)  # (2pr+1, C, N W2)
            per_row.append(torch.stack([_shifted(lines[pr], lines[pr + dr], dc) for dr, dc in shifts]))
        row_t = torch.einsum("kr,rscd->kscd", mem_r, torch.stack(per_row))
    if cols:  # per excluded column, the same along the rows
        per_col = []
        for q in cols:
            lines = xp[:, :, :, q: q + 2 * pc + 1].permute(3, 1, 0, 2).reshape(2 * pc + 1, c, -1)  # (2pc+1, C, N H2)
            per_col.append(torch.stack([_shifted(lines[pc], lines[pc + dc], dr) for dr, dc in shifts]))
        col_t = torch.einsum("kq,qscd->kscd", mem_c, torch.stack(per_col))
        if rows:  # the corners, counted in both strips
            corner = torch.stack([torch.stack([
                torch.einsum("nc,ndij->ijcd", x[:, :, r, q], xp[:, :, r: r + 2 * pr + 1, q: q + 2 * pc + 1]).reshape(s, c, c)
                for q in cols]) for r in rows])  # (R, Q, S, C, C)
            corner_t = torch.einsum("ar,bq,rqscd->abscd", mem_r, mem_c, corner)

    i, j, i2, j2 = torch.meshgrid(*(torch.arange(k, device=x.device) for k in (kh, kw, kh, kw)), indexing="ij")
    d_idx = (i2 - i + pr) * (2 * pc + 1) + (j2 - j + pc)
    blocks = full[d_idx] - row_t[i, d_idx] - col_t[j, d_idx] + corner_t[i, j, d_idx]  # (kh, kw, kh, kw, C, C)
    core = blocks.permute(4, 0, 1, 5, 2, 3).reshape(c * kh * kw, c * kh * kw)

    # patch sums: sum over the window of each kernel offset, from the batch-summed image
    img = x.sum(0)  # (C, H, W)
    total = x.new_empty(c, kh, kw)
    for a in range(kh):
        r0, r1 = max(0, a - ph), min(h, a - ph + ho)
        for b in range(kw):
            c0, c1 = max(0, b - pw), min(w, b - pw + wo)
            total[:, a, b] = img[:, r0:r1, c0:c1].sum((1, 2))
    return core, total.reshape(-1)
