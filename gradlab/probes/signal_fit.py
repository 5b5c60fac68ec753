"""The verdict rule of the gradient-norm probe: a log-linear fit of the backward signal norm
against depth, its evidence (``R^2``, the slope's standard error, the number of layers) and the
verdict it supports (see :mod:`gradlab.probes.gradnorm` for the rule in words; Bengio et al.
1994, Glorot & Bengio 2010). The Jacobian probe uses :func:`verdict_from_rate` for its gain rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

VERDICTS = ("vanishing", "exploding", "stable", "inconclusive", "undetermined")
MIN_FIT_LAYERS = 4  # a fit on 3 layers or fewer is inconclusive
MIN_R2 = 0.5  # a vanishing/exploding trend must explain at least half the variance of log signal


def fit_rate(depths: Sequence[int], signal_norms: Sequence[float]) -> float:
    """Natural log of the backward growth factor per layer from a log-linear least-squares fit.

    Returns ``-b`` for ``log s = a + b * depth``; NaN for fewer than two distinct depths. Norms
    that are exactly zero (dead units) are clamped to the smallest positive float64 so that they
    read as strongly vanishing instead of poisoning the fit.
    """
    d = torch.as_tensor(list(depths), dtype=torch.float64)
    if d.numel() < 2 or torch.unique(d).numel() < 2:
        return float("nan")
    s = torch.as_tensor(list(signal_norms), dtype=torch.float64)
    y = torch.log(s.clamp_min(torch.finfo(torch.float64).tiny))
    dc = d - d.mean()
    slope = (dc * (y - y.mean())).sum() / (dc * dc).sum()
    return float(-slope)


@dataclass
class SignalFit:
    """The log-linear fit of the backward signal: ``log_rate`` (-slope), ``r2`` (coefficient of
    determination; 1 for an exactly flat or exactly straight line), ``slope_stderr`` (standard
    error of the slope; NaN on two points) and ``n_layers`` (points in the fit)."""

    log_rate: float
    r2: float
    slope_stderr: float
    n_layers: int


def fit_signal(depths: Sequence[int], signal_norms: Sequence[float]) -> SignalFit:
    """:func:`fit_rate` with its evidence: ``R^2`` and the slope's standard error."""
    log_rate = fit_rate(depths, signal_norms)
    n = len(list(depths))
    if math.isnan(log_rate):
        return SignalFit(log_rate, float("nan"), float("nan"), n)
    d = torch.as_tensor(list(depths), dtype=torch.float64)
    y = torch.log(torch.as_tensor(list(signal_norms), dtype=torch.float64).clamp_min(torch.finfo(torch.float64).tiny))
    dc = d - d.mean()
    resid = (y - y.mean()) + log_rate * dc  # y - (a + b d) with b = -log_rate
    ss_res, ss_tot = float((resid * resid).sum()), float(((y - y.mean()) ** 2).sum())
    scale = max(float((y * y).sum()), 1.0) * 1e-24  # rounding floor: an exactly flat or straight line
    r2 = 1.0 if ss_tot <= scale or ss_res <= scale else 1.0 - ss_res / ss_tot
    se = math.sqrt(ss_res / (n - 2) / float((dc * dc).sum())) if n > 2 else float("nan")
    return SignalFit(log_rate, r2, se, n)


def verdict_from_fit(fit: SignalFit, threshold: float) -> str:
    """The rate's verdict (:func:`verdict_from_rate`), or ``inconclusive`` where the fit does not
    support it (module docstring: 3 layers or fewer, R^2 < 0.5, or a stable slope not pinned down)."""
    verdict = verdict_from_rate(fit.log_rate, threshold)
    if verdict == "undetermined":
        return verdict
    if fit.n_layers < MIN_FIT_LAYERS:
        return "inconclusive"
    if verdict in ("vanishing", "exploding") and fit.r2 < MIN_R2:
        return "inconclusive"
    if verdict == "stable" and abs(fit.log_rate) + 2 * fit.slope_stderr > math.log1p(threshold):
        return "inconclusive"
    return verdict


def verdict_from_rate(log_rate: float, threshold: float) -> str:
    """``vanishing`` / ``exploding`` / ``stable`` by ``|log rate| > log(1 + threshold)``."""
    if math.isnan(log_rate):
        return "undetermined"
    bound = math.log1p(threshold)
    if log_rate < -bound:
        return "vanishing"
    if log_rate > bound:
        return "exploding"
    return "stable"
