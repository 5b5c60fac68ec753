"""Gradient statistics from per-example gradients: variance, signal-to-noise ratio, the gradient
noise scale and the sample-size tests of adaptive-batch methods.

Notation: a batch of ``B`` examples, per-example gradients ``g_i`` (of each example's own loss,
:func:`gradlab.curvature.per_example.per_example_grads`), their mean ``g`` (the mini-batch
gradient), ``v_i = g_i . g``. All statistics are computed in float64, per layer (the parameters
of one module) and for the whole model:

* ``variance`` ``V = sum_i ||g_i - g||^2 / (B - 1)``: the trace of the sample covariance of one
  example's gradient (an unbiased estimate of ``tr Sigma``).
* ``snr = ||g||^2 / (V / B)``: the squared norm of the mini-batch gradient over the estimated
  variance of that mean; below 1 the batch gradient is mostly noise.
* ``b_simple = V / (||g||^2 - V / B)``: the simple gradient noise scale ``tr Sigma / |G|^2`` of
  McCandlish et al. 2018 ("An empirical model of large-batch training", eq. 2.8 and App. A),
  with the unbiased estimate of the true gradient's squared norm in the denominator. It
  estimates the critical batch size: well below it, doubling the batch almost halves the steps
  needed; well above it, larger batches buy little. ``inf`` when the estimate of ``|G|^2`` is
  not positive (the noise swamps the signal at this batch size).
* ``norm_test = sqrt(V / (B ||g||^2))``: the smallest ``theta`` for which the norm test of Byrd
  et al. 2012 ("Sample size selection in optimization methods for machine learning", eq. 3.9)
  holds; ``norm_test_batch = V / (theta^2 ||g||^2)`` is the batch size it asks for at the chosen
  ``theta``.
* ``inner_product_test = sqrt(sum_i (v_i - ||g||^2)^2 / (B - 1) / (B ||g||^4))`` and
  ``orthogonality_test = sqrt(sum_i ||g_i - (v_i / ||g||^2) g||^2 / (B - 1) / (B ||g||^2))``:
  the smallest ``theta`` and ``nu`` for which the inner-product and orthogonality tests of
  Bollapragada, Byrd & Nocedal 2018 ("Adaptive sampling strategies for stochastic
  optimization") hold.

With several batches, each statistic is computed per batch and averaged (``*_std``: the spread).
"""

from __future__ import annotations

import math
from typing import Mapping

from gradlab.core.options import Option, Options
from gradlab.probes import PROBES, Probe, ProbeContext, ProbeReport
from gradlab.probes.source import batch_options

STATS = ("variance", "snr", "b_simple", "norm_test", "norm_test_batch", "inner_product_test", "orthogonality_test")

OPTIONS = batch_options(1, 128, "Batches to average the statistics over") + Options(
    Option("theta", float, 0.9, "Norm-test tolerance theta for the batch size it suggests (norm_test_batch)",
           low=0, low_open=True),
    Option("chunk_size", int, 0, "Examples per vmap chunk of per-example gradients (0: the whole batch); "
           "smaller bounds the memory", low=0),
)


def moments(grads):
    """``(s, v, ||g||^2)`` of ``(B, n)`` per-example gradients, in float64: ``s_i = ||g_i||^2``,
    ``v_i = g_i . g``. Every statistic is a function of these, and they add up over blocks of
    parameters, so the whole model's come from its layers' without concatenating them."""
    import torch

    g_i = grads.detach().reshape(grads.shape[0], -1).to(torch.float64)
    g = g_i.mean(0)
    return (g_i * g_i).sum(1), g_i @ g, float(g.dot(g))


def statistics_from_moments(s, v, g2: float, theta: float = 0.9) -> dict:
    """The statistics of the module docstring from :func:`moments` (``B = len(s) >= 2``), using
    ``sum_i ||g_i - g||^2 = sum_i s_i - B ||g||^2`` and
    ``sum_i ||g_i - (v_i / ||g||^2) g||^2 = sum_i s_i - sum_i v_i^2 / ||g||^2``."""
    b = len(s)
    if b < 2:
        raise ValueError("gradient statistics need at least two examples")
    total = float(s.sum())
    variance = max(total - b * g2, 0.0) / (b - 1)
    out = {"grad_sq_norm": g2, "variance": variance}
    if g2 == 0.0:
        nan = math.nan
        return {**out, "snr": 0.0, "b_simple": math.inf, "norm_test": math.inf, "norm_test_batch": math.inf,
                "inner_product_test": nan, "orthogonality_test": nan}
    true_g2 = g2 - variance / b
    ortho = max(total - float((v * v).sum()) / g2, 0.0)
    out.update(
        snr=g2 / (variance / b) if variance > 0 else math.inf,
        b_simple=variance / true_g2 if true_g2 > 0 else math.inf,
        norm_test=math.sqrt(variance / (b * g2)),
        norm_test_batch=variance / (theta ** 2 * g2),
        inner_product_test=math.sqrt(float(((v - g2) ** 2).sum()) / (b - 1) / (b * g2 ** 2)),
        orthogonality_test=math.sqrt(ortho / (b - 1) / (b * g2)),
    )
    return out


def gradient_statistics(grads, theta: float = 0.9) -> dict:
    """The statistics of the module docstring for one group of per-example gradients.

    Args:
        grads: ``(B, n)`` per-example gradients (any float dtype; computed in float64), ``B >= 2``.
        theta: the norm-test tolerance for ``norm_test_batch``.
    Returns:
        ``{"grad_sq_norm": ||g||^2, "variance": ..., "snr": ..., ...}`` as floats.
    """
    return statistics_from_moments(*moments(grads), theta=theta)


def layer_of(param_name: str) -> str:
    """The module a parameter belongs to (``blocks.0.weight`` -> ``blocks.0``)."""
    return param_name.rsplit(".", 1)[0] if "." in param_name else param_name


def grouped(grads: Mapping) -> dict:
    """``{layer: (B, n_layer)}``: the per-example gradients of each module's parameters side by side."""
    import torch

    groups: dict = {}
    for name, g in grads.items():
        groups.setdefault(layer_of(name), []).append(g.reshape(g.shape[0], -1))
    return {layer: torch.cat(parts, 1) for layer, parts in groups.items()}


def per_example_moments(model, loss_fn, x, y, chunk_size: int = 0, method: str = "auto") -> dict:
    """``{layer: moments}`` (:func:`moments`) of one batch. ``method="auto"``: for models made
    of Linear layers, from each layer's inputs and output gradients without forming per-example
    gradients (:func:`gradlab.curvature.per_example_linear.linear_moments`), else (and with
    ``"vmap"``) from :func:`gradlab.curvature.per_example.per_example_grads`."""
    from gradlab.curvature.per_example import per_example_grads

    if method == "auto":
        from gradlab.curvature.per_example_linear import linear_moments

        ghost = linear_moments(model, loss_fn, x, y)
        if ghost is not None:
            return ghost
    grads = per_example_grads(model, loss_fn, x, y, chunk_size=chunk_size or None)
    return {layer: moments(g) for layer, g in grouped(grads).items()}


def batch_statistics(model, loss_fn, x, y, theta: float = 0.9, chunk_size: int = 0) -> dict:
    """``{"all": stats, layer: stats, ...}`` of :func:`gradient_statistics` for one batch (the
    model as it is: put BatchNorm models in eval mode first, see
    :mod:`gradlab.curvature.per_example`); the moments come from :func:`per_example_moments`."""
    layers = per_example_moments(model, loss_fn, x, y, chunk_size)
    s, v, g2 = (sum(m[k] for m in layers.values()) for k in range(3))
    out = {"all": statistics_from_moments(s, v, g2, theta)}
    out.update({layer: statistics_from_moments(*m, theta=theta) for layer, m in layers.items()})
    return out


def _mean_and_std(values: list) -> tuple[float, float]:
    finite = [v for v in values if math.isfinite(v)]
    if len(finite) < len(values):
        return (math.inf if any(v == math.inf for v in values) else math.nan), math.nan
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return mean, math.sqrt(var)


@PROBES.register("gradstats", "per-example gradient variance, SNR, noise scale B_simple, norm/inner/ortho tests",
                 options=OPTIONS, paper="McCandlish et al. 2018; Byrd et al. 2012; Bollapragada et al. 2018")
class GradStatsProbe(Probe):
    """Per-example gradient statistics, per layer and for the whole model: gradient variance, signal-to-noise ratio, the gradient noise scale B_simple (McCandlish et al. 2018: an estimate of the critical batch size), and the norm test (Byrd et al. 2012) and inner-product and orthogonality tests (Bollapragada et al. 2018) as the smallest tolerance each would pass with.

    The model runs in eval mode (BatchNorm's batch statistics mix examples, so per-example gradients need its running statistics). Writes gradstats.csv (one row per layer and 'all') and TensorBoard scalars; during training (--probe gradstats:every=N) logs the whole-model statistics.
    """

    training_summary = ("b_simple", "snr")
    training_callback = "gradlab.training.callbacks.gradstats:GradStats"

    def run(self, ctx: ProbeContext) -> ProbeReport:
        import pandas as pd

        from gradlab.core.modelstate import model_state

        opts = ctx.options
        per_batch = []
        with model_state(ctx.model, train=False):
            for k, (x, y) in enumerate(ctx.batches):
                per_batch.append(batch_statistics(ctx.model, ctx.loss_fn, x, y, opts["theta"], opts["chunk_size"]))
                ctx.report_progress(k + 1, len(ctx.batches))
        rows = []
        for layer in per_batch[0]:
            row = {"layer": layer}
            for key in ("grad_sq_norm", *STATS):
                mean, std = _mean_and_std([b[layer][key] for b in per_batch])
                row[key] = mean
                if len(per_batch) > 1:
                    row[f"{key}_std"] = std
            rows.append(row)
        table = pd.DataFrame(rows)
        whole = rows[0]
        scalars = {k: whole[k] for k in STATS}
        b = len(ctx.batches[0][0])
        lines = [f"B_simple {whole['b_simple']:.4g}: the critical batch size estimate (this batch: {b})",
                 f"SNR {whole['snr']:.4g}; norm test theta {whole['norm_test']:.3g} "
                 f"(it asks for batch {whole['norm_test_batch']:.4g} at theta={opts['theta']:g})"]
        if not math.isfinite(whole["b_simple"]):
            lines.append("B_simple is not estimable at this batch size: the gradient's noise exceeds its signal "
                         "(try more examples per batch)")
        view = table[["layer", "grad_sq_norm", "variance", "snr", "b_simple", "norm_test"]]
        return ProbeReport(table=table, view=view, title="per-example gradient statistics", scalars=scalars,
                           summary_lines=lines, metrics={f"gradstats_{k}": v for k, v in scalars.items()})


__all__ = ["GradStatsProbe", "STATS", "batch_statistics", "gradient_statistics", "grouped", "layer_of", "moments",
           "per_example_moments", "statistics_from_moments"]
