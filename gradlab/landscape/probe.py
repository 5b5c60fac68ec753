"""The core of ``gradlab probe landscape``: choose the directions, then evaluate the grid.

:func:`choose_directions` returns the directions plus what the plot needs (the projected training
trajectory for ``pca``, marked points for ``interp`` and simplex planes) and the range to use
when the user gave none. :func:`landscape` evaluates the grid (:mod:`gradlab.landscape.grid`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from gradlab.core.errors import GradlabError
from gradlab.runs.checkpoints import load_checkpoint
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
from gradlab.landscape.grid import GridResult, evaluate_grid, grid_coords, make_axes

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
        dirs, vals = eigen_directions(model, batches, k=dims, seed=seed)
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
) -> GridResult:
    """Evaluate loss and accuracy on the ``steps``-per-axis grid spanned by ``dset``."""
    lo, hi = dset.default_range if range_ is None else range_
    axes = make_axes(lo, hi, steps, len(dset.directions))
    return evaluate_grid(model, dset.directions, grid_coords(axes), batches, centre=dset.centre,
                         points_per_call=points_per_call, progress=progress, axes=axes)
