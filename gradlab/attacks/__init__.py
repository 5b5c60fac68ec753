"""Adversarial attacks in pixel space: FGSM, PGD, a second-order curvature attack, Curls & Whey,
APGD, Square, FAB, AutoAttack and the minimum-norm attacks CW, DeepFool and FMN.

Every attack is one file with one class registered in :data:`ATTACKS` together with its options,
declared once (:attr:`Attack.options`); they share the budget, mode and EOT handling of
:class:`gradlab.attacks.base.Attack`. :func:`attack_batch` is the one
call other code (adversarial training, the robustness report) needs.
"""

from __future__ import annotations

from typing import Optional

from gradlab.core.options import Options, check_keys
from gradlab.core.registry import Registry

ATTACKS = Registry("attack")

# Registration happens on import of each attack module (one file, one decorator each).
from gradlab.attacks import apgd, autoattack, curls, curvature, cw, deepfool, fab, fgsm, fmn, pgd, square  # noqa: E402,F401
from gradlab.attacks.base import ATTACK_OPTIONS, NORMS, Attack, check_eps, flat_norm  # noqa: E402


def attack_options(name: str) -> Options:
    """The declared options of attack ``name`` (GradlabError for an unknown name)."""
    return ATTACKS.entry(name).options


def build_attack(name: str, model, eps: float, *, criterion: Optional[str] = None, **opts) -> Attack:
    """The attack ``name`` configured with ``eps`` and its options; ``criterion`` is the loss its
    objective ascends (:data:`gradlab.core.losses.LOSSES`, default cross-entropy: a run's
    ``--loss``).

    Raises:
        GradlabError: one line for an unknown attack, an option it does not declare (naming
            the attacks that do, or with a "did you mean"), or a bad value.
    """
    entry = ATTACKS.entry(name)
    unknown = [k for k in opts if k not in entry.options]
    if unknown:
        check_keys(unknown, entry.options.names(), owner=f"attack {name}", others=ATTACKS.options_of_others(name))
    attack = entry.obj(model, eps, **opts)
    if criterion is not None:
        from gradlab.core.losses import check_loss

        attack.criterion = check_loss(criterion)
    return attack


def attack_batch(name: str, model, x, y, eps: float, *, criterion: Optional[str] = None, **opts):
    """Adversarial inputs for one batch: ``(B, *input_shape)`` in [0, 1], detached.

    The model runs in eval mode during the attack and gets its previous per-module modes and
    ``requires_grad`` flags back afterwards, so adversarial training can call this between
    training steps. ``opts`` are the attack's declared options (:func:`attack_options`).
    """
    return build_attack(name, model, eps, criterion=criterion, **opts)(x, y).detach()


__all__ = ["ATTACKS", "ATTACK_OPTIONS", "NORMS", "Attack", "attack_batch", "attack_options", "build_attack",
           "check_eps", "flat_norm"]
