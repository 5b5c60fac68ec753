"""Sanity checks of an attack evaluation, against gradient masking (``gradlab attack check``).

Athalye, Carlini & Wagner (ICML 2018, "Obfuscated gradients give a false sense of security")
and Carlini et al. (2019, "On evaluating adversarial robustness", Section 5 and the checklist of
its appendix) list the signs that an attack is failing because the model's gradients are
useless rather than because the model is robust. :func:`masking_checks` runs one of each on the
same examples and budget (PGD at ``steps`` iterations with a random start is "the" iterative
attack; every attack gets the same seed, so restart 0 of the multi-restart PGD repeats the
single-restart one):

=====================  =========================================================================
``iterative``          PGD-``steps`` at least as strong as one-step FGSM:
                       ``acc(PGD) <= acc(FGSM) + tol``
``more_steps``         ``acc(PGD-5*steps) <= acc(PGD-steps) + tol``
``more_restarts``      ``acc(PGD-steps, restarts) <= acc(PGD-steps) + tol``
``unbounded``          PGD-5*steps with an eps that holds the whole box [0, 1]^D (linf: 1; l2:
                       sqrt(D)) reaches ~0% accuracy: ``acc <= tol``
``black_box``          Square (score-based, no gradients, ``queries`` queries) not stronger than
                       the white-box attacks (the PGD runs above, FGSM and APGD-DLR at
                       5*steps; Square's margin loss is the DLR loss's kin, so APGD-DLR keeps
                       the comparison fair): ``acc(Square) >= min(white-box accs) - tol``
``loss_rises``         PGD's loss curve rises: the mean cross-entropy of the last iterate beats
                       the start's by at least ``1e-3 * max(1, |start|)``
=====================  =========================================================================

Accuracies are fractions of all ``n`` examples (misclassified clean ones count as not robust).
A failed check means "gradient masking suspected" (or an attack too weak for this model).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import pandas as pd
import torch
from torch import Tensor, nn

from gradlab.core.modelstate import model_state

COLUMNS = ["check", "value", "bound", "passed", "figures"]
CHECKS = ("iterative", "more_steps", "more_restarts", "unbounded", "black_box", "loss_rises")
VERDICT = "gradient masking suspected"


def _device(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


class _Curve:
    """Per-step sums of the objective over every batch a recording PGD attacked."""

    def __init__(self):
        self.sums: list = []
        self.n = 0


def _recording_pgd(model, eps: float, curve: _Curve, **opts):
    from gradlab.attacks import ATTACKS

    pgd = ATTACKS.entry("pgd").obj

    class RecordingPGD(pgd):
        def grad(self, x):
            g, obj = super().grad(x)
            self._calls = getattr(self, "_calls", 0) + 1
            k = (self._calls - 1) % self.steps
            if k == 0:
                curve.n += x.shape[0]
            if k >= len(curve.sums):
                curve.sums.append(0.0)
            curve.sums[k] += float(obj.double().sum())
            return g, obj

    return RecordingPGD(model, eps, **opts)


def masking_checks(model: nn.Module, x: Tensor, y: Tensor, eps: float, norm: str = "linf", steps: int = 10,
                   restarts: int = 5, queries: int = 1000, tol: float = 0.02, batch_size: int = 256,
                   seed: int = 0, progress: Optional[Callable[[str], None]] = None) -> tuple[pd.DataFrame, dict]:
    """Run the checks of the module docstring on ``x`` ``(N, ...)`` in [0, 1] with labels ``y``.

    Returns:
        ``(table, extra)``: one row per check (:data:`COLUMNS`: ``value`` and ``bound`` are the
        compared figures, ``passed`` a bool, ``figures`` the comparison in words) and
        ``{"accuracy": {attack: acc}, "loss_curve": [mean objective per PGD step]}``.
    """
    from gradlab.attacks import build_attack

    device = _device(model)
    x, y = x.detach().cpu(), y.detach().cpu().long()
    n = x.shape[0]
    big = 1.0 if norm == "linf" else math.sqrt(x[0].numel())
    common = dict(norm=norm, seed=seed)

    def accuracy(attack) -> float:
        hits = 0
        for i in range(0, n, batch_size):
            a, b = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
            adv = attack(a, b)
            with torch.no_grad(), model_state(model, train=False):
                hits += int((model(adv).argmax(1) == b).sum())
        return hits / n

    curve = _Curve()
    plan = {
        "fgsm": lambda: build_attack("fgsm", model, eps, **common),
        f"pgd-{steps}": lambda: _recording_pgd(model, eps, curve, steps=steps, **common),
        f"pgd-{5 * steps}": lambda: build_attack("pgd", model, eps, steps=5 * steps, **common),
        f"pgd-{steps}x{restarts}": lambda: build_attack("pgd", model, eps, steps=steps, restarts=restarts, **common),
        "pgd-unbounded": lambda: build_attack("pgd", model, big, steps=5 * steps, **common),
        f"apgd-dlr-{5 * steps}": lambda: build_attack("apgd", model, eps, loss="dlr", steps=5 * steps, **common),
        "square": lambda: build_attack("square", model, eps, n_queries=queries, **common),
    }
    acc = {}
    for name, make in plan.items():
        if progress is not None:
            progress(name)
        acc[name] = accuracy(make())
    loss = [s / max(curve.n, 1) for s in curve.sums]
    p, pm, pr = acc[f"pgd-{steps}"], acc[f"pgd-{5 * steps}"], acc[f"pgd-{steps}x{restarts}"]
    white = min(acc["fgsm"], p, pm, pr, acc[f"apgd-dlr-{5 * steps}"])
    start, end = loss[0], loss[-1]
    rise = 1e-3 * max(1.0, abs(start))
    rows = [
        ("iterative", p, acc["fgsm"] + tol, p <= acc["fgsm"] + tol,
         f"pgd-{steps} {p:.3f} <= fgsm {acc['fgsm']:.3f} + {tol:g}"),
        ("more_steps", pm, p + tol, pm <= p + tol, f"pgd-{5 * steps} {pm:.3f} <= pgd-{steps} {p:.3f} + {tol:g}"),
        ("more_restarts", pr, p + tol, pr <= p + tol,
         f"{restarts} restarts {pr:.3f} <= 1 restart {p:.3f} + {tol:g}"),
        ("unbounded", acc["pgd-unbounded"], tol, acc["pgd-unbounded"] <= tol,
         f"eps {big:.4g} (whole box): {acc['pgd-unbounded']:.3f} <= {tol:g}"),
        ("black_box", acc["square"], white - tol, acc["square"] >= white - tol,
         f"square {acc['square']:.3f} >= best white-box {white:.3f} - {tol:g}"),
        ("loss_rises", end - start, rise, end - start >= rise,
         f"pgd loss {start:.4g} -> {end:.4g} (rise >= {rise:.2g})"),
    ]
    table = pd.DataFrame([dict(zip(COLUMNS, r)) for r in rows], columns=COLUMNS)
    table["passed"] = table["passed"].astype(bool)
    return table, {"accuracy": acc, "loss_curve": loss}


def loss_curve_figure(loss: list, title: str = "PGD loss per step"):
    """Line plot of the mean objective per PGD step (matplotlib figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    ax.plot(range(1, len(loss) + 1), loss, marker="o")
    ax.set_xlabel("PGD step")
    ax.set_ylabel("mean cross-entropy (objective)")
    ax.grid(alpha=0.3)
    ax.set_title(title)
    fig.tight_layout()
    return fig


__all__ = ["CHECKS", "COLUMNS", "VERDICT", "loss_curve_figure", "masking_checks"]
