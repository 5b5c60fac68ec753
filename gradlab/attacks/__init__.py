"""Adversarial attacks in pixel space: FGSM, PGD, a second-order curvature attack, Curls & Whey.

Every attack is one file with one class registered in :data:`ATTACKS`; they share the budget,
mode and EOT handling of :class:`gradlab.attacks.base.Attack`. :func:`attack_batch` is the one
call other code (adversarial training, the robustness report) needs.
"""

from __future__ import annotations

import abc
import functools
import inspect

from gradlab.core.errors import GradlabError
from gradlab.core.registry import Registry

ATTACKS = Registry("attack")

# Registration happens on import of each attack module (one file, one decorator each).
from gradlab.attacks import curls, curvature, fgsm, pgd  # noqa: E402,F401
from gradlab.attacks.base import NORMS, Attack, check_eps, flat_norm  # noqa: E402


def build_attack(name: str, model, eps: float, **opts) -> Attack:
    """The attack ``name`` configured with ``eps`` and its options (GradlabError on bad ones)."""
    cls = ATTACKS.get(name)
    allowed = attack_options(name)
    unknown = sorted(set(opts) - set(allowed))
    if unknown:
        raise GradlabError(f"attack {name!r} does not take option(s) {', '.join(unknown)}; it takes: {', '.join(allowed)}")
    return cls(model, eps, **opts)


def attack_options(name: str) -> list[str]:
    """Keyword options the attack ``name`` accepts (its own and the base class's), sorted."""
    return list(_options_of(ATTACKS.get(name)))


@functools.lru_cache(maxsize=None)
def _options_of(cls) -> tuple:
    # cached: adversarial training builds an attack every step, and signatures are slow to read
    allowed = set()
    for klass in cls.__mro__:
        if klass is not object and klass is not abc.ABC and "__init__" in vars(klass):
            for p in inspect.signature(klass.__init__).parameters.values():
                if p.kind is p.KEYWORD_ONLY:
                    allowed.add(p.name)
    return tuple(sorted(allowed))


def attack_batch(name: str, model, x, y, eps: float, **opts):
    """Adversarial inputs for one batch: ``(B, *input_shape)`` in [0, 1], detached.

    The model runs in eval mode during the attack and gets its previous per-module modes and
    ``requires_grad`` flags back afterwards, so adversarial training can call this between
    training steps. ``opts`` are the attack's keyword options (``norm``, ``steps``, ``alpha``,
    ``restarts``, ``random_start``, ``targeted``, ``target_class``, ``eot``, ``seed``, ...).
    """
    return build_attack(name, model, eps, **opts)(x, y).detach()


__all__ = ["ATTACKS", "NORMS", "Attack", "attack_batch", "attack_options", "build_attack", "check_eps", "flat_norm"]
