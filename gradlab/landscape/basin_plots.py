"""Figures of ``gradlab optimize --starts/--grid``: every start coloured by its basin, one panel
per optimizer, and the negative-gradient field that ``--arrows`` adds to the optimize plots."""

from __future__ import annotations

import math

import numpy as np
import torch

from gradlab.landscape.basins import DIVERGED, NOT_CONVERGED
from gradlab.landscape.plots import _function_grid, _function_levels, _plt

OTHER = "other"
MAX_COLOURED = 19  # basins with their own colour; the rest share one (tab20 has 20)


def gradient_field(ax, fn, view=None, n: int = 21) -> None:
    """Unit arrows along ``-grad f`` on an ``n`` x ``n`` lattice of ``view`` (directions only: the
    gradient's size spans orders of magnitude on Rosenbrock or Beale, and long arrows would hide the
    short ones); points where the gradient vanishes or is not finite get no arrow."""
    x0, x1, y0, y1 = fn.view if view is None else view
    X, Y = torch.meshgrid(torch.linspace(x0, x1, n, dtype=torch.float64),
                          torch.linspace(y0, y1, n, dtype=torch.float64), indexing="xy")
    X.requires_grad_(True)
    Y.requires_grad_(True)
    gx, gy = torch.autograd.grad(fn.value(X, Y).sum(), [X, Y])
    u, v = (-gx).numpy(), (-gy).numpy()
    size = np.hypot(u, v)
    keep = np.isfinite(size) & (size > 0)
    u = np.where(keep, u / np.where(keep, size, 1.0), np.nan)
    v = np.where(keep, v / np.where(keep, size, 1.0), np.nan)
    ax.quiver(X.detach().numpy(), Y.detach().numpy(), u, v, color="tab:cyan", alpha=0.7, angles="xy",
              pivot="mid", scale=n * 1.3, width=0.0025, zorder=2)


def basin_colours(labels) -> dict:
    """A colour per basin label: the known and found basins in order of size, ``diverged`` red,
    ``not converged`` grey, and beyond :data:`MAX_COLOURED` basins one shared colour."""
    plt = _plt()
    cmap = plt.get_cmap("tab20")
    named = [b for b in labels if b not in (DIVERGED, NOT_CONVERGED)]
    colours = {}
    palette = [cmap(i) for i in range(20) if i not in (6, 7, 14, 15)]  # no reds and greys
    for i, b in enumerate(named):
        colours[b] = palette[i % len(palette)] if i < MAX_COLOURED else (0.3, 0.3, 0.3, 1.0)
    colours[DIVERGED] = (0.84, 0.15, 0.16, 1.0)
    colours[NOT_CONVERGED] = (0.6, 0.6, 0.6, 1.0)
    return colours


def basins_plot(fn, table, *, arrows: bool = False, title: str = ""):
    """One panel per optimizer: the function's contours, each start as a dot in the colour of its
    basin (:func:`basin_colours`, the same across panels), the known minima as stars; a shared
    legend (basins beyond :data:`MAX_COLOURED` grouped as ``other``)."""
    plt = _plt()
    names = list(dict.fromkeys(table["optimizer"]))
    sizes = table["basin"].value_counts()
    colours = basin_colours(list(sizes.index))
    n = len(names)
    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    fig, axs = plt.subplots(nrows, ncols, figsize=(4.4 * ncols + 2.2, 4.2 * nrows), squeeze=False,
                            layout="constrained")
    X, Y, Z = _function_grid(fn, fn.view, n=150)
    levels = _function_levels(Z)
    per = max(1, len(table) // max(n, 1))
    dot = float(np.clip(2.5e4 / per, 2, 60))
    for ax, name in zip(axs.flat, names):
        ax.contour(X, Y, Z, levels=levels, colors="k", linewidths=0.3, alpha=0.4)
        rows = table[table["optimizer"] == name]
        ax.scatter(rows["start_x"], rows["start_y"], c=[colours[b] for b in rows["basin"]], s=dot, marker="s",
                   linewidths=0, zorder=3)
        if arrows:
            gradient_field(ax, fn)
        for m in fn.minima:
            ax.plot([m[0]], [m[1]], "*", color="gold", markeredgecolor="k", markersize=12, zorder=5)
        counts = rows["basin"].value_counts()
        ax.set_title(f"{name}: {len(counts)} basin(s)", fontsize=10)
        ax.set_xlim(fn.view[0], fn.view[1])
        ax.set_ylim(fn.view[2], fn.view[3])
        ax.set_aspect("equal", adjustable="box")
        ax.set_xlabel("start x")
        ax.set_ylabel("start y")
    for ax in list(axs.flat)[n:]:
        ax.axis("off")
    shown = [b for b in sizes.index if b in (DIVERGED, NOT_CONVERGED)
             or list(colours).index(b) < MAX_COLOURED]
    handles = [plt.Line2D([], [], marker="s", linestyle="", color=colours[b], label=f"{b} ({sizes[b]})")
               for b in shown]
    hidden = len(sizes) - len(shown)
    if hidden:
        handles.append(plt.Line2D([], [], marker="s", linestyle="", color=(0.3, 0.3, 0.3, 1.0),
                                  label=f"{OTHER}: {hidden} more basin(s)"))
    fig.legend(handles=handles, loc="outside right upper", fontsize=8, title="basin (starts, all panels)")
    fig.suptitle(title or f"{fn.name}: basins of attraction ({per} starts per optimizer)")
    return fig
