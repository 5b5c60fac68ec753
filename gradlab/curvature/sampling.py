"""Random probe vectors for every stochastic curvature estimator: Rademacher and Gaussian.

Hutchinson-type estimators (Hutchinson 1989; Bekas, Kokiopoulou & Saad 2007) need probe vectors
``z`` with ``E[z z^T] = I``; Lanczos needs random start and restart vectors. Every draw in the
curvature engine and in the optimizers built on it comes from here, from an explicit
``torch.Generator`` (the global RNG is never touched when one is given):

* :func:`rademacher` / :func:`gaussian`: one tensor of any shape (a flat ``(n,)`` vector, an
  ``(n, k)`` block of ``k`` probes, a ``(B, D)`` batch).
* :func:`rademacher_like` / :func:`gaussian_like`: one tensor per parameter, with each one's
  shape, dtype and device.

Draws happen on the generator's device (without a generator: from torch's global CPU RNG), so a
CPU generator or ``torch.manual_seed`` gives the same probes whether the model is on CPU or GPU;
the result is then moved to the requested device. Pass a CUDA generator to draw on the GPU.

Rademacher signs come from random bytes: one byte gives eight signs through a 256-row table, and
all tensors of one dtype and device share one draw (returned as views of it). That is one eighth
of the random numbers of one ``randint(0, 2)`` per entry, and faster at every size
measured (a few thousand to a million entries, CPU).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

_SIGN_TABLES: dict = {}


def make_generator(seed: Optional[int], device="cpu") -> torch.Generator:
    """A generator on ``device`` seeded with ``seed`` (or from the global RNG when ``seed`` is None)."""
    g = torch.Generator(device=device)
    g.manual_seed(int(seed) if seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
    return g


def _draw_device(generator: Optional[torch.Generator]) -> torch.device:
    return torch.device("cpu") if generator is None else generator.device


def _sign_table(dtype: torch.dtype, device: torch.device) -> Tensor:
    """(256, 8) table whose row b holds the eight bits of b as +-1 (bit 0 first)."""
    key = (dtype, str(device))
    table = _SIGN_TABLES.get(key)
    if table is None:
        bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1
        table = _SIGN_TABLES[key] = (bits * 2 - 1).to(dtype=dtype, device=device)
    return table


def _signs(n: int, generator: Optional[torch.Generator], dtype: torch.dtype, device) -> Tensor:
    """``n`` independent +-1 entries, flat, in ``dtype`` on ``device`` (the byte-table draw)."""
    draw_device = _draw_device(generator)
    byte = torch.randint(0, 256, ((n + 7) // 8,), generator=generator, device=draw_device)
    return torch.index_select(_sign_table(dtype, draw_device), 0, byte).view(-1)[:n].to(device)


def rademacher(shape, generator: Optional[torch.Generator] = None, *, dtype: torch.dtype = torch.float64,
               device=None) -> Tensor:
    """Independent +-1 entries of shape ``shape`` (e.g. ``(n,)`` or ``(n, k)``).

    Args:
        shape: an int or a tuple of ints.
        generator: the source of randomness (None: torch's global CPU RNG).
        dtype: the result's dtype (a floating or integer dtype).
        device: the result's device (default: the generator's, else CPU).
    Returns:
        A tensor of ``shape``; ``E[z z^T] = I`` over its flattened entries.
    """
    shape = (int(shape),) if isinstance(shape, int) else tuple(int(s) for s in shape)
    device = _draw_device(generator) if device is None else torch.device(device)
    return _signs(_numel(shape), generator, dtype, device).view(shape)


def rademacher_like(tensors: Sequence[Tensor], generator: Optional[torch.Generator] = None) -> list[Tensor]:
    """Independent +-1 entries with the shapes, dtypes and devices of ``tensors``.

    All tensors of one dtype and device share one draw (the results are views of it), so the
    cost is one ``randint`` per group rather than one per tensor.
    """
    out: list = [None] * len(tensors)
    groups: dict = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.dtype, t.device), []).append(i)
    for (dtype, device), idx in groups.items():
        sizes = [tensors[i].numel() for i in idx]
        flat = _signs(sum(sizes), generator, dtype, device)
        for i, part in zip(idx, torch.split(flat, sizes)):
            out[i] = part.view(tensors[i].shape)
    return out


def gaussian(shape, generator: Optional[torch.Generator] = None, *, dtype: torch.dtype = torch.float64,
             device=None) -> Tensor:
    """Independent standard normal entries of shape ``shape``, drawn in ``dtype`` on the
    generator's device and moved to ``device`` (default: the generator's, else CPU)."""
    shape = (int(shape),) if isinstance(shape, int) else tuple(int(s) for s in shape)
    draw_device = _draw_device(generator)
    z = torch.randn(shape, generator=generator, dtype=dtype, device=draw_device)
    return z if device is None else z.to(device)


def gaussian_like(tensors: Sequence[Tensor], generator: Optional[torch.Generator] = None, *,
                  dtype: Optional[torch.dtype] = None) -> list[Tensor]:
    """One standard normal tensor per entry of ``tensors`` (its shape and device; its dtype unless
    ``dtype`` is given), drawn one after the other from ``generator``."""
    return [gaussian(t.shape, generator, dtype=t.dtype if dtype is None else dtype, device=t.device)
            for t in tensors]


def _numel(shape: tuple) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
