"""The landscape probe (``gradlab probe landscape``): choose the directions, then evaluate the grid.

:func:`choose_directions` returns the directions plus what the plot needs (the projected training
trajectory for ``pca``, marked points for ``interp`` and simplex planes) and the range to use
when the user gave none. :func:`landscape` evaluates the grid (:mod:`gradlab.landscape.grid`).
:class:`LandscapeProbe` is the registered probe (Li et al. 2018, "Visualizing the Loss Landscape
of Neural Nets"; Goodfellow et al. 2015 for the 1-D interpolation).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from gradlab.core.errors import GradlabError
from gradlab.core.options import Option, Options, parse_numbers
from gradlab.core.precision import precision_option
from gradlab.probes import PROBES
from gradlab.probes.base import Probe, ProbeContext, ProbeReport
from gradlab.probes.source import TRAINED_SOURCE_OPTIONS, batch_options, load_source
from gradlab.runs import find_run, load_checkpoint, read_config
from gradlab.training.load import load_run
from gradlab.landscape.directions import (
    eigen_directions,
    interp_direction,
    norm,
    orthogonalize,
    pca_directions,
    plane_through,
    random_directions,
    weights_of,
)
from gradlab.landscape.grid import GridResult, evaluate_grid, grid_coords, make_axes, make_batches

DIRECTIONS = ("random", "pca", "eigen", "interp")


@dataclass
class DirectionSet:
    """``directions`` (k name -> tensor dicts), the ``centre`` weights (None: the model's),
    ``default_range`` when the user gives none, ``path`` (T, 2) a projected trajectory,
    ``points`` {label: coords} to mark, and ``info`` (floats for the summary)."""

    directions: list
    centre: Optional[dict] = None
    default_range: tuple = (-1.0, 1.0)
    path: Optional[torch.Tensor] = None
    points: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)


def load_checkpoint_weights(path: Path, names: Sequence[str]) -> dict:
    """The parameter tensors ``names`` of a saved checkpoint (``{"model": state_dict, ...}``)."""
    ck = load_checkpoint(path)
    sd = ck["model"] if isinstance(ck, dict) and "model" in ck else ck
    missing = [n for n in names if n not in sd]
    if missing:
        raise GradlabError(f"checkpoint {path} lacks parameters {missing[:3]}: not this model")
    return {n: sd[n] for n in names}


def trajectory_checkpoints(run_path: Path) -> list[Path]:
    """``init.pt``, ``step-<8-digit step>.pt`` (by step) and ``last.pt`` of a run, oldest first."""
    ck = Path(run_path) / "checkpoints"
    steps = sorted(ck.glob("step-*.pt"), key=lambda p: int(re.sub(r"\D", "", p.stem) or 0))
    out = ([ck / "init.pt"] if (ck / "init.pt").is_file() else []) + steps
    if (ck / "last.pt").is_file():
        out.append(ck / "last.pt")
    return out


def choose_directions(
    kind: str,
    model: nn.Module,
    *,
    dims: int = 2,
    run_path: Optional[Path] = None,
    to_weights: Optional[dict] = None,
    batches: Optional[Sequence[tuple]] = None,
    include_bn: bool = False,
    seed: int = 0,
    device="cpu",
    loss_fn=None,
) -> DirectionSet:
    """Directions of ``kind`` (random, pca, eigen, interp) for ``model`` (see the module docstring).

    ``interp`` goes from the model's weights (x=0) to ``to_weights`` (x=1), or, without them,
    from the run's initial weights ``checkpoints/init.pt`` (x=-1) to the model (x=0); a second
    dimension is a filter-normalised random direction orthogonalised to the first and scaled to
    its norm.
    """
    if kind not in DIRECTIONS:
        raise GradlabError(f"unknown directions {kind!r}; choose from: {', '.join(DIRECTIONS)}")
    gen = torch.Generator().manual_seed(seed)
    w = weights_of(model)
    names = list(w)
    if kind == "random":
        return DirectionSet(random_directions(model, dims, include_bn=include_bn, generator=gen),
                            points={"weights": (0.0, 0.0)})
    if kind == "pca":
        if dims != 2:
            raise GradlabError("--directions pca draws a plane: use --dims 2")
        paths = trajectory_checkpoints(run_path) if run_path is not None else []
        paths = [p for p in paths if p.name != "last.pt"]
        if len(paths) < 2:
            raise GradlabError(f"run {run_path} kept no checkpoints for PCA directions: train it with "
                               "`gradlab train --keep-checkpoints N` (N >= 2)")
        traj = [{n: t.to(device) for n, t in load_checkpoint_weights(p, names).items()} for p in paths]
        traj.append({n: t.detach() for n, t in w.items()})
        dirs, coords, explained = pca_directions(traj, w)
        span = float(coords.abs().max()) * 1.25 or 1.0
        return DirectionSet(dirs, default_range=(-span, span), path=coords,
                            points={"final": (0.0, 0.0)},
                            info={"pca_explained_1": explained[0], "pca_explained_2": explained[1]})
    if kind == "eigen":
        if not batches:
            raise GradlabError("eigen directions need data batches")
        dirs, vals = eigen_directions(model, batches, k=dims, seed=seed, loss_fn=loss_fn)
        return DirectionSet(dirs, points={"weights": (0.0, 0.0)},
                            info={f"eigenvalue_{i + 1}": v for i, v in enumerate(vals)})
    # interp
    if to_weights is not None:
        d = interp_direction(w, to_weights)
        rng, pts = (-0.5, 1.5), {"this run": 0.0, "other run": 1.0}
    else:
        paths = trajectory_checkpoints(run_path) if run_path is not None else []
        if not paths or paths[0].name != "init.pt":
            raise GradlabError(f"run {run_path} has no checkpoints/init.pt to interpolate from: pass --to RUN_B, "
                               "or train with --keep-checkpoints N")
        init = {n: t.to(device) for n, t in load_checkpoint_weights(paths[0], names).items()}
        d = interp_direction(init, w)
        rng, pts = (-1.5, 0.5), {"init": -1.0, "trained": 0.0}
    info = {"interp_distance": norm(d)}
    if dims == 1:
        return DirectionSet([d], default_range=rng, points={k: (v, 0.0) for k, v in pts.items()}, info=info)
    (r,) = random_directions(model, 1, include_bn=True, generator=gen)
    d2 = orthogonalize(r, d, rescale_to=norm(d))
    return DirectionSet([d, d2], default_range=rng, points={k: (v, 0.0) for k, v in pts.items()}, info=info)


def simplex_plane(vertices: Sequence[dict], which: Sequence[int]) -> DirectionSet:
    """The plane through simplex vertices ``which`` (3 indices), centred on their centroid."""
    if len(which) != 3 or len(set(which)) != 3:
        raise GradlabError(f"--plane-vertices needs 3 distinct vertex indices, got {list(which)}")
    bad = [i for i in which if not 0 <= i < len(vertices)]
    if bad:
        raise GradlabError(f"vertex index {bad[0]} out of range: the simplex has vertices 0..{len(vertices) - 1}")
    centre, (e1, e2), coords = plane_through([vertices[i] for i in which])
    span = float(coords.abs().max()) * 1.4
    return DirectionSet([e1, e2], centre=centre, default_range=(-span, span),
                        points={f"v{i}": tuple(c) for i, c in zip(which, coords.tolist())})


def landscape(
    model: nn.Module,
    dset: DirectionSet,
    batches: Sequence[tuple],
    *,
    steps: int = 25,
    range_: Optional[tuple] = None,
    points_per_call: int = 1,
    progress: Optional[Callable[[int, int], None]] = None,
    loss_fn: Optional[Callable] = None,
    precision: str = "fp32",
) -> GridResult:
    """Evaluate loss (``loss_fn``, default cross-entropy) and accuracy on the
    ``steps``-per-axis grid spanned by ``dset``."""
    lo, hi = dset.default_range if range_ is None else range_
    axes = make_axes(lo, hi, steps, len(dset.directions))
    return evaluate_grid(model, dset.directions, grid_coords(axes), batches, centre=dset.centre,
                         points_per_call=points_per_call, progress=progress, axes=axes, loss_fn=loss_fn,
                         precision=precision)


# -- the registered probe ---------------------------------------------------------------------
OPTIONS = Options(
    Option("dims", int, 2, "1 (a line) or 2 (a plane)", low=1, high=2),
    Option("steps", int, 25, "Grid points per axis; odd puts the weights exactly on the grid", low=2),
    Option("range", str, None, "Coordinate range lo,hi on every axis (default: -1,1; interp -1.5,0.5 or -0.5,1.5; "
           "pca and --plane-vertices: fitted to the trajectory/vertices)"),
    Option("directions", str, "random", "random (filter-normalised Gaussian), pca (training trajectory), eigen (top "
           "Hessian eigenvectors) or interp (straight line to init or --to)", choices=DIRECTIONS),
    Option("to", str, None, "interp: the other end, a second run (RUN_B) (default: this run's initial weights)"),
) + batch_options(None, 512, "Evaluate on the first N batches (default: the whole split)") + Options(
    Option("include_bn", bool, False, "random: also move biases and BatchNorm parameters (default: they stay put, "
           "as in Li et al.)"),
    Option("log_scale", bool, None, "Plot log10 of the loss (--no-log-scale: the loss; default: log10 where the "
           "loss's max/min over the grid exceeds 1e3)"),
    Option("plane_vertices", str, None, "i,j,k: draw the plane through three vertices of the simplex saved by "
           "`gradlab simplex` (--run is the simplex run)"),
    Option("points_per_call", int, 1, "Grid points per vmapped call (faster on a GPU; 1 is fastest on a CPU)", low=1),
    Option("lambda_max", bool, False, "Also report the Hessian's largest eigenvalue at the weights (Lanczos, "
           "first 4 batches)"),
    precision_option("arithmetic of each grid point's forward pass: bf16/fp16 under autocast (losses summed in "
                     "float64; directions and lambda_max stay float32)"),
)


@PROBES.register("landscape", "loss and accuracy on a 1-D line or 2-D plane around a trained run's weights",
                 options=OPTIONS, paper="Li et al. 2018; Goodfellow et al. 2015")
class LandscapeProbe(Probe):
    """Loss landscape of a trained run: landscape.csv (x,y,loss,acc), contour and 3-D surface plots, directions.pt.

    The grid is centred on the run's weights and leaves the model untouched.
    """

    training = False  # a grid of forward passes: an analysis of one point, not a training signal
    source_options = TRAINED_SOURCE_OPTIONS

    def load(self, cfg, device):
        """The run's model; with ``plane_vertices``, ``run`` is a simplex run and the model is its source's."""
        if not cfg["plane_vertices"]:
            return super().load(cfg, device)
        spath = find_run(cfg["runs_dir"], cfg["run"])
        if not (spath / "simplex.pt").is_file():
            raise GradlabError(f"run {spath} has no simplex.pt: --plane-vertices needs a `gradlab simplex` run")
        simplex = load_checkpoint(spath / "simplex.pt")
        source = load_source({**cfg, "run": read_config(spath)["config"].get("source_run")}, device=device)
        source.extras["simplex"] = simplex
        return source

    def draw(self, source, options, seed: int) -> list:
        x, y = source.split()
        return make_batches(x, y, options["batch_size"], options["batches"], source.device)

    def prepare(self, ctx: ProbeContext) -> dict:
        o, src = ctx.options, ctx.source
        if o["to"] and o["directions"] != "interp":
            raise GradlabError(f"--to applies to --directions interp, not {o['directions']!r}")
        rng = None
        if o["range"] not in (None, ""):
            vals = parse_numbers(o["range"], "range")
            if len(vals) != 2:
                raise GradlabError(f"invalid range {o['range']!r}: expected lo,hi")
            rng = (vals[0], vals[1])
        make_axes(*(rng or (-1.0, 1.0)), o["steps"], o["dims"])  # steps/range/dims checked before any work
        ctx.state["range"] = rng
        simplex = src.extras.get("simplex")
        if simplex is not None:
            if o["dims"] != 2:
                raise GradlabError("--plane-vertices draws a plane: use --dims 2")
            which = [int(v) for v in parse_numbers(o["plane_vertices"], "plane vertices")]
            verts = [{n: t.to(ctx.device) for n, t in v.items()} for v in simplex["vertices"]]
            ctx.state["dset"] = simplex_plane(verts, which)
        else:
            to_w = None
            if o["to"]:
                other = load_run(o["to"], src.runs_dir, device=ctx.device, trust_code=src.trust_code)
                to_w = {n: p.detach() for n, p in other.model.named_parameters()}
            ctx.state["dset"] = choose_directions(o["directions"], ctx.model, dims=o["dims"], run_path=src.run_path,
                                                  to_weights=to_w, batches=ctx.batches[:4], include_bn=o["include_bn"],
                                                  seed=ctx.seed, device=ctx.device, loss_fn=ctx.loss_fn)
        return {"source_run": str(src.run_path)}

    def run(self, ctx: ProbeContext) -> ProbeReport:
        import pandas as pd

        from gradlab.landscape import plots

        o, dset, dims = ctx.options, ctx.state["dset"], ctx.options["dims"]
        t0 = time.perf_counter()
        res = landscape(ctx.model, dset, ctx.batches, steps=o["steps"], range_=ctx.state["range"],
                        points_per_call=o["points_per_call"], progress=ctx.report_progress,
                        loss_fn=ctx.loss_fn, precision=o["precision"])
        seconds = time.perf_counter() - t0
        table = res.frame()
        saved = {f"d{i + 1}": {n: t.detach().cpu() for n, t in d.items()} for i, d in enumerate(dset.directions)}
        saved["axes"] = torch.stack(res.axes) if dims == 2 else res.axes[0]
        if dset.centre is not None:
            saved["centre"] = {n: t.detach().cpu() for n, t in dset.centre.items()}
        if dset.path is not None:
            saved["trajectory"] = dset.path.detach().cpu()
        kind = "simplex plane" if "simplex" in ctx.source.extras else o["directions"]
        title = f"{kind} directions, {ctx.source.split_name} split"
        log_scale = plots.wants_log_scale(res.loss, o["log_scale"])  # one scale for every figure of the run
        if dims == 1:
            marks = {k: v[0] for k, v in dset.points.items()}
            figures = {"landscape_1d": plots.landscape_line(res.axes[0], res.loss, res.acc, log_scale=log_scale,
                                                            title=title, marks=marks)}
        else:
            figures = {"contour": plots.landscape_contour(res.axes, res.loss, log_scale=log_scale, title=title,
                                                          path=dset.path, points=dset.points),
                       "surface": plots.landscape_surface(res.axes, res.loss, log_scale=log_scale, title=title)}
        at0 = (res.coords == 0).all(dim=1)
        metrics = {"grid_points": len(table), "seconds": round(seconds, 3),
                   "ms_per_point": round(1e3 * seconds / len(table), 4),
                   "loss_min": float(res.loss.min()), "loss_max": float(res.loss.max()),
                   "plot_scale": "log" if log_scale else "linear"}
        if bool(at0.any()):
            metrics["centre_loss"] = float(res.loss[at0][0])
            metrics["centre_acc"] = float(res.acc[at0][0])
        metrics.update(dset.info)
        if o["lambda_max"]:
            from gradlab.curvature.eigen import eigsh
            from gradlab.curvature.hessian_op import HessianOperator

            top = eigsh(HessianOperator(ctx.model, ctx.loss_fn, data=ctx.batches[:4]), k=1, which="LA", tol=1e-4, seed=ctx.seed)
            metrics["lambda_max"] = float(top.values[0])
            metrics["lambda_max_converged"] = bool(top.converged)
        return ProbeReport(table=table, view=pd.DataFrame([metrics]), title="landscape",
                           histograms={"landscape/loss": res.loss.float()}, figures=figures,
                           artifacts={"directions.pt": saved}, metrics=metrics)
