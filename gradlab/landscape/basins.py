"""Basins of attraction on the 2-D test functions: which minimum does each start reach?

``basins`` runs every optimizer from many starts (``starts`` seeded uniform points in the
function's plot box ``fn.view``, and/or a ``grid`` x ``grid`` lattice over it) and labels each
start by where it ends after ``steps`` steps:

* ``diverged``: the end point (or its loss) is not finite, or it left the escape disc (radius
  ``ESCAPE`` times the plot box's half-diagonal around the box's centre);
* the known minimum ``min (x, y)`` of the function (``fn.minima``) nearest to the end point, when
  it is within ``radius`` of it;
* otherwise, an end point whose gradient norm is at most ``grad_tol`` (a critical point the
  function does not list, e.g. one of Rastrigin's local minima or a saddle) joins a cluster:
  end points of all optimizers together, the lowest-loss unassigned one opens a cluster and takes
  every unassigned point within ``radius``; the label is the type of the opening point (the
  exact Hessian's eigenvalues through :func:`gradlab.probes.critical.classify_point`) and its
  coordinates, ``minimum (-0.995, 0.995)``;
* ``not converged``: anything else (still moving, or stuck on a plateau).

``converged`` is ``||grad f(end)|| <= grad_tol``; ``steps`` is the first step with
``||grad f|| <= grad_tol`` (the step it converged at), else the step it diverged at, else all
``steps``.

Vectorised over starts: the optimizers in :data:`SEPARABLE` treat every coordinate on its own
(their state and update are elementwise; the Hutchinson diagonal of AdaHessian and curvature-GD
is exact per row because the Hessian of ``sum_i f(p_i)`` is block diagonal), so one optimizer on
an ``(N, 2)`` parameter minimising ``sum_i f(p_i)`` follows the ``N`` paths it would follow from
each start alone (tested against single-start runs). The others (line searches, trust regions,
Newton's dense solve, SAM's global gradient norm, SWATS's global projection) couple coordinates
and run once per start. The random draws of the stochastic separable ones (Langevin's noise, the
Hutchinson probes) are shared out differently than in single-start runs, the same in law.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np
import pandas as pd
import torch
from torch import nn

from gradlab.core.errors import GradlabError
from gradlab.landscape.functions import TestFunction, build_function
from gradlab.landscape.trajectories import MAX_STARTS, classify_point, registry_optimizer_factory, run_trajectory
from gradlab.probes.critical import GRAD_TOL

SEPARABLE = frozenset({"sgd", "momentum", "nesterov", "adam", "adamw", "rmsprop", "adagrad", "langevin",
                       "adahessian", "curvature-gd"})
ESCAPE = 10.0  # escape disc radius, in half-diagonals of the plot box
DIVERGED, NOT_CONVERGED = "diverged", "not converged"

def check_basin_options(starts: int, grid: int) -> int:
    """The number of starts ``starts + grid^2``, or one :class:`GradlabError` line."""
    if grid == 1:
        raise GradlabError("invalid grid: 1 (a grid of starts needs at least 2 x 2; 0 for none)")
    total = starts + grid * grid
    if total > MAX_STARTS:
        raise GradlabError(f"too many starts: {starts} + {grid}^2 = {total} (at most {MAX_STARTS})")
    return total


def start_points(fn: TestFunction, starts: int = 0, grid: int = 0, seed: int = 0) -> torch.Tensor:
    """``(starts + grid^2, 2)`` float64 starts: the seeded uniform ones first, then the grid
    (``linspace`` over each side of ``fn.view``, ``x`` slowest)."""
    x0, x1, y0, y1 = fn.view
    pts = []
    if starts:
        u = torch.rand(starts, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        pts.append(torch.stack([x0 + (x1 - x0) * u[:, 0], y0 + (y1 - y0) * u[:, 1]], dim=1))
    if grid:
        gx = torch.linspace(x0, x1, grid, dtype=torch.float64)
        gy = torch.linspace(y0, y1, grid, dtype=torch.float64)
        X, Y = torch.meshgrid(gx, gy, indexing="ij")
        pts.append(torch.stack([X.reshape(-1), Y.reshape(-1)], dim=1))
    if not pts:
        raise GradlabError("no starts: pass --starts N and/or --grid K")
    return torch.cat(pts)


class _Batched(nn.Module):
    """``sum_i f(p_i)`` over the rows of one ``(N, 2)`` parameter."""

    def __init__(self, fn: TestFunction, points: torch.Tensor):
        super().__init__()
        self.fn = fn
        self.point = nn.Parameter(points.clone())

    def values(self) -> torch.Tensor:
        return self.fn.value(self.point[:, 0], self.point[:, 1])

    def forward(self) -> torch.Tensor:
        return self.values().sum()


def _outside(fn: TestFunction, p: torch.Tensor) -> torch.Tensor:
    x0, x1, y0, y1 = fn.view
    cx, cy, half = (x0 + x1) / 2, (y0 + y1) / 2, math.hypot(x1 - x0, y1 - y0) / 2
    return ~torch.isfinite(p).all(-1) | (torch.hypot(p[..., 0] - cx, p[..., 1] - cy) > ESCAPE * half)


def run_batched(fn: TestFunction, make_optimizer: Callable, starts: torch.Tensor, steps: int,
                grad_tol: float = GRAD_TOL, seed: int = 0) -> dict:
    """All starts at once for a separable optimizer: end points, end losses and gradient norms,
    the step counts of the module docstring and the diverged mask (numpy arrays)."""
    n = len(starts)
    first_conv = torch.full((n,), -1, dtype=torch.long)
    first_div = torch.full((n,), -1, dtype=torch.long)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mod = _Batched(fn, starts)
        opt = make_optimizer(mod.parameters())
        closure = getattr(opt, "needs_loss_closure", False)
        for t in range(steps + 1):
            vals = mod.values()
            (g,) = torch.autograd.grad(vals.sum(), [mod.point])
            gn = g.norm(dim=1)
            bad = _outside(fn, mod.point.detach()) | ~torch.isfinite(vals.detach())
            first_div[(first_div < 0) & bad] = t
            first_conv[(first_conv < 0) & ~bad & (gn <= grad_tol)] = t
            if t == steps:
                break
            opt.zero_grad(set_to_none=True)
            if closure:
                opt.step(lambda: mod())
            else:
                mod.point.grad = g
                opt.step()
    end = mod.point.detach()
    return {"end": end.numpy().copy(), "loss": vals.detach().numpy().copy(), "grad_norm": gn.numpy().copy(),
            "first_conv": first_conv.numpy(), "first_div": first_div.numpy()}


def run_looped(fn_name: str, make_optimizer: Callable, starts: torch.Tensor, steps: int, *, cond=None,
               grad_tol: float = GRAD_TOL, seed: int = 0, progress: Optional[Callable[[int], None]] = None) -> dict:
    """One single-start run per start (optimizers that couple coordinates); same fields as
    :func:`run_batched`."""
    n = len(starts)
    out = {"end": np.full((n, 2), np.nan), "loss": np.full(n, np.nan), "grad_norm": np.full(n, np.nan),
           "first_conv": np.full(n, -1), "first_div": np.full(n, -1)}
    for i, s in enumerate(starts.tolist()):
        fn = build_function(fn_name, s, cond=cond)
        traj = run_trajectory(fn, make_optimizer, steps, seed=seed + i)
        pts = torch.tensor(traj.points, dtype=torch.float64)
        bad = (_outside(fn, pts) | ~torch.isfinite(torch.tensor(traj.losses))).numpy()
        if traj.diverged:
            bad[-1] = True
        ok = np.flatnonzero(~bad & (np.asarray(traj.grad_norms) <= grad_tol))
        out["first_div"][i] = int(np.flatnonzero(bad)[0]) if bad.any() else -1
        out["first_conv"][i] = int(ok[0]) if ok.size else -1
        out["end"][i] = traj.points[-1]
        out["loss"][i], out["grad_norm"][i] = traj.losses[-1], traj.grad_norms[-1]
        if progress is not None:
            progress(i)
    return out


def _fmt(p) -> str:
    return f"({p[0]:.3g}, {p[1]:.3g})"


def label_basins(fn: TestFunction, table: pd.DataFrame, radius: float, grad_tol: float = GRAD_TOL) -> pd.Series:
    """The basin of every row of ``table`` (``end_x, end_y, end_loss, end_grad_norm, diverged``),
    by the rules of the module docstring."""
    end = table[["end_x", "end_y"]].to_numpy(dtype=np.float64)
    labels = np.full(len(table), NOT_CONVERGED, dtype=object)
    div = table["diverged"].to_numpy(dtype=bool)
    labels[div] = DIVERGED
    free = ~div
    if len(fn.minima):
        mins = np.asarray(fn.minima, dtype=np.float64)
        d = np.linalg.norm(end[:, None, :] - mins[None, :, :], axis=-1)
        near, dist = d.argmin(1), d.min(1)
        hit = free & (dist <= radius)
        for k, m in enumerate(mins):
            labels[hit & (near == k)] = f"min {_fmt(m)}"
        free &= ~hit
    crit = free & (table["end_grad_norm"].to_numpy(dtype=np.float64) <= grad_tol)
    order = np.argsort(table["end_loss"].to_numpy(dtype=np.float64), kind="stable")
    open_ = crit.copy()
    for i in order:
        if not open_[i]:
            continue
        members = open_ & (np.linalg.norm(end - end[i], axis=1) <= radius)
        kind, _ = classify_point(fn, end[i], grad_norm=float(table["end_grad_norm"].iloc[i]), stationary_tol=grad_tol)
        labels[members] = f"{kind} {_fmt(end[i])}"
        open_ &= ~members
    return pd.Series(labels, index=table.index, name="basin")


def basins(fn_name: str, optimizers, *, starts: int = 0, grid: int = 0, steps: int = 200, lr: Optional[float] = None,
           cond: Optional[float] = None, radius: float = 0.1, grad_tol: float = GRAD_TOL, seed: int = 0,
           points=None, progress: Optional[Callable[[str, int, int], None]] = None) -> tuple[pd.DataFrame, TestFunction]:
    """Every optimizer from every start; returns ``(table, fn)``: one row per (optimizer,
    start) with ``optimizer, start_x, start_y, end_x, end_y, end_loss, end_grad_norm, basin,
    steps, converged, diverged``. ``points`` ((N, 2)) gives the starts instead of ``starts`` and
    ``grid``. ``progress(optimizer, done, total)`` after each start (or batch)."""
    names = list(optimizers)
    if not names:
        raise GradlabError("no optimizer given; pass e.g. --opt sgd,adam")
    if steps < 1:
        raise GradlabError(f"invalid steps: {steps} (must be >= 1)")
    fn = build_function(fn_name, None, cond=cond)
    if points is None:
        check_basin_options(starts, grid)
        pts = start_points(fn, starts, grid, seed)
    else:
        pts = torch.as_tensor(points, dtype=torch.float64).reshape(-1, 2)
    frames = []
    for name in names:
        factory, _ = registry_optimizer_factory(name, lr, seed, fn.lr_scale)
        if name in SEPARABLE:
            res = run_batched(build_function(fn_name, None, cond=cond), factory, pts, steps, grad_tol, seed)
        else:
            res = run_looped(fn_name, factory, pts, steps, cond=cond, grad_tol=grad_tol, seed=seed,
                             progress=None if progress is None else (lambda i, n=name: progress(n, i + 1, len(pts))))
        div = res["first_div"] >= 0
        conv = ~div & (res["grad_norm"] <= grad_tol)
        took = np.where(div, res["first_div"], np.where(res["first_conv"] >= 0, res["first_conv"], steps))
        frames.append(pd.DataFrame({
            "optimizer": name, "start_x": pts[:, 0].numpy(), "start_y": pts[:, 1].numpy(),
            "end_x": res["end"][:, 0], "end_y": res["end"][:, 1], "end_loss": res["loss"],
            "end_grad_norm": res["grad_norm"], "steps": took.astype(int), "converged": conv, "diverged": div}))
        if progress is not None and name in SEPARABLE:
            progress(name, len(pts), len(pts))
    table = pd.concat(frames, ignore_index=True)
    table.insert(7, "basin", label_basins(fn, table, radius, grad_tol))
    return table, fn


def basin_counts(table: pd.DataFrame) -> pd.DataFrame:
    """Starts per (optimizer, basin), most first: ``optimizer, basin, starts, share,
    median_steps``."""
    g = table.groupby(["optimizer", "basin"], sort=False)
    out = g.agg(starts=("basin", "size"), median_steps=("steps", "median")).reset_index()
    out["share"] = out["starts"] / out.groupby("optimizer")["starts"].transform("sum")
    order = {n: i for i, n in enumerate(dict.fromkeys(table["optimizer"]))}
    out = out.sort_values(["optimizer", "starts"], key=lambda c: c.map(order) if c.name == "optimizer" else -c,
                          kind="stable")
    return out[["optimizer", "basin", "starts", "share", "median_steps"]].reset_index(drop=True)
