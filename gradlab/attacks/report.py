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
==================  ==========================================================================

An attack may add columns of its own after these (:meth:`Attack.summary`): AutoAttack's
``broken_by_*`` counts of the examples each member broke.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import pandas as pd
import torch
from torch import Tensor, nn

from gradlab.attacks import build_attack
from gradlab.attacks.base import check_eps, flat_norm
from gradlab.core.errors import GradlabError
from gradlab.core.modelstate import model_state

COLUMNS = ["attack", "eps", "clean_acc", "robust_acc", "success_rate", "mean_linf", "mean_l2", "mean_confidence", "n"]


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
    for eps in eps_list:
        attack = attacks[eps]
        chunks = []
        for i in range(0, n, batch_size):
            chunks.append(attack(x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)).cpu())
            if progress is not None:
                progress(eps, min(i + batch_size, n), n)
        adv = torch.cat(chunks)
        with model_state(model, train=False):
            adv_pred, adv_conf, _ = _predict(model, adv, batch_size, device)
        fooled = (adv_pred == targets) if targets is not None else (adv_pred != y)
        # targeted: an example whose label already is the target cannot be pushed there
        eligible = correct & (y != targets) if targets is not None else correct
        delta = adv - x
        rows.append(
            {
                "attack": attack_name,
                "eps": eps,
                "clean_acc": correct.float().mean().item(),
                "robust_acc": (adv_pred == y).float().mean().item(),
                "success_rate": fooled[eligible].float().mean().item() if bool(eligible.any()) else float("nan"),
                "mean_linf": flat_norm(delta, "linf").mean().item(),
                "mean_l2": flat_norm(delta, "l2").mean().item(),
                "mean_confidence": adv_conf.mean().item(),
                "n": n,
                **attack.summary(),  # an ensemble's per-member counts (broken_by_*)
            }
        )
        result.adv_pred[eps] = adv_pred
        if keep_adv:
            result.adv[eps] = adv
    result.table = pd.DataFrame(rows, columns=COLUMNS + [k for k in rows[0] if k not in COLUMNS])
    return result


def robustness_report(
    model: nn.Module, x: Tensor, y: Tensor, attack_name: str, eps_list: Sequence[float], batch_size: int = 256, **opts
) -> pd.DataFrame:
    """The sweep's table only (columns in :data:`COLUMNS`); see :func:`robustness_sweep`."""
    return robustness_sweep(model, x, y, attack_name, eps_list, batch_size, keep_adv=False, **opts).table
