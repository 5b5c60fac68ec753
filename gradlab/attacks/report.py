"""Robustness over an eps sweep: one attack, many budgets, one table.

For each eps the attack runs over the examples in batches (model in eval mode, restored after)
and one row summarises it:

==================  ==========================================================================
``attack``          attack name
``eps``             budget in pixel units, in the attack's norm
``clean_acc``       accuracy on the clean inputs (eval mode)
``robust_acc``      accuracy on the adversarial inputs
``success_rate``    over the examples classified correctly when clean: the fraction the attack
                    fooled (untargeted: prediction != label; targeted: prediction == target,
                    over those whose label is not the target); NaN when there are none
``mean_linf``       mean over all examples of ``||x_adv - x||_inf``
``mean_l2``         mean over all examples of ``||x_adv - x||_2``
``mean_confidence`` mean over all examples of the softmax probability of the predicted class on
                    the adversarial input
``n``               number of examples
``robust_ci_low``,  the 95% Wilson score interval of ``robust_acc`` over the ``n`` examples
``robust_ci_high``  (:func:`wilson_interval`): how far a figure from a few hundred images goes
==================  ==========================================================================

An attack may add columns of its own after these (:meth:`Attack.summary`): AutoAttack's
``broken_by_*`` counts of the examples each member broke. A minimum-norm attack
(:mod:`gradlab.attacks.minnorm`: fab, cw, deepfool, fmn) runs once for the whole sweep; its
adversarial at eps is the smallest one found if within eps, else the clean input, so robust
accuracy is the fraction of minimum norms above eps; it adds the quartiles of the norms
(:func:`gradlab.attacks.minnorm.norm_summary`) and the result keeps the norms themselves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import pandas as pd
import torch
from torch import Tensor, nn

from gradlab.attacks import build_attack
from gradlab.attacks.base import check_eps, flat_norm
from gradlab.core.distributed import DistInfo, gather_objects, my_share, sum_over_ranks
from gradlab.core.errors import GradlabError
from gradlab.core.modelstate import model_state

COLUMNS = ["attack", "eps", "clean_acc", "robust_acc", "success_rate", "mean_linf", "mean_l2", "mean_confidence", "n",
           "robust_ci_low", "robust_ci_high"]

#: The normal quantile of a two-sided 95% interval.
Z95 = 1.959963984540054


def wilson_interval(p: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval ``(low, high)`` of a proportion ``p`` observed on ``n`` trials
    (95% for the default ``z``); unlike ``p +- z sqrt(p (1 - p) / n)`` it stays inside [0, 1] and
    is not empty at ``p = 0`` or ``1``. ``(0, 1)`` for ``n = 0``."""
    if n <= 0:
        return (0.0, 1.0)
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(max(p * (1 - p), 0.0) / n + z * z / (4 * n * n))
    # the clamps to p keep rounding (centre - half is 4e-19 at p = 0, n = 500) from leaving p outside
    return (min(p, max(0.0, centre - half)), max(p, min(1.0, centre + half)))


def robust_interval(robust_acc: float, n: int) -> dict:
    """The table's ``robust_ci_low`` / ``robust_ci_high`` columns for one row."""
    return dict(zip(("robust_ci_low", "robust_ci_high"), wilson_interval(robust_acc, n)))


@dataclass
class RobustnessResult:
    """The table plus what the grid and ``--save-adv`` need (all tensors on the CPU).

    ``adv[eps]`` is ``(N, *input_shape)``; ``adv_pred[eps]`` and ``clean_pred`` are ``(N,)``;
    ``targets`` is ``(N,)`` for targeted attacks, else ``None``.
    """

    table: pd.DataFrame
    x: Tensor
    y: Tensor
    clean_pred: Tensor
    adv: dict = field(default_factory=dict)
    adv_pred: dict = field(default_factory=dict)
    targets: Optional[Tensor] = None
    #: minimum-norm attacks: each example's smallest adversarial norm ``(N,)`` (0: already wrong,
    #: inf: none found) and that adversarial ``(N, *input_shape)`` (the clean input where none)
    norms: Optional[Tensor] = None
    min_adv: Optional[Tensor] = None
    min_pred: Optional[Tensor] = None  # the model's predictions on ``min_adv``


def _device_of(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def _predict(model: nn.Module, x: Tensor, batch_size: int, device) -> tuple[Tensor, Tensor, Tensor]:
    """``(pred, confidence, logits)`` for ``x`` on the CPU, in batches, no grad."""
    preds, confs, logits = [], [], []
    with torch.no_grad():
        for i in range(0, x.shape[0], batch_size):
            out = model(x[i : i + batch_size].to(device)).float()
            prob = out.softmax(dim=1)
            conf, pred = prob.max(dim=1)
            preds.append(pred.cpu())
            confs.append(conf.cpu())
            logits.append(out.cpu())
    return torch.cat(preds), torch.cat(confs), torch.cat(logits)


def robustness_sweep(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    attack_name: str,
    eps_list: Sequence[float],
    batch_size: int = 256,
    *,
    keep_adv: bool = True,
    progress: Optional[Callable[[float, int, int], None]] = None,
    dist: DistInfo = DistInfo(),
    criterion: Optional[str] = None,
    **opts,
) -> RobustnessResult:
    """Attack ``x`` (``(N, *input_shape)`` in [0, 1]) with labels ``y`` at every eps.

    Args:
        attack_name: a name in :data:`gradlab.attacks.ATTACKS`.
        eps_list: budgets (validated up front: each in [0, 1] for linf).
        batch_size: examples per attack call.
        keep_adv: keep the adversarial inputs per eps (for the image grid / ``--save-adv``).
        progress: called as ``progress(eps, done, total)`` after every batch.
        dist: under ``torchrun`` (:func:`gradlab.core.distributed.current`), each rank attacks the
            batches ``rank, rank + W, ...`` and the per-example results are summed over ranks, so
            every rank returns the whole result. Equal to one process when the attack's ``seed``
            is set (each batch's generator starts from it).
        criterion: the loss the attacks ascend (a run's ``--loss``; default cross-entropy).
        **opts: attack options (norm, steps, alpha, restarts, random_start, targeted, ...).
    Returns:
        A :class:`RobustnessResult`; ``.table`` has the columns of the module docstring.
    """
    if int(batch_size) != batch_size or batch_size < 1:
        raise GradlabError(f"invalid batch_size: {batch_size} (must be an integer >= 1)")
    if x.shape[0] == 0:
        raise GradlabError("no examples to attack (n = 0)")
    eps_list = [float(e) for e in eps_list]
    if not eps_list:
        raise GradlabError("no eps given")
    attacks = {eps: build_attack(attack_name, model, eps, criterion=criterion, **opts) for eps in eps_list}  # validates options
    for eps, attack in attacks.items():
        check_eps(eps, attack.norm, x[0].numel())
    device = _device_of(model)
    x, y = x.detach().cpu(), y.detach().cpu().long()
    n = x.shape[0]
    with model_state(model, train=False):
        clean_pred, _, clean_logits = _predict(model, x, batch_size, device)
    correct = clean_pred == y
    targets = None
    any_attack = attacks[eps_list[0]]
    if any_attack.targeted:
        if any_attack.target_class is not None:
            targets = torch.full_like(y, any_attack.target_class)
        else:
            targets = clean_logits.argmin(dim=1)
    result = RobustnessResult(table=pd.DataFrame(columns=COLUMNS), x=x, y=y, clean_pred=clean_pred, targets=targets)
    rows = []
    starts = list(range(0, n, batch_size))
    mine = [starts[i] for i in my_share(len(starts), dist)]  # under torchrun, this rank's batches
    extra = {}
    if getattr(any_attack, "minimum_norm_attack", False):  # one search serves every eps
        from gradlab.attacks.minnorm import norm_summary

        result.min_adv, result.norms = _minimum_norms(attacks[max(eps_list)], x, y, batch_size, device, progress,
                                                      mine, dist)
        extra = norm_summary(result.norms, correct)
        with model_state(model, train=False):
            result.min_pred = _predict(model, result.min_adv, batch_size, device)[0]
    for eps in eps_list:
        attack = attacks[eps]
        if result.norms is not None:  # every rank holds all the norms: the rows follow from them
            within = (result.norms <= eps * (1 + 1e-6)).reshape(-1, *([1] * (x.dim() - 1)))
            adv = torch.where(within, result.min_adv, x)
            with model_state(model, train=False):
                pred, conf, _ = _predict(model, adv, batch_size, device)
            d = adv - x
            stats = torch.stack([pred.double(), conf.double(), flat_norm(d, "linf").double(),
                                 flat_norm(d, "l2").double()])
        else:
            adv = torch.zeros_like(x) if keep_adv else None
            stats = torch.zeros(4, n, dtype=torch.float64)  # prediction, confidence, linf, l2 per example
            for done, i in enumerate(mine):
                xb = x[i : i + batch_size]
                a_ = attack(xb.to(device), y[i : i + batch_size].to(device)).cpu()
                with model_state(model, train=False):
                    pred, conf, _ = _predict(model, a_, batch_size, device)
                d = a_ - xb
                stats[:, i : i + len(xb)] = torch.stack([pred.double(), conf.double(),
                                                         flat_norm(d, "linf").double(), flat_norm(d, "l2").double()])
                if adv is not None:
                    adv[i : i + len(xb)] = a_
                if progress is not None:
                    progress(eps, min(sum(min(batch_size, n - j) for j in mine[: done + 1]), n), n)
            if dist.enabled:  # each example was attacked by one rank, zeros elsewhere: the sums are exact
                sum_over_ranks(stats, dist)
                if adv is not None:
                    sum_over_ranks(adv, dist)
        adv_pred, adv_conf = stats[0].long(), stats[1].float()  # the confidences were float32
        linf, l2 = stats[2].to(x.dtype), stats[3].to(x.dtype)  # the norms were in the inputs' dtype
        fooled = (adv_pred == targets) if targets is not None else (adv_pred != y)
        # targeted: an example whose label already is the target cannot be pushed there
        eligible = correct & (y != targets) if targets is not None else correct
        robust = (adv_pred == y).double().mean().item()
        rows.append(
            {
                "attack": attack_name,
                "eps": eps,
                "clean_acc": correct.float().mean().item(),
                "robust_acc": robust,
                "success_rate": fooled[eligible].float().mean().item() if bool(eligible.any()) else float("nan"),
                "mean_linf": linf.mean().item(),
                "mean_l2": l2.mean().item(),
                "mean_confidence": adv_conf.mean().item(),
                "n": n,
                **robust_interval(robust, n),
                **_summed(attack.summary(), dist),  # an ensemble's per-member counts (broken_by_*)
                **extra,  # a minimum-norm attack's quartiles of the norms
            }
        )
        result.adv_pred[eps] = adv_pred
        if keep_adv:
            result.adv[eps] = adv
    result.table = pd.DataFrame(rows, columns=COLUMNS + [k for k in rows[0] if k not in COLUMNS])
    return result


def _summed(summary: dict, dist: DistInfo) -> dict:
    """An attack's extra columns (counts over the examples it attacked) summed over ranks."""
    if not dist.enabled:
        return summary
    parts = gather_objects(summary, dist)
    return {k: sum(p.get(k, 0) for p in parts) for k in parts[0]}


def _minimum_norms(attack, x: Tensor, y: Tensor, batch_size: int, device, progress, mine: list,
                   dist: DistInfo) -> tuple[Tensor, Tensor]:
    """``(x_adv, norms)`` of a minimum-norm attack over all of ``x`` on the CPU: this rank's
    batches ``mine``, the others' filled in by a sum over ranks (zeros where a rank did not look)."""
    n = x.shape[0]
    advs, norms = torch.zeros_like(x), torch.zeros(n, dtype=x.dtype)
    for done, i in enumerate(mine):
        adv, nrm = attack.minimum_norm(x[i : i + batch_size].to(device), y[i : i + batch_size].to(device))
        advs[i : i + len(adv)] = adv.cpu()
        norms[i : i + len(adv)] = nrm.cpu().to(x.dtype)
        if progress is not None:
            progress(attack.eps, min(sum(min(batch_size, n - j) for j in mine[: done + 1]), n), n)
    if dist.enabled:
        sum_over_ranks(advs, dist)
        sum_over_ranks(norms, dist)
    return advs, norms


def robustness_report(
    model: nn.Module, x: Tensor, y: Tensor, attack_name: str, eps_list: Sequence[float], batch_size: int = 256, **opts
) -> pd.DataFrame:
    """The sweep's table only (columns in :data:`COLUMNS`); see :func:`robustness_sweep`."""
    return robustness_sweep(model, x, y, attack_name, eps_list, batch_size, keep_adv=False, **opts).table
