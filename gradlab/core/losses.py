"""The training losses, declared once: ``--loss cross-entropy|mse``.

Every place that needs "the run's loss" (training, evaluation, probes, landscapes, curvature
operators, attacks) asks :func:`loss_fn` or :func:`per_example_loss` for it by name, and the name
is recorded in a run's ``config.yaml`` (``loss``), so a probe or an attack on a run uses the
loss the run was trained with unless told otherwise.

* ``cross-entropy``: ``F.cross_entropy``, the mean over examples of ``-log softmax(z)_y``.
* ``mse``: squared error to the one-hot target ``e_y``, summed over classes and averaged over
  examples, ``L = (1/N) sum_n |z_n - e_{y_n}|^2`` (no factor 1/2). Its Hessian in the logits is
  ``2 I / N``; a float ``y`` of shape (N, C) is used as the target itself. This is the
  convention of Cohen et al. 2021 (edge of stability) up to their 1/2; note that
  ``F.mse_loss`` (mean over all ``N C`` entries) is ``L / C``.

The module imports torch only when a loss is asked for, so the names can be checked (and
``--help`` shown) without it.
"""

from __future__ import annotations

import math

from gradlab.core.errors import GradlabError

#: The choices of ``--loss``; the first is the default.
LOSSES = ("cross-entropy", "mse")
DEFAULT_LOSS = LOSSES[0]


def one_hot_target(z, y):
    """``y`` as a target of ``z``'s shape and dtype: the one-hot rows of integer labels
    (built by comparison, so it works under ``torch.func.vmap``), a float ``y`` as it is."""
    import torch

    if y.is_floating_point():
        return y.to(z.dtype)
    classes = torch.arange(z.shape[-1], device=z.device)
    return (classes == y.unsqueeze(-1)).to(z.dtype)


def mse_one_hot(z, y, reduction: str = "mean"):
    """``(1/N) sum_n |z_n - e_{y_n}|^2`` (``reduction="mean"``), the sum over examples
    (``"sum"``) or the per-example values (``"none"``)."""
    per = (z - one_hot_target(z, y)).pow(2).sum(-1)
    if reduction == "none":
        return per
    return per.sum() if reduction == "sum" else per.mean()


def check_loss(name) -> str:
    """``name`` if it is one of :data:`LOSSES`, else one :class:`GradlabError` line."""
    if name not in LOSSES:
        raise GradlabError(f"invalid loss: {name!r} (must be one of: {', '.join(LOSSES)})")
    return name


def loss_fn(name: str = DEFAULT_LOSS):
    """The mean batch loss ``(logits, y) -> scalar`` of ``name`` (``None``: the default).

    Accepts ``reduction=`` like ``F.cross_entropy``; curvature operators recognise both
    (:func:`gradlab.curvature.likelihood.likelihood_of`)."""
    import torch.nn.functional as F

    name = check_loss(name or DEFAULT_LOSS)
    return F.cross_entropy if name == "cross-entropy" else mse_one_hot


def per_example_loss(name: str = DEFAULT_LOSS):
    """``(logits, y) -> (B,)`` per-example losses of ``name`` (what attacks ascend)."""
    fn = loss_fn(name)
    return lambda z, y: fn(z, y, reduction="none")


def chance_loss(name: str = DEFAULT_LOSS, num_classes: int = 2) -> float:
    """The loss of the uniform guess ``p = 1/C`` on every class: the best constant prediction on
    balanced classes, the level a model that learnt nothing sits at. Cross-entropy: ``ln C``;
    MSE (one-hot targets, summed over classes): ``(1 - 1/C)^2 + (C - 1)/C^2 = 1 - 1/C``."""
    c = max(int(num_classes), 2)
    return 1.0 - 1.0 / c if check_loss(name or DEFAULT_LOSS) == "mse" else math.log(c)


def run_loss(config) -> str:
    """The loss a run was trained with, from its ``config.yaml`` (runs made before the option
    existed trained with cross-entropy)."""
    return check_loss((config or {}).get("loss") or DEFAULT_LOSS)


__all__ = ["LOSSES", "DEFAULT_LOSS", "chance_loss", "check_loss", "loss_fn", "mse_one_hot", "one_hot_target",
           "per_example_loss", "run_loss"]
