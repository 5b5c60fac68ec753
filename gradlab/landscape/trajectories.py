"""Run optimizers on a 2-D test function and describe where each one went.

``optimize`` is the core of ``gradlab optimize``: every optimizer starts from the same point,
takes ``steps`` steps, and the whole path is recorded. ``summarize`` turns a path into one row of
the per-optimizer report:

* ``steps_to_tol``: the first step ``t`` with ``f(p_t) - f_min <= tol`` (``f_min`` the function's
  global minimum value). Functions unbounded below (saddle, monkey saddle) have no such target and
  report it empty.
* saddle escape (functions with a watched saddle point ``s``): the path escaped at the first step
  ``t`` with ``f(p_t) <= f(s) - escape_delta``, i.e. once it is ``escape_delta`` below the
  saddle's level; it never returns to the saddle's neighbourhood after that, because every
  optimizer here is a descent method up to noise. ``min_dist_to_saddle`` is how close it came.
* point type: the EXACT Hessian at the final point (``torch.autograd.functional.hessian``,
  float64) and the gradient norm there go through gradlab's one classifier,
  :func:`gradlab.probes.critical.classify_point` (the one ``probe hessian`` uses): ``minimum``,
  ``maximum``, ``saddle`` or ``degenerate``, each eigenvalue's sign decided against the dense
  solver's error bound; ``not-critical`` when the gradient norm is above ``stationary_tol``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import pandas as pd
import torch

from gradlab.core.errors import GradlabError
from gradlab.core.options import Option, Options
from gradlab.landscape.functions import FUNCTIONS, TestFunction, build_function
from gradlab.probes.critical import GRAD_TOL, dense_eigenvalues
from gradlab.probes.critical import classify_point as critical_point

# Step sizes chosen for the 2-D functions' scale (curvatures of order 1-100, optima within a few
# units): large enough to move in ~100 steps, small enough that none of them diverges on the
# saddle/quadratic showcase. A name missing here falls back to DEFAULT_LR. The function's
# ``lr_scale`` multiplies them for the optimizers whose step grows with the gradient (Rosenbrock
# 0.05, Beale 0.2: their curvature at the usual starts is 10-1000x larger; at these scaled steps
# none of them diverges there in 200 steps); the step of the adaptive ones in SCALE_FREE does not
# grow with the gradient's size, so they keep their defaults.
DEFAULT_LRS = {
    "sgd": 0.01,
    "momentum": 0.01,
    "nesterov": 0.01,
    "adam": 0.05,
    "adamw": 0.05,
    "rmsprop": 0.01,
    "adagrad": 0.3,
    "adahessian": 0.1,
    "curvature-gd": 0.1,
    "newton": 1.0,
    "saddle-free-newton": 1.0,
    "lbfgs": 1.0,
    "sr1": 1.0,  # its initial trust-region radius
    "langevin": 0.01,
    "sam": 0.01,
}
DEFAULT_LR = 0.01
SCALE_FREE = frozenset({"adam", "adamw", "rmsprop", "adagrad", "adahessian", "curvature-gd", "swats", "newton",
                        "saddle-free-newton", "lbfgs", "sr1"})
MAX_STARTS = 100_000  # starts of a basins-of-attraction run
SHOWCASE = ("sgd", "momentum", "adam", "adahessian", "curvature-gd", "langevin")

#: ``gradlab optimize``'s options.
OPTIMIZE_OPTIONS = Options(
    Option("fn", str, "saddle", "test function", choices=tuple(FUNCTIONS.names())),
    Option("opt", str, ",".join(SHOWCASE), "comma list of optimizers from the registry (`gradlab list optimizers`)"),
    Option("steps", int, 200, "steps per optimizer", low=1),
    Option("start", str, None, "start point x,y (default: the function's usual start, e.g. -1.5,0.01 for saddle)"),
    Option("lr", float, None, "one step size for every optimizer (default: per optimizer, tuned for 2-D functions: "
           "sgd/momentum 0.01, adam 0.05, adahessian/curvature-gd 0.1, ...; smaller on rosenbrock and beale)",
           low=0, low_open=True),
    Option("tol", float, 1e-4, "report the first step with loss - global minimum <= tol", low=0, low_open=True),
    Option("escape_delta", float, 0.1, "saddle escape = first step whose loss is this far below the saddle's value",
           low=0, low_open=True),
    Option("cond", float, None, "quadratic only: condition number (Hessian diag(1, cond)); default 10", low=0,
           low_open=True),
    Option("gif", bool, False, "also write an animated trajectories.gif (needs pillow)"),
    # basins of attraction (gradlab.landscape.basins)
    Option("starts", int, 0, "basins of attraction: this many seeded random starts in the function's plot box "
           "(0: none)", low=0, high=MAX_STARTS),
    Option("grid", int, 0, "basins of attraction: a K x K grid of starts over the plot box (0: none, else >= 2)",
           low=0, high=300),
    Option("basin_radius", float, 0.1, "an end point this close to a minimum is in its basin; unlisted critical "
           "points closer than this are one", low=0, low_open=True),
    Option("arrows", bool, False, "draw the negative-gradient field (unit arrows) on the optimize plots"),
)


@dataclass
class Trajectory:
    """One optimizer's path: ``points`` (steps+1, 2), ``losses``/``grad_norms`` (steps+1,)."""

    optimizer: str
    points: list
    losses: list
    grad_norms: list
    lr: float
    diverged: bool = False

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "optimizer": self.optimizer,
                "step": range(len(self.losses)),
                "x": [p[0] for p in self.points],
                "y": [p[1] for p in self.points],
                "loss": self.losses,
                "grad_norm": self.grad_norms,
            }
        )


def run_trajectory(
    fn: TestFunction,
    make_optimizer: Callable,
    steps: int,
    *,
    name: str = "optimizer",
    lr: float = float("nan"),
    closure_step: Optional[bool] = None,
    seed: int = 0,
) -> Trajectory:
    """Minimise ``fn`` (in place) for ``steps`` steps of ``make_optimizer(fn.parameters())``.

    Records the point, loss and gradient norm before each step and after the last one
    (``steps + 1`` rows). ``closure_step`` (default: the optimizer's ``needs_loss_closure``)
    calls ``opt.step(closure)`` with a closure returning the loss WITHOUT backward, the contract
    of gradlab's second-order optimizers. Randomness (e.g. Langevin noise) is seeded from
    ``seed`` inside a forked RNG, so the caller's global RNG state is untouched. A path whose
    loss or point becomes non-finite stops there with ``diverged=True``.
    """
    if steps < 0:
        raise GradlabError(f"invalid steps: {steps} (must be >= 0)")
    points, losses, gnorms = [], [], []
    diverged = False
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        opt = make_optimizer(fn.parameters())
        use_closure = getattr(opt, "needs_loss_closure", False) if closure_step is None else closure_step

        def record() -> bool:
            fn.zero_grad(set_to_none=True)
            loss = fn()
            (g,) = torch.autograd.grad(loss, [fn.point])
            p = fn.point.detach()
            points.append((float(p[0]), float(p[1])))
            losses.append(loss.item())
            gnorms.append(float(g.norm()))
            return math.isfinite(losses[-1]) and bool(torch.isfinite(p).all())

        for _ in range(steps):
            if not record():
                diverged = True
                break
            opt.zero_grad(set_to_none=True)
            if use_closure:
                opt.step(lambda: fn())
            else:
                loss = fn()
                loss.backward()
                opt.step()
        else:
            diverged = not record()
    return Trajectory(name, points, losses, gnorms, lr, diverged)


def classify_point(fn: TestFunction, point: Sequence[float], *, grad_norm: float = 0.0,
                   stationary_tol: float = GRAD_TOL) -> tuple[str, list[float]]:
    """Type of ``point`` and the exact Hessian's eigenvalues (ascending); see the module docstring."""
    p = torch.tensor([float(v) for v in point], dtype=torch.float64)
    if not bool(torch.isfinite(p).all()):
        return "diverged", [float("nan"), float("nan")]
    hess = torch.autograd.functional.hessian(lambda q: fn.value(q[0], q[1]), p)
    ev, err = dense_eigenvalues(hess)
    eig = ev.tolist()
    bounds = [err] * len(eig)
    kind = critical_point(grad_norm, eig, eig, top_errors=bounds, bottom_errors=bounds, grad_tol=stationary_tol).kind
    return kind, eig


def summarize(fn: TestFunction, traj: Trajectory, *, tol: float = 1e-4, escape_delta: float = 0.1,
              stationary_tol: float = GRAD_TOL) -> dict:
    """One report row for ``traj`` (see the module docstring for each definition)."""
    x, y = traj.points[-1]
    row = {
        "optimizer": traj.optimizer,
        "lr": traj.lr,
        "final_x": x,
        "final_y": y,
        "final_loss": traj.losses[-1],
        "final_grad_norm": traj.grad_norms[-1],
        "steps_to_tol": None,
    }
    if fn.f_min is not None:
        hit = [t for t, loss in enumerate(traj.losses) if loss - fn.f_min <= tol]
        row["steps_to_tol"] = hit[0] if hit else None
    if fn.saddles:
        level = fn.saddle_value()
        sx, sy = fn.saddles[0]
        esc = [t for t, loss in enumerate(traj.losses) if loss <= level - escape_delta]
        row["escaped"] = bool(esc)
        row["escape_step"] = esc[0] if esc else None
        row["min_dist_to_saddle"] = min(math.hypot(px - sx, py - sy) for px, py in traj.points)
    kind, eig = (classify_point(fn, (x, y), grad_norm=traj.grad_norms[-1], stationary_tol=stationary_tol)
                 if not traj.diverged else ("diverged", [float("nan")] * 2))
    row.update({"hess_eig_min": eig[0], "hess_eig_max": eig[-1], "point_type": kind})
    return row


def registry_optimizer_factory(name: str, lr: Optional[float], seed: int = 0, lr_scale: float = 1.0,
                               **opts) -> tuple[Callable, float]:
    """``(params -> optimizer, lr used)`` for a name of gradlab's optimizer registry.

    An unknown name raises :class:`GradlabError` listing the registry before anything runs; so
    does an optimizer that needs a network (``needs_model``: K-FAC's layer factors, natural
    gradient's Gauss-Newton products through the model's outputs), which a 2-D function is not.
    SAM and ASAM need only the loss and its gradient and run here.
    """
    from gradlab.optim import OPTIMIZERS, build_optimizer  # the registry lives with the optimizers

    OPTIMIZERS.get(name)
    # asked of an instance (the registry holds factories): built on a throw-away 2-D point
    if getattr(build_optimizer(name, [torch.zeros(2, requires_grad=True)], seed=seed), "needs_model", False):
        raise GradlabError(f"optimizer {name} needs a network (its curvature comes from the model's layers and "
                           f"outputs), not a 2-D function: use it with gradlab train --opt {name}")
    if lr is None:
        lr = DEFAULT_LRS.get(name, DEFAULT_LR) * (1.0 if name in SCALE_FREE else lr_scale)
    return (lambda params: build_optimizer(name, list(params), lr=lr, seed=seed, **opts)), lr


def optimize(
    fn_name: str,
    optimizers: Iterable[str],
    *,
    steps: int = 200,
    start: Optional[Sequence[float]] = None,
    lr: Optional[float] = None,
    tol: float = 1e-4,
    escape_delta: float = 0.1,
    cond: Optional[float] = None,
    seed: int = 0,
    progress: Optional[Callable[[str], None]] = None,
) -> tuple[pd.DataFrame, pd.DataFrame, TestFunction]:
    """Run every optimizer from the same start on ``fn_name``.

    Returns ``(trajectories, summary, fn)``: trajectories with columns
    ``optimizer,step,x,y,loss,grad_norm``, one summary row per optimizer, and a fresh instance of
    the function at the start point (for plotting). ``lr=None`` uses :data:`DEFAULT_LRS` times the function's ``lr_scale``.
    ``progress(name)`` is called after each optimizer finishes.
    """
    names = list(optimizers)
    if not names:
        raise GradlabError("no optimizer given; pass e.g. --opt sgd,adam")
    if steps < 1:
        raise GradlabError(f"invalid steps: {steps} (must be >= 1)")
    probe = build_function(fn_name, start, cond=cond)  # validates the function and start first
    factories = {name: registry_optimizer_factory(name, lr, seed, probe.lr_scale) for name in names}
    frames, rows = [], []
    for name in names:
        fn = build_function(fn_name, start, cond=cond)
        factory, used_lr = factories[name]
        traj = run_trajectory(fn, factory, steps, name=name, lr=used_lr, seed=seed)
        frames.append(traj.frame())
        rows.append(summarize(fn, traj, tol=tol, escape_delta=escape_delta))
        if progress is not None:
            progress(name)
    return pd.concat(frames, ignore_index=True), pd.DataFrame(rows), build_function(fn_name, start, cond=cond)
