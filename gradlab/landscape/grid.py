"""Loss and accuracy on a grid of points ``theta + sum_k c_k d_k`` around a model's weights.

The model is never copied and never goes through ``load_state_dict``. Two ways to put a grid
point's weights ``base + c_1 d_1 (+ c_2 d_2)`` in place, both leaving the module's parameters,
buffers, ``requires_grad`` flags and train/eval mode exactly as they were:

* ``method="inplace"`` (default): write them into the parameters' storage with two fused adds per
  parameter (no allocation) and call the model directly; the original values, saved once, are
  copied back bit for bit in a ``finally`` block (also on an exception or Ctrl-C).
* ``method="functional"``: build new tensors and call ``torch.func.functional_call`` with the
  model's own buffers; nothing is ever written to the module. Measured on this machine's CPU it
  costs ~0.15 ms more per point than ``inplace`` (its per-call re-parametrisation), which for a
  small MLP (0.6 ms forward) is the difference between ~1.2x and ~1.45x a forward pass.

With ``points_per_call > 1`` several grid points go through one ``torch.func.vmap``-ed functional
call (a batched matmul/conv over stacked weights), which pays off where kernels are launch-bound
(GPU); on a CPU one point per call measured fastest (``benchmarks/bench_landscape.py``: 4 and 16
points per call were 1.2-16x slower, grouped convolutions worst), hence the default.

The evaluation batch(es) are moved to the device once. Under ``torchrun`` (an initialised
``torch.distributed`` process group) every rank evaluates the points ``rank, rank + world, ...``
and the results are summed across ranks, so every rank (rank 0 included) holds the whole grid.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

from gradlab.core.autocast import DTYPES, autocast, upcast
from gradlab.core.errors import GradlabError
from gradlab.core.modelstate import model_state


@dataclass
class GridResult:
    """``coords`` (G, k) float64 grid coordinates; ``loss`` and ``acc`` (G,) float64.

    ``axes`` are the per-axis coordinate vectors (k of them) the grid is the product of
    (row-major: the last axis varies fastest). ``acc`` is NaN for non-classification losses.
    """

    coords: Tensor
    loss: Tensor
    acc: Tensor
    axes: list

    def frame(self):
        import pandas as pd

        cols = {"x": self.coords[:, 0].tolist()}
        cols["y"] = self.coords[:, 1].tolist() if self.coords.shape[1] > 1 else [None] * len(self.coords)
        cols["loss"] = self.loss.tolist()
        cols["acc"] = self.acc.tolist()
        return pd.DataFrame(cols)


def make_axes(lo: float, hi: float, steps: int, dims: int) -> list:
    """``dims`` copies of ``linspace(lo, hi, steps)`` (float64); validates the range and count.

    An odd ``steps`` with ``lo = -hi`` puts 0 (the unperturbed weights) exactly on the grid.
    """
    if steps < 2:
        raise GradlabError(f"invalid steps: {steps} (must be >= 2)")
    if not hi > lo:
        raise GradlabError(f"empty range {lo},{hi}: the second number must be larger than the first")
    if dims not in (1, 2):
        raise GradlabError(f"invalid dims: {dims} (choose 1 or 2)")
    ax = torch.linspace(lo, hi, steps, dtype=torch.float64)
    if steps % 2 == 1 and lo == -hi:
        ax[steps // 2] = 0.0  # exact, not a rounding residue of linspace
    return [ax.clone() for _ in range(dims)]


def grid_coords(axes: Sequence[Tensor]) -> Tensor:
    """Cartesian product of the axes, shape (prod(len), k), last axis fastest."""
    if len(axes) == 1:
        return axes[0].reshape(-1, 1)
    gx, gy = torch.meshgrid(axes[0], axes[1], indexing="ij")
    return torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1)


def make_batches(x: Tensor, y: Tensor, batch_size: int, n_batches: Optional[int], device) -> list:
    """The first ``n_batches`` batches (all when ``None``) of ``(x, y)``, moved to ``device`` once."""
    if batch_size < 1:
        raise GradlabError(f"invalid batch size: {batch_size} (must be >= 1)")
    if n_batches is not None and n_batches < 1:
        raise GradlabError(f"invalid batches: {n_batches} (must be >= 1, or omit for the whole split)")
    n = len(x)
    stops = list(range(0, n, batch_size))
    if n_batches is not None:
        stops = stops[:n_batches]
    return [(x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)) for i in stops]


@contextlib.contextmanager
def _restored(live: Mapping[str, Tensor], saved: Mapping[str, Tensor]):
    """Copy the saved original values back into the parameters on the way out, whatever happens."""
    try:
        yield
    finally:
        with torch.no_grad():
            for n, t in saved.items():
                live[n].data.copy_(t)


def _is_classification(out: Tensor, target: Tensor) -> bool:
    return out.ndim >= 2 and not target.is_floating_point()


def evaluate_grid(
    model: nn.Module,
    directions: Sequence[Mapping[str, Tensor]],
    coords: Tensor,
    batches: Sequence[tuple],
    *,
    centre: Optional[Mapping[str, Tensor]] = None,
    loss_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
    points_per_call: int = 1,
    method: str = "inplace",
    progress: Optional[Callable[[int, int], None]] = None,
    axes: Optional[list] = None,
    precision: str = "fp32",
) -> GridResult:
    """Mean loss and accuracy at ``centre + sum_k coords[g, k] * directions[k]`` for every ``g``.

    Args:
        model: evaluated in eval mode (BatchNorm running statistics, no dropout) with its own
            buffers; left exactly as found.
        directions: ``k`` name -> tensor dicts over (a subset of) the model's parameter names;
            a parameter missing from a direction does not move along it.
        coords: (G, k) grid coordinates.
        batches: ``(x, y)`` pairs already on the model's device; the loss is the mean over all
            their samples (batches weighted by size).
        centre: the weights at coordinate 0 (default: the model's own parameters).
        loss_fn: ``loss_fn(out, y)`` -> mean loss (default cross-entropy); accuracy is computed
            for class-index targets only (NaN otherwise).
        points_per_call: grid points per vmapped functional call (1 = plain calls).
        method: ``"inplace"`` or ``"functional"`` (module docstring); ignored (functional) when
            ``points_per_call > 1``.
        progress: ``progress(done, total)`` after every call (points of this rank).
        precision: ``fp32``, or ``bf16``/``fp16``: each point's forward pass under autocast, its
            outputs cast back to float32 before the loss; the sums over batches are float64.
            Autocast does not act inside ``torch.func.vmap``: with ``points_per_call > 1`` the
            stacked weights, buffers and inputs are cast to the low dtype instead.
    """
    loss_fn = F.cross_entropy if loss_fn is None else loss_fn
    if coords.ndim != 2 or coords.shape[1] != len(directions):
        raise GradlabError(f"coords of shape {tuple(coords.shape)} for {len(directions)} direction(s)")
    if points_per_call < 1:
        raise GradlabError(f"invalid points per call: {points_per_call} (must be >= 1)")
    if not batches:
        raise GradlabError("no batches to evaluate the landscape on")
    if method not in ("inplace", "functional"):
        raise GradlabError(f"unknown grid method {method!r}; choose from: inplace, functional")
    live = dict(model.named_parameters())
    # inplace: the originals are saved once (and restored at the end); the grid is built from the
    # saved copies because the live storage is overwritten point after point
    saved = {n: p.detach().clone() for n, p in live.items()} if method == "inplace" else {}
    base = dict(saved) if method == "inplace" else {n: p.detach() for n, p in live.items()}
    if centre is not None:
        base.update({n: t.detach().to(base[n].device, base[n].dtype) for n, t in centre.items()})
    buffers = {n: b for n, b in model.named_buffers()}
    # per parameter: the directions that move it, on its device and dtype
    # (all-zero direction tensors, e.g. the biases of a filter-normalised direction, are skipped)
    dirs = {n: [(k, d[n].to(w.device, w.dtype)) for k, d in enumerate(directions) if n in d and bool(d[n].any())]
            for n, w in base.items()}
    sizes = [len(y) for _, y in batches]
    total_n = float(sum(sizes))

    rank, world = 0, 1
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    mine = list(range(rank, coords.shape[0], world))
    cl = coords.tolist()

    def point_params(c: list) -> dict:
        out = {}
        for n, w in base.items():
            t = w
            for k, d in dirs[n]:
                if c[k] != 0.0:
                    t = torch.add(t, d, alpha=c[k])  # a new tensor; `base` is never written
            out[n] = t
        return out

    def stacked_params(cs: list) -> dict:
        c = torch.tensor(cs, dtype=torch.float64)
        out = {}
        for n, w in base.items():
            t = w.unsqueeze(0).expand(len(cs), *w.shape)
            for k, d in dirs[n]:
                ck = c[:, k].to(w.device, w.dtype).view(-1, *([1] * w.ndim))
                t = t + ck * d.unsqueeze(0)
            out[n] = t.contiguous()
        return out

    # inplace: one multi-tensor (foreach) op per term for all moved parameters together, i.e.
    # 1 + k dispatches per point instead of ~2 per parameter
    moved = [n for n in live if dirs[n]]
    moved_dst = [live[n].data for n in moved]
    moved_base = [base[n] for n in moved]
    per_dir = []
    for k in range(len(directions)):
        names_k = [n for n in moved if any(kk == k for kk, _ in dirs[n])]
        per_dir.append(([live[n].data for n in names_k], [dict(dirs[n])[k] for n in names_k]))

    def set_point(c: list) -> None:
        if not moved:
            return
        torch._foreach_copy_(moved_dst, moved_base)
        for k, (dst_k, d_k) in enumerate(per_dir):
            if c[k] != 0.0 and dst_k:
                torch._foreach_add_(dst_k, d_k, alpha=c[k])  # base + c_1 d_1 + c_2 d_2, in this order

    if method == "inplace" and centre is not None:
        with torch.no_grad():  # parameters no direction moves sit at the centre for the whole grid
            for n, p in live.items():
                if not dirs[n]:
                    p.data.copy_(base[n])

    low = DTYPES[precision]  # the vmapped calls run wholly in it (weights, buffers and inputs cast)
    low_buffers = buffers if low is None else {n: b.to(low) if b.is_floating_point() else b for n, b in buffers.items()}
    batched = vmap(lambda p, x: functional_call(model, (p, low_buffers), (x,)), in_dims=(0, None))
    classify = True
    # No host-device copy inside the loop: each call appends its (points, losses, hits) tensors
    # and everything is summed and read back once after the grid (a GPU never waits per point).
    rec_idx, rec_loss, rec_hits, rec_size = [], [], [], []
    done = 0
    device_type = next(iter(base.values())).device.type if base else "cpu"
    with torch.no_grad(), model_state(model, train=False), _restored(live, saved):
        for start in range(0, len(mine), points_per_call):
            idx = mine[start : start + points_per_call]
            if len(idx) == 1:
                i = idx[0]
                if method == "inplace":
                    set_point(cl[i])
                    call = model
                else:
                    params = point_params(cl[i])
                    call = lambda x: functional_call(model, (params, buffers), (x,))  # noqa: E731
                for (x, y), m in zip(batches, sizes):
                    with autocast(precision, device_type):
                        out = call(x)
                    out = upcast(out)
                    rec_idx.append(idx)
                    rec_size.append(m)
                    rec_loss.append(loss_fn(out, y).reshape(1))
                    if classify and _is_classification(out, y):
                        rec_hits.append((out.argmax(dim=-1) == y).sum().reshape(1))
                    else:
                        classify = False
            else:
                params = stacked_params([cl[i] for i in idx])
                if low is not None:  # autocast does not reach inside vmap: the weights are cast instead
                    params = {n: t.to(low) if t.is_floating_point() else t for n, t in params.items()}
                for (x, y), m in zip(batches, sizes):
                    out = upcast(batched(params, x.to(low) if low is not None and x.is_floating_point() else x))
                    rec_idx.append(idx)
                    rec_size.append(m)
                    rec_loss.append(torch.stack([loss_fn(out[j], y) for j in range(len(idx))]))
                    if classify and _is_classification(out[0], y):
                        rec_hits.append((out.argmax(dim=-1) == y.unsqueeze(0)).sum(dim=1))
                    else:
                        classify = False
            done += len(idx)
            if progress is not None:
                progress(done, len(mine))
    loss = torch.zeros(coords.shape[0], dtype=torch.float64)
    acc = torch.zeros(coords.shape[0], dtype=torch.float64)
    if rec_idx:  # one read-back for the whole grid; sums in float64
        where = torch.tensor([i for ix in rec_idx for i in ix])
        weight = torch.tensor([float(m) for ix, m in zip(rec_idx, rec_size) for _ in ix], dtype=torch.float64)
        loss.index_add_(0, where, torch.cat(rec_loss).double().cpu() * weight)
        if classify:
            acc.index_add_(0, where, torch.cat(rec_hits).double().cpu())
    loss /= total_n
    acc /= total_n
    if not classify:
        acc.fill_(float("nan"))
    if world > 1:
        dev = next(iter(base.values())).device
        both = torch.stack([loss, acc]).to(dev)
        dist.all_reduce(both)  # each point was filled by exactly one rank, zeros elsewhere
        loss, acc = both[0].cpu(), both[1].cpu()
    if axes is None:
        axes = [torch.unique(coords[:, k]) for k in range(coords.shape[1])]
    return GridResult(coords, loss, acc, axes)
