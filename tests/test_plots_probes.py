"""Gradient-norm and Jacobian figures: integer layer ticks; zeros (dead layers, zero singular
values) counted and named, never drawn at 1e-37. Checked on the returned matplotlib objects."""

from __future__ import annotations

import math

import numpy as np
import torch
from matplotlib.patches import Rectangle
from torch import nn

from gradlab.models.base import GradlabNet, Normalize
from gradlab.probes.gradnorm import gradnorm_probe
from gradlab.probes.jacobian import jacobian_probe
from gradlab.probes.spectra_plots import depth_figure, gradnorm_figure, numerical_zeros, spectra_figure


def mlp(depth=3, width=6, d_in=5, n_out=3, dead=None, seed=0):
    """GradlabNet of Linear+ReLU blocks; block ``dead`` gets bias -1e3, so its ReLU never fires."""
    torch.manual_seed(seed)
    blocks, prev = [], d_in
    for i in range(depth):
        lin = nn.Linear(prev, width)
        if i == dead:
            nn.init.constant_(lin.bias, -1e3)
        blocks.append(nn.Sequential(lin, nn.ReLU()))
        prev = width
    return GradlabNet(Normalize([0.5], [0.25]), blocks, nn.Linear(prev, n_out))


def data(n=16, d_in=5, n_out=3):
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, d_in, generator=g), torch.randint(0, n_out, (n,), generator=g)


def _integer_ticks(ax) -> bool:
    ticks = ax.get_xticks()
    lo, hi = ax.get_xlim()
    shown = ticks[(ticks >= lo - 1e-9) & (ticks <= hi + 1e-9)]
    return len(shown) >= 2 and bool(np.all(np.abs(shown - np.round(shown)) < 1e-9))


def _texts(ax) -> str:
    return "\n".join(t.get_text() for t in ax.texts)


def test_gradnorm_figure_has_integer_layer_ticks():
    fig = gradnorm_figure(gradnorm_probe(mlp(depth=2), nn.CrossEntropyLoss(), [data()]))
    assert _integer_ticks(fig.axes[0])  # layers 0, 1, 2: never a tick at 0.25


def test_gradnorm_dead_layer_is_counted_not_drawn_near_zero():
    rep = gradnorm_probe(mlp(dead=0), nn.CrossEntropyLoss(), [data()])
    assert rep.layers[0].grad_norm == 0.0  # the dead block passes no gradient to its parameters
    ax = gradnorm_figure(rep).axes[0]
    note = _texts(ax)
    assert "1 layer with zero grad norm (dead): blocks.0" in note
    # the zero is marked on the bottom edge (axes coordinates), not as a data point at ~0
    edge = [ln for ln in ax.get_lines() if ln.get_label() == "zero (not on a log axis)"]
    assert len(edge) == 1 and list(edge[0].get_xdata()) == [0.0]
    lo, _ = ax.get_ylim()
    assert lo > 1e-30
    for ln in ax.get_lines():
        if ln is not edge[0]:
            y = np.asarray(ln.get_ydata(), dtype=float)
            assert not (y[np.isfinite(y)] < 1e-30).any()


def test_numerical_zeros_follow_the_matrix_rank_rule():
    eps = np.finfo(np.float32).eps  # tolerance: max(m, n) * eps * s_max = 6 * eps * 3
    sv = np.array([[3.0, 1.0, 3.0 * 6 * eps * 1.01, 3.0 * 6 * eps * 0.99, 1e-37], [0.0] * 5])
    assert numerical_zeros(sv, 6, 5).tolist() == [[False, False, False, True, True], [True] * 5]
    assert numerical_zeros(np.array([[1.0, 1e-5]]), 6, 4).tolist() == [[False, False]]


def _bars(ax) -> list:
    return [p for p in ax.patches if isinstance(p, Rectangle) and p.get_height() > 0]


def test_spectra_figure_counts_zero_singular_values_instead_of_a_bar_far_left():
    rep = jacobian_probe(mlp(dead=1), data(n=4)[0])
    fig = spectra_figure(rep)
    panels = {ax.get_title().split(" (")[0]: ax for ax in fig.axes}
    dead = panels["blocks.1"]
    assert "24 of 24 zero" in _texts(dead)  # 4 examples x 6 singular values, all exactly zero
    assert _bars(dead) == []
    alive = panels["blocks.0"]
    assert _bars(alive) and all(p.get_x() > -20 for p in _bars(alive))
    # the end-to-end map through a dead block is zero too: 4 examples x min(3, 5) values
    assert "12 of 12 zero" in _texts(panels["input-output"]) and _bars(panels["input-output"]) == []


def test_depth_figure_marks_zero_layers_and_uses_integer_ticks():
    rep = jacobian_probe(mlp(dead=1), data(n=4)[0])
    ax = depth_figure(rep).axes[0]
    assert _integer_ticks(ax)
    assert "zero spectral norm (dead): blocks.1" in _texts(ax)
    edge = [ln for ln in ax.get_lines() if ln.get_label() == "zero (not on a log axis)"]
    assert len(edge) == 1 and 1.0 in list(edge[0].get_xdata())
    assert not math.isclose(ax.get_ylim()[0], 0.0)


def test_rank_deficient_layer_zero_singular_values_match_the_exact_rank():
    """Half the units of block 0 never fire: its Jacobian (6 x 5) has rank <= 3, and the float32
    SVD returns the missing singular values as rounding noise. The figure counts them as zeros,
    as many as the float64 Jacobian's exact rank says."""
    model = mlp(depth=2, width=6)
    with torch.no_grad():
        model.blocks[0][0].bias[:3] = -1e3
    x = data(n=4)[0]
    rep = jacobian_probe(model, x)
    m64 = model.double()
    expected = {}
    for i, h in enumerate(m64.block_inputs(x.double())[:2]):
        block = m64.blocks[i]
        ranks = [np.linalg.matrix_rank(torch.autograd.functional.jacobian(block, hk).numpy()) for hk in h]
        expected[f"blocks.{i}"] = sum(min(6, h.shape[1]) - r for r in ranks)
    assert expected["blocks.0"] >= 8  # at least 2 of 5 per example
    fig = spectra_figure(rep)
    panels = {ax.get_title().split(" (")[0]: ax for ax in fig.axes}
    for name, n_zero in expected.items():
        total = 4 * min(6, 5 if name == "blocks.0" else 6)
        if n_zero:
            assert f"{n_zero} of {total} zero" in _texts(panels[name])
        else:
            assert "zero" not in _texts(panels[name])
    ax = depth_figure(rep).axes[0]
    assert "zero min singular value (dead): blocks.0" in _texts(ax)
