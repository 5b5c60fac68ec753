"""Landscape and trajectory figures: the loss scale follows the loss's range, overlapping paths
stay visible, legends sit off the paths. Checked on the returned matplotlib objects, not pixels."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.contour import ContourSet
from torch import nn

from gradlab.landscape import plots
from gradlab.landscape.functions import build_function
from gradlab.landscape.grid import grid_coords, make_axes


def chaotic_grid(steps=25, corner=2e10, floor=0.05):
    """A plain56-like surface on [-1, 1]^2: loss ~0.05 near the centre, ~2e10 in the corners
    (log10 loss grows with the squared distance), flat (G,) in grid_coords order."""
    axes = make_axes(-1.0, 1.0, steps, 2)
    c = grid_coords(axes)
    r2 = (c ** 2).sum(1) / 2.0  # 1 in the corners
    loss = floor * (corner / floor) ** r2
    return axes, loss


def _contour_set(ax) -> ContourSet:
    return next(c for c in ax.collections if isinstance(c, ContourSet) and c.filled)


def _lowest_band_share(levels, z) -> float:
    """Share of grid cells whose plotted value falls into the lowest filled band."""
    return float(np.mean(np.asarray(z) <= levels[1]))


@pytest.mark.parametrize("values, expected", [
    ([1.0, 999.0], False), ([1.0, 1001.0], True), ([0.0, 1e-4, 5.0], True), ([0.0, 0.0], False),
    ([np.nan, np.inf, 1.0, 2.0], False), ([-1.0, 2.0], False),
])
def test_log_scale_rule_is_max_over_min_above_1e3(values, expected):
    assert plots.wants_log_scale(values) is expected
    assert plots.wants_log_scale(values, True) is True and plots.wants_log_scale(values, False) is False


def test_chaotic_contour_defaults_to_log_and_does_not_look_flat():
    axes, loss = chaotic_grid()
    fig = plots.landscape_contour(axes, loss)
    ax = fig.axes[0]
    assert "log" in fig.axes[1].get_ylabel()  # the colour bar says so
    cs = _contour_set(ax)
    z = np.log10(loss.numpy())
    assert cs.levels.min() <= z.min() + 1e-9 and cs.levels.max() >= z.max() - 1e-9
    # on a log scale the bands spread over the grid; on a linear one nearly every cell sits in
    # the lowest band (the surface "looks flat")
    assert _lowest_band_share(cs.levels, z) < 0.2
    flat = plots.landscape_contour(axes, loss, log_scale=False)
    assert flat.axes[1].get_ylabel() == "loss"
    assert _lowest_band_share(_contour_set(flat.axes[0]).levels, loss.numpy()) > 0.8


def test_narrow_contour_stays_linear_and_surface_line_compare_follow_the_rule():
    axes, loss = chaotic_grid(corner=2.0, floor=1.0)  # max/min = 2
    assert plots.landscape_contour(axes, loss).axes[1].get_ylabel() == "loss"
    assert plots.landscape_surface(axes, loss).axes[0].get_zlabel() == "loss"
    _, wide = chaotic_grid()
    assert "log" in plots.landscape_surface(axes, wide).axes[0].get_zlabel()
    line = plots.landscape_line(axes[0], wide[::25], torch.full((25,), 0.5))
    assert line.axes[0].get_yscale() == "log"
    assert plots.landscape_line(axes[0], loss[::25], torch.full((25,), 0.5)).axes[0].get_yscale() == "linear"
    both = plots.compare_landscapes([("a", axes, loss), ("b", axes, wide)])
    assert "log" in both.axes[-1].get_ylabel()  # shared colour bar: log, as the panels span 1 .. 2e10


def _probe_ctx(scale: float):
    """A LandscapeProbe context by hand: a linear classifier that fits its data (loss ~1e-4 at the
    centre) and random directions of norm ``scale`` times the weights'."""
    from gradlab.landscape.probe import OPTIONS, DirectionSet
    from gradlab.probes import PROBES
    from gradlab.probes.base import ProbeContext, as_probe

    torch.manual_seed(0)
    x = torch.randn(64, 4)
    model = nn.Linear(4, 3)
    with torch.no_grad():
        model.weight.copy_(torch.randn(3, 4) * 3)
        model.bias.zero_()
    y = model(x).argmax(1)
    with torch.no_grad():
        model.weight.mul_(4.0)
    d1 = {n: torch.randn_like(p) * scale * p.norm() / math.sqrt(p.numel()) for n, p in model.named_parameters()}
    d2 = {n: torch.randn_like(p) * scale * p.norm() / math.sqrt(p.numel()) for n, p in model.named_parameters()}
    options = {**OPTIONS.defaults(), "steps": 9}
    ctx = ProbeContext(model, torch.nn.functional.cross_entropy, [(x, y)], "cpu", 0, options,
                       SimpleNamespace(extras={}, split_name="train"))
    ctx.state.update(dset=DirectionSet([d1, d2]), range=None)
    return as_probe(PROBES.entry("landscape")), ctx


@pytest.mark.parametrize("scale, scale_name", [(3.0, "log"), (1e-3, "linear")])
def test_landscape_probe_figures_choose_the_scale(scale, scale_name):
    probe, ctx = _probe_ctx(scale)
    rep = probe.run(ctx)
    ratio = rep.metrics["loss_max"] / rep.metrics["loss_min"]
    assert (ratio > plots.LOG_RANGE) == (scale_name == "log")
    assert rep.metrics["plot_scale"] == scale_name
    contour, surface = rep.figures["contour"], rep.figures["surface"]
    assert ("log" in contour.axes[1].get_ylabel()) == (scale_name == "log")
    assert ("log" in surface.axes[0].get_zlabel()) == (scale_name == "log")


def _overlapping_traj():
    """Two optimizers with the same path (they agree), a third on its own."""
    t = np.linspace(0, 1, 40)
    rows = []
    for name, shift in (("sgd", 0.0), ("momentum", 0.0), ("adam", 0.3)):
        for k, tk in enumerate(t):
            rows.append({"optimizer": name, "step": k, "x": -1.5 + 2.5 * tk, "y": 1.5 - 1.5 * tk + shift})
    return pd.DataFrame(rows)


def _legend_outside(fig, ax) -> bool:
    fig.canvas.draw()
    legends = [leg for leg in fig.legends + [ax.get_legend()] if leg is not None]
    assert legends
    return all(not leg.get_window_extent().overlaps(ax.get_window_extent()) for leg in legends)


def test_overlapping_trajectories_stay_visible_and_legend_is_off_the_paths():
    fig = plots.trajectories_plot(build_function("rosenbrock"), _overlapping_traj())
    ax = fig.axes[0]
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    a, b, c = lines["sgd"], lines["momentum"], lines["adam"]
    styles = {(ln.get_linestyle(), ln.get_marker()) for ln in (a, b, c)}
    assert len(styles) == 3  # each path its own line style and marker
    assert len({ln.get_color() for ln in (a, b, c)}) == 3
    # the path drawn first is wider and underneath: it shows as a rim around the one on top
    assert a.get_linewidth() > b.get_linewidth() and a.get_zorder() < b.get_zorder()
    assert all(ln.get_alpha() is not None and ln.get_alpha() < 1 for ln in (a, b, c))
    assert _legend_outside(fig, ax)
    assert {"sgd", "momentum", "adam", "start"} <= {t.get_text() for leg in fig.legends for t in leg.get_texts()}


def test_contour_trajectory_legend_is_outside_the_axes():
    axes, loss = chaotic_grid(steps=9)
    path = torch.tensor([[-0.8, 0.9], [-0.2, 0.3], [0.0, 0.0]])
    fig = plots.landscape_contour(axes, loss, path=path, points={"final": (0.0, 0.0)})
    assert _legend_outside(fig, fig.axes[0])
