"""Step quality: where an update lands on the local parabola (Cockpit's alpha), how far the
weights have moved from their initial values, and the update-to-weight ratio per layer.

Notation: weights ``w0`` before an update, ``w1`` after it, the step ``d = w1 - w0`` of length
``t = ||d||`` and direction ``u = d / t``; on the step's batch the loss ``f0`` and gradient
``g0`` at ``w0``, ``f1`` and ``g1`` at ``w1``.

* ``alpha`` (Mahsereci & Hennig 2015, "Probabilistic line searches"; Schneider, Dangel & Hennig
  2021, "Cockpit", the quantity ``Alpha``): the 1-D parabola ``q(s) = m0 + m1 s + m2 s^2`` is
  fitted by least squares to the four observations ``q(0) = f0``, ``q(t) = f1``,
  ``q'(0) = g0 . u`` and ``q'(t) = g1 . u`` (exact when the loss is quadratic along ``u``); with
  ``s_bar = -m1 / m2``, the other point of the parabola at the height of ``q(0)``,
  ``alpha = 2 t / s_bar - 1``: -1 for no move, 0 for landing in the minimum, 1 for landing on the
  other side at the starting height, above 1 for an overshoot that goes uphill. A parabola that
  opens downwards (``m2 <= 0``: still going downhill) is reported as -1, as Cockpit does. Cockpit
  takes ``f1, g1`` from the next step's batch and weights the fit by per-example variances; here
  ``f1, g1`` are measured on the same batch after the update (one extra forward and backward
  pass on the scheduled steps), so the fit is unweighted.
* ``update_ratio = ||d|| / ||w0||`` per layer (the parameters of one module) and for the whole
  model: about 1e-3 is the usual rule of thumb for a healthy rate (Karpathy's "CS231n").
* ``distance_from_init = ||w1 - w_init||`` per layer and in total (Cockpit's ``Distance``).

During training (``gradlab train --probe stepquality:every=N``) the probe is a callback that
copies the weights and gradients just before the scheduled updates and measures just after them
(see :mod:`gradlab.training.callbacks.stepquality`); other steps pay nothing. ``gradlab probe
stepquality --run R`` measures a plain gradient step of ``--lr`` from the run's weights on each
batch (no initial weights there: no distance).
"""

from __future__ import annotations

import math
from typing import Sequence

from gradlab.core.options import Option, Options
from gradlab.probes import PROBES, Probe, ProbeContext, ProbeReport
from gradlab.probes.source import batch_options

OPTIONS = batch_options(1, 128, "Batches to take a gradient step on (gradlab probe only)") + Options(
    Option("lr", float, 0.1, "Learning rate of the gradient step measured by gradlab probe (training measures "
           "the optimizer's own steps)", low=0, low_open=True),
    Option("layers", bool, True, "Also log the update ratio and distance from initialisation of each layer"),
)


def fit_parabola(t: float, f0: float, f1: float, df0: float, df1: float):
    """``(m0, m1, m2)`` of the least-squares parabola through the four observations of the
    module docstring (None when ``t == 0``: the observations are at one point)."""
    import numpy as np

    if t == 0.0 or not all(math.isfinite(v) for v in (t, f0, f1, df0, df1)):
        return None
    phi = np.array([[1.0, 0.0, 0.0], [1.0, t, t * t], [0.0, 1.0, 0.0], [0.0, 1.0, 2.0 * t]])
    coef, *_ = np.linalg.lstsq(phi, np.array([f0, f1, df0, df1], dtype=np.float64), rcond=None)
    return tuple(float(c) for c in coef)


def alpha(t: float, f0: float, f1: float, df0: float, df1: float) -> float:
    """Cockpit's local step size alpha of a step of length ``t`` (module docstring): -1 for no
    move or a concave fit, 0 at the parabola's minimum, 1 on its other side; NaN for a
    non-finite observation."""
    if t == 0.0:
        return -1.0
    mu = fit_parabola(t, f0, f1, df0, df1)
    if mu is None:
        return math.nan
    if mu[2] <= 0.0:
        return -1.0
    s_bar = -mu[1] / mu[2]
    if s_bar == 0.0:
        return math.inf
    return 2.0 * t / s_bar - 1.0


def _flat(tensors: Sequence):
    """The tensors side by side as one float64 vector (one copy; every sum below is one op)."""
    import torch

    return torch.cat([t.detach().reshape(-1) for t in tensors]).to(torch.float64)


def _squares(rows, sizes: Sequence[int]) -> list:
    """``[[sum of squares of each tensor's slice] for each row]`` of ``rows`` ``(m, n)``, the
    tensors being consecutive slices of ``sizes`` elements: every row at once, one read-back."""
    import torch

    return torch.stack([part.square().sum(1) for part in rows.split(list(sizes), 1)], 1).tolist()


def _alpha_of(d, g0, g1, f0: float, f1: float) -> dict:
    """:func:`step_alpha` from the flat step ``d`` and gradients (one product, one read-back)."""
    import torch

    dd, a, b = (torch.stack([d, g0, g1]) @ d).tolist()
    t = math.sqrt(dd)
    df0 = a / t if t > 0 else 0.0
    df1 = b / t if t > 0 else 0.0
    return {"alpha": alpha(t, f0, f1, df0, df1), "step_length": t, "slope_before": df0, "slope_after": df1}


def _by_layer(names: Sequence[str], squares: Sequence[float]) -> dict:
    """``{"all": norm, layer: norm, ...}`` from each parameter's sum of squares."""
    from gradlab.probes.gradstats import layer_of

    out: dict = {}
    for name, sq in zip(names, squares):
        out[layer_of(name)] = out.get(layer_of(name), 0.0) + sq
    return {"all": math.sqrt(sum(squares)), **{k: math.sqrt(v) for k, v in out.items()}}


def _ratios_of(names, sizes, d, w0, w1, init, layers: bool) -> dict:
    """:func:`ratios` from flat vectors (``init`` may be None): one reduction for all norms."""
    import torch

    rows = [d, w0] + ([w1 - init] if init is not None else [])
    squares = _squares(torch.stack(rows), sizes)
    step, size = _by_layer(names, squares[0]), _by_layer(names, squares[1])
    ratio = {k: (step[k] / size[k] if size[k] > 0 else (0.0 if step[k] == 0 else math.inf)) for k in step}
    out = {"update_ratio": ratio.pop("all")}
    if layers:
        out.update({f"update_ratio/{k}": v for k, v in ratio.items()})
    if init is not None:
        dist = _by_layer(names, squares[2])
        out["distance_from_init"] = dist.pop("all")
        if layers:
            out.update({f"distance/{k}": v for k, v in dist.items()})
    return out


def step_alpha(w0: Sequence, w1: Sequence, f0: float, g0: Sequence, f1: float, g1: Sequence) -> dict:
    """``{"alpha", "step_length", "slope_before", "slope_after"}`` of the update ``w0 -> w1``
    (lists of tensors) given the loss and gradient (lists of tensors) at both ends."""
    return _alpha_of(_flat(w1) - _flat(w0), _flat(g0), _flat(g1), f0, f1)


def layer_norms(names: Sequence[str], tensors: Sequence) -> dict:
    """``{layer: ||tensors of that layer||}`` (float64 sums of squares per module, see
    :func:`gradlab.probes.gradstats.layer_of`), with ``"all"``: the norm of everything."""
    if not tensors:
        return {"all": 0.0}
    return _by_layer(names, _squares(_flat(tensors)[None], [t.numel() for t in tensors])[0])


def ratios(names: Sequence[str], w0: Sequence, w1: Sequence, init: Sequence = None, layers: bool = True) -> dict:
    """The update ratios ``||w1 - w0|| / ||w0||`` and, given ``init``, the distances
    ``||w1 - init||``: ``{"update_ratio": all, "update_ratio/<layer>": ..., "distance_from_init":
    all, "distance/<layer>": ...}`` (a layer with zero weights has ratio ``inf``)."""
    a, b = _flat(w0), _flat(w1)
    return _ratios_of(names, [t.numel() for t in w0], b - a, a, b, None if init is None else _flat(init), layers)


def step_quality(names: Sequence[str], w0: Sequence, w1: Sequence, f0: float, g0: Sequence, f1: float,
                 g1: Sequence, init: Sequence = None, layers: bool = True) -> dict:
    """:func:`step_alpha` and :func:`ratios` together, each list flattened once (what the
    training callback logs on a scheduled step)."""
    a, b = _flat(w0), _flat(w1)
    d = b - a
    out = _alpha_of(d, _flat(g0), _flat(g1), f0, f1)
    out.update(_ratios_of(names, [t.numel() for t in w0], d, a, b, None if init is None else _flat(init), layers))
    return out


def loss_and_grad(model, loss_fn, x, y, params: Sequence) -> tuple[float, list]:
    """The loss on ``(x, y)`` and its gradient with respect to ``params`` (``.grad`` untouched;
    zeros for a parameter the loss does not reach)."""
    import torch

    loss = loss_fn(model(x), y)
    grads = torch.autograd.grad(loss, list(params), allow_unused=True)
    return float(loss.detach()), [torch.zeros_like(p) if g is None else g.detach() for g, p in zip(grads, params)]


@PROBES.register("stepquality", "step quality: Cockpit's alpha, update-to-weight ratio, distance from init",
                 options=OPTIONS, paper="Mahsereci & Hennig 2015; Schneider et al. 2021")
class StepQualityProbe(Probe):
    """Step quality (Cockpit's instruments): alpha, where an update lands on the parabola fitted to the loss and directional derivative before and after it (-1: no move, 0: the minimum, 1: the other side; Mahsereci & Hennig 2015, Schneider et al. 2021), the update-to-weight ratio ||dw|| / ||w|| per layer, and the distance from the initial weights.

    During training (--probe stepquality:every=N) it measures the optimizer's own updates on the scheduled steps (one extra forward and backward pass each) and logs alpha, the step length, the update ratios and the distances from initialisation. Run on a run (gradlab probe stepquality --run R) it measures a plain gradient step of --lr on each batch and writes stepquality.csv.
    """

    training_summary = ("alpha", "update_ratio", "distance_from_init")
    training_split = "step_quality"
    training_callback = "gradlab.training.callbacks.stepquality:StepQuality"

    def run(self, ctx: ProbeContext) -> ProbeReport:
        import pandas as pd
        import torch

        names = [n for n, p in ctx.model.named_parameters() if p.requires_grad]
        params = [p for n, p in ctx.model.named_parameters() if p.requires_grad]
        lr, rows = ctx.options["lr"], []
        for k, (x, y) in enumerate(ctx.batches):
            w0 = [p.detach().clone() for p in params]
            f0, g0 = loss_and_grad(ctx.model, ctx.loss_fn, x, y, params)
            try:
                with torch.no_grad():
                    for p, g in zip(params, g0):
                        p.sub_(lr * g)
                f1, g1 = loss_and_grad(ctx.model, ctx.loss_fn, x, y, params)
                w1 = [p.detach().clone() for p in params]
            finally:
                with torch.no_grad():
                    for p, w in zip(params, w0):
                        p.copy_(w)
            rows.append({"batch": k, "loss_before": f0, "loss_after": f1, **step_alpha(w0, w1, f0, g0, f1, g1),
                         **ratios(names, w0, w1, layers=ctx.options["layers"])})
            ctx.report_progress(k + 1, len(ctx.batches))
        table = pd.DataFrame(rows)
        scalars = {key: float(table[key].mean()) for key in ("alpha", "step_length", "update_ratio")}
        lines = [f"alpha {scalars['alpha']:.3g} for a gradient step of lr {lr:g} (-1: no move, 0: the parabola's "
                 f"minimum, 1: its other side); update/weight ratio {scalars['update_ratio']:.3g}"]
        view = table[["batch", "loss_before", "loss_after", "alpha", "step_length", "update_ratio"]]
        return ProbeReport(table=table, view=view, title="step quality of a gradient step", scalars=scalars,
                           summary_lines=lines, metrics={f"stepquality_{k}": v for k, v in scalars.items()})


__all__ = ["StepQualityProbe", "alpha", "fit_parabola", "layer_norms", "loss_and_grad", "ratios", "step_alpha",
           "step_quality"]
