"""Perturbation budgets of attacks and adversarial training: the norms and the checks of eps and
of a target class. Torch-free, so the CLI checks a budget before torch is imported."""

from __future__ import annotations

import math
from typing import Optional

from gradlab.core.errors import GradlabError

NORMS = ("linf", "l2")
#: Every norm a budget may be given in: the minimum-norm attack fmn also takes l1 and l0 (the
#: number of changed input features).
ALL_NORMS = ("linf", "l2", "l1", "l0")


def check_eps(eps: float, norm: str, n_features: Optional[int] = None) -> None:
    """Validate a budget: ``0 <= eps <= 1`` for linf; for l2 at most the diameter of [0, 1]^D;
    for l1 and l0 at most D."""
    if norm not in ALL_NORMS:
        raise GradlabError(f"unknown norm {norm!r}; choose from: {', '.join(ALL_NORMS)}")
    if not isinstance(eps, (int, float)) or math.isnan(eps) or eps < 0:
        raise GradlabError(f"invalid eps: {eps} (must be >= 0)")
    if norm == "linf" and eps > 1:
        raise GradlabError(f"invalid eps: {eps} (inputs are in [0, 1], so an linf budget must be <= 1)")
    if norm == "l2" and n_features is not None and eps > math.sqrt(n_features):
        raise GradlabError(
            f"invalid eps: {eps} (an l2 budget above sqrt(D) = {math.sqrt(n_features):.4g} covers all of [0, 1]^D)"
        )
    if norm in ("l1", "l0") and n_features is not None and eps > n_features:
        raise GradlabError(f"invalid eps: {eps} (an {norm} budget above D = {n_features} covers all of [0, 1]^D)")


def check_target_class(target_class: Optional[int], n_classes: int) -> None:
    """A target class must be one of the model's ``n_classes`` outputs (checked before a run
    folder exists, from the source run's data, and again on the logits of every call)."""
    if target_class is not None and not 0 <= target_class < n_classes:
        raise GradlabError(f"invalid target class: {target_class} (the model has {n_classes} classes: "
                           f"must be in 0..{n_classes - 1})")


__all__ = ["ALL_NORMS", "NORMS", "check_eps", "check_target_class"]
