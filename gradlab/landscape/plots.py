"""Figures for landscapes, optimizer trajectories, simplexes and mode-connecting curves.

Every function returns a matplotlib figure and draws nothing on screen; the caller saves it
(``RunDir.save_figure`` writes the PNG and the TensorBoard image, then closes it).
Grid values arrive as flat (G,) tensors in :func:`gradlab.landscape.grid.grid_coords` order
(first axis slowest), reshaped here to (len(x), len(y)).

Loss scale: every landscape figure takes ``log_scale`` True (log10 of the loss), False (the loss)
or None (the default: decide from the values, :func:`wants_log_scale`). A loss that spans more
than :data:`LOG_RANGE` (max / min over the grid) is drawn on a log scale: on a linear one, a
chaotic surface whose corners reach 2e10 (plain56 in Li et al.'s Fig. 5) shows one bright corner
and a flat plain, and every contour near the minimum falls into the lowest level.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch


def _plt():
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg", "module://matplotlib_inline.backend_inline"):
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


LOG_RANGE = 1e3  # max/min of the loss above which a landscape is drawn on a log scale


def wants_log_scale(values, log_scale: Optional[bool] = None) -> bool:
    """``log_scale`` when it is given, else whether ``max / min`` of the finite positive values
    exceeds :data:`LOG_RANGE` (values <= 0 count with the smallest positive one: a loss of exactly
    0 next to 1e-5 does not make the range infinite)."""
    if log_scale is not None:
        return bool(log_scale)
    z = np.asarray(values, dtype=np.float64).ravel()
    pos = z[np.isfinite(z) & (z > 0)]
    return bool(pos.size) and float(pos.max()) > LOG_RANGE * float(pos.min())


def scale_label(log_scale: bool, quantity: str = "loss") -> str:
    """Axis / colour-bar label that says which scale is drawn."""
    return f"log10 {quantity} (log scale)" if log_scale else quantity


def _z(values, log_scale: bool):
    """The plotted values: log10 with values <= 0 at the smallest positive one (the floor of the
    colour scale, rather than a 1e-12 that would stretch it)."""
    z = np.asarray(values, dtype=np.float64)
    if log_scale:
        pos = z[np.isfinite(z) & (z > 0)]
        floor = float(pos.min()) if pos.size else 1e-12
        z = np.log10(np.where(np.isnan(z), np.nan, np.clip(z, floor, None)))
    return z


def grid_matrix(axes: Sequence[torch.Tensor], values) -> np.ndarray:
    """(len(y), len(x)) matrix of a flat grid quantity, as ``contour(X, Y, Z)`` wants it."""
    nx, ny = len(axes[0]), len(axes[1])
    return np.asarray(values, dtype=np.float64).reshape(nx, ny).T


def landscape_line(axis, loss, acc, *, log_scale=None, title="", xlabel="alpha", marks: Optional[dict] = None):
    """1-D landscape: loss (left axis; a log axis where :func:`wants_log_scale`) and accuracy
    (right axis) along one direction."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    x = np.asarray(axis, dtype=np.float64)
    log_scale = wants_log_scale(loss, log_scale)
    ax.plot(x, _z(loss, False), color="tab:blue", label="loss")
    if log_scale:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("loss (log scale)" if log_scale else "loss", color="tab:blue")
    acc = np.asarray(acc, dtype=np.float64)
    if np.isfinite(acc).any():
        ax2 = ax.twinx()
        ax2.plot(x, acc, color="tab:orange", linestyle="--", label="accuracy")
        ax2.set_ylabel("accuracy", color="tab:orange")
        ax2.set_ylim(0, 1.02)
    for label, pos in (marks or {}).items():
        ax.axvline(pos, color="grey", linewidth=0.8, linestyle=":")
        ax.annotate(label, (pos, 1.0), xycoords=("data", "axes fraction"), ha="center", va="bottom", fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def landscape_contour(axes, loss, *, log_scale=None, title="", path=None, points: Optional[dict] = None,
                      labels=("d1", "d2"), ax=None, levels=30):
    """Filled contour of a 2-D landscape; ``path`` (T, 2) draws a projected trajectory and
    ``points`` {label: (x, y)} marks special points (the centre, simplex vertices, ...).
    ``log_scale=None`` chooses the scale from the loss's range (:func:`wants_log_scale`); the
    colour bar's label names it. The trajectory's legend sits below the axes, off the paths."""
    plt = _plt()
    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(6, 5.4), layout="constrained")
    log_scale = wants_log_scale(loss, log_scale)
    X, Y = np.meshgrid(np.asarray(axes[0]), np.asarray(axes[1]))
    Z = grid_matrix(axes, _z(loss, log_scale))
    cs = ax.contourf(X, Y, Z, levels=levels, cmap="viridis")
    ax.contour(X, Y, Z, levels=levels, colors="k", linewidths=0.3, alpha=0.5)
    (fig or ax.figure).colorbar(cs, ax=ax, label=scale_label(log_scale))
    if path is not None:
        p = np.asarray(path, dtype=np.float64)
        # orange shows on viridis and, unlike white, in the legend below the axes
        ax.plot(p[:, 0], p[:, 1], ".-", color="tab:orange", linewidth=1.4, markersize=5, label="trajectory", zorder=4)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), fontsize=8, ncol=2, frameon=False)
    for label, (px, py) in (points or {}).items():
        ax.plot([px], [py], "r*", markersize=10, zorder=5)
        ax.annotate(label, (px, py), textcoords="offset points", xytext=(4, 4), color="white", fontsize=8, zorder=5)
    ax.set_xlabel(labels[0])
    ax.set_ylabel(labels[1])
    ax.set_aspect("equal", adjustable="box")
    ax.set_title(title)
    return fig if fig is not None else ax.figure


def landscape_surface(axes, loss, *, log_scale=None, title=""):
    """3-D surface of a 2-D landscape (scale chosen as in :func:`landscape_contour`)."""
    plt = _plt()
    fig = plt.figure(figsize=(7, 5))
    ax = fig.add_subplot(projection="3d")
    log_scale = wants_log_scale(loss, log_scale)
    X, Y = np.meshgrid(np.asarray(axes[0]), np.asarray(axes[1]))
    Z = grid_matrix(axes, _z(loss, log_scale))
    ax.plot_surface(X, Y, Z, cmap="viridis", linewidth=0, antialiased=True)
    ax.set_xlabel("d1")
    ax.set_ylabel("d2")
    ax.set_zlabel(scale_label(log_scale))
    ax.set_title(title)
    return fig


def _function_grid(fn, view, n=200):
    x0, x1, y0, y1 = view
    xs = torch.linspace(x0, x1, n, dtype=torch.float64)
    ys = torch.linspace(y0, y1, n, dtype=torch.float64)
    X, Y = torch.meshgrid(xs, ys, indexing="xy")
    return X.numpy(), Y.numpy(), fn.value(X, Y).detach().numpy()


def _function_levels(Z):
    """Contour levels spread by quantiles, so steep functions (Rosenbrock) keep detail near the valley."""
    q = np.unique(np.quantile(Z[np.isfinite(Z)], np.linspace(0, 1, 31)))
    return q if len(q) > 2 else 20


LINESTYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "h")


def path_style(i: int, n_points: int) -> dict:
    """Line style of the ``i``-th of several paths drawn on one axes, so that paths that overlap
    (two optimizers that agree, a path that retraces itself) all stay visible: its own colour,
    line style and marker (every ~15th point), a line narrower than the one drawn before it
    (each earlier path shows as a rim around the later ones), translucent, and drawn above the
    earlier ones."""
    return {"color": f"C{i % 10}", "linestyle": LINESTYLES[i % len(LINESTYLES)],
            "marker": MARKERS[i % len(MARKERS)], "markevery": max(1, n_points // 15), "markersize": 5,
            "markerfacecolor": "none", "linewidth": max(0.8, 3.2 - 0.6 * i), "alpha": 0.8, "zorder": 3 + i}


def trajectories_plot(fn, traj, *, title="", view=None, arrows=False):
    """Contour of a 2-D test function with every optimizer's path (``traj``: the
    ``optimizer,step,x,y,...`` DataFrame; styles from :func:`path_style`); start, minima and
    saddles marked. The legend sits outside the axes, to the right of the colour bar, so it
    hides no path. Paths leaving the view are clipped at its border. ``arrows``: the
    negative-gradient field (:func:`gradlab.landscape.basin_plots.gradient_field`)."""
    plt = _plt()
    view = fn.view if view is None else view
    X, Y, Z = _function_grid(fn, view)
    fig, ax = plt.subplots(figsize=(8.6, 6), layout="constrained")
    cs = ax.contourf(X, Y, Z, levels=_function_levels(Z), cmap="Greys_r", alpha=0.85)
    fig.colorbar(cs, ax=ax, label=f"{fn.name}(x, y)")
    if arrows:
        from gradlab.landscape.basin_plots import gradient_field

        gradient_field(ax, fn, view)
    for i, (name, grp) in enumerate(traj.groupby("optimizer", sort=False)):
        ax.plot(grp["x"].to_numpy(), grp["y"].to_numpy(), label=name, **path_style(i, len(grp)))
    first = traj.iloc[0]
    ax.plot([first["x"]], [first["y"]], "ko", markersize=7, label="start", zorder=20)
    for j, m in enumerate(fn.minima):
        ax.plot([m[0]], [m[1]], "g*", markersize=12, zorder=21, label="minimum" if j == 0 else None)
    for j, s in enumerate(fn.saddles):
        ax.plot([s[0]], [s[1]], "rx", markersize=10, markeredgewidth=2, zorder=21, label="saddle" if j == 0 else None)
    ax.set_xlim(view[0], view[1])
    ax.set_ylim(view[2], view[3])
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    fig.legend(*ax.get_legend_handles_labels(), loc="outside right upper", fontsize=8)
    ax.set_title(title or f"{fn.name}: optimizer trajectories")
    return fig


def trajectories_gif(fn, traj, path, *, fps=15, max_frames=60, view=None) -> bool:
    """Animated GIF of the trajectories (PillowWriter); returns False when pillow is missing."""
    try:
        import PIL  # noqa: F401
    except ImportError:
        return False
    plt = _plt()
    from matplotlib.animation import FuncAnimation, PillowWriter

    view = fn.view if view is None else view
    X, Y, Z = _function_grid(fn, view, n=120)
    fig, ax = plt.subplots(figsize=(6.4, 4), layout="constrained")
    # an image, not filled contours: every frame re-renders the background, and an image of
    # quantile-ranked values draws ~10x faster while showing the same level structure
    levels = _function_levels(Z)
    ranks = np.digitize(Z, levels) if not isinstance(levels, int) else Z
    ax.imshow(ranks, origin="lower", extent=view, cmap="Greys_r", alpha=0.85, aspect="auto")
    ax.set_xlim(view[0], view[1])
    ax.set_ylim(view[2], view[3])
    groups = [(n, g[["x", "y"]].to_numpy()) for n, g in traj.groupby("optimizer", sort=False)]
    lines = [ax.plot([], [], label=n, **path_style(i, len(p)))[0] for i, (n, p) in enumerate(groups)]
    fig.legend(loc="outside right upper", fontsize=8)  # off the paths
    steps = max(len(p) for _, p in groups)
    frames = np.unique(np.linspace(1, steps, min(max_frames, steps)).astype(int))

    def update(k):
        for line, (_, p) in zip(lines, groups):
            line.set_data(p[:k, 0], p[:k, 1])
        ax.set_title(f"{fn.name}: step {k - 1}")
        return lines

    FuncAnimation(fig, update, frames=frames, blit=False).save(str(path), writer=PillowWriter(fps=fps), dpi=72)
    plt.close(fig)
    return True


def connect_plot(table, *, curve="bezier", title=""):
    """Loss and accuracy along the trained curve against the straight line (``connect.csv``)."""
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    a1.plot(table["t"], table["loss"], "o-", label=f"{curve} curve")
    a1.plot(table["t"], table["line_loss"], "s--", label="straight line")
    a1.set_xlabel("t")
    a1.set_ylabel("loss")
    a1.legend()
    a2.plot(table["t"], table["acc"], "o-", label=f"{curve} curve")
    a2.plot(table["t"], table["line_acc"], "s--", label="straight line")
    a2.set_xlabel("t")
    a2.set_ylabel("accuracy")
    a2.legend()
    fig.suptitle(title or "mode connectivity")
    fig.tight_layout()
    return fig


def simplex_plot(table, *, title=""):
    """Loss and accuracy at the simplex's vertices, centre, interior samples and the ensemble."""
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    colors = {"vertex": "tab:red", "centre": "tab:green", "sample": "tab:blue", "ensemble": "tab:purple"}
    for kind, grp in table.groupby("kind", sort=False):
        a1.scatter(grp["point"], grp["loss"], color=colors.get(kind, "k"), label=kind)
        a2.scatter(grp["point"], grp["acc"], color=colors.get(kind, "k"), label=kind)
    for ax, lab in ((a1, "loss"), (a2, "accuracy")):
        ax.set_ylabel(lab)
        ax.tick_params(axis="x", rotation=70, labelsize=7)
        ax.legend(fontsize=8)
    fig.suptitle(title or "simplex")
    fig.tight_layout()
    return fig


def compare_landscapes(items, *, log_scale=None, title="", ncols=None, zmax=None):
    """Side-by-side contours of several 2-D landscapes: ``items`` = [(title, axes, loss), ...],
    one shared colour scale so the panels compare directly (``log_scale=None``: log where the
    losses of all panels together span more than :data:`LOG_RANGE`); values above ``zmax`` (in
    plotted units, i.e. log10 loss on a log scale) saturate, so one exploding panel does not
    flatten the others."""
    plt = _plt()
    log_scale = wants_log_scale(np.concatenate([np.asarray(loss, dtype=np.float64).ravel() for _, _, loss in items]),
                                log_scale)
    n = len(items)
    ncols = ncols or n
    nrows = (n + ncols - 1) // ncols
    fig, axs = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 4.0 * nrows), squeeze=False)
    zs = [grid_matrix(a, _z(loss, log_scale)) for _, a, loss in items]
    lo, hi = min(float(np.nanmin(z)) for z in zs), max(float(np.nanmax(z)) for z in zs)
    if zmax is not None:
        hi = min(hi, zmax)
        zs = [np.minimum(z, hi) for z in zs]
    levels = np.linspace(lo, hi, 30)
    cs = None
    for ax, (name, a, _), Z in zip(axs.flat, items, zs):
        X, Y = np.meshgrid(np.asarray(a[0]), np.asarray(a[1]))
        cs = ax.contourf(X, Y, Z, levels=levels, cmap="viridis")
        ax.contour(X, Y, Z, levels=levels, colors="k", linewidths=0.3, alpha=0.5)
        ax.plot([0], [0], "r*", markersize=8)
        ax.set_title(name)
        ax.set_aspect("equal", adjustable="box")
    for ax in list(axs.flat)[n:]:
        ax.axis("off")
    fig.colorbar(cs, ax=axs.ravel().tolist(), label=scale_label(log_scale), shrink=0.85)
    if title:
        fig.suptitle(title)
    return fig
