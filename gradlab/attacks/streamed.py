"""An eps sweep over a whole streamed test set, one batch in memory at a time.

:func:`streamed_robustness` takes a data stream (a ``DataLoader``, e.g.
:meth:`gradlab.data.stream.StreamingData.loader`, or any iterable of ``(x, y)`` batches) instead
of tensors and makes one pass over it: each batch is predicted clean and attacked at every eps,
and only per-eps sums are kept (correct, robust, fooled, eligible, norms, confidences). The table
has the rows and columns of :func:`gradlab.attacks.report.robustness_sweep` and, with the same
batches, the same values (each attack call sees the same batch; an attack's ``seed`` restarts its
generator per batch), without the adversarial images, which a streamed set cannot hold. A
minimum-norm attack keeps only each example's norm (one float) for the quartiles.

Under ``torchrun`` each rank streams its own batches (``dist``) and the sums are added over ranks.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import pandas as pd
import torch
from torch import nn

from gradlab.attacks import build_attack
from gradlab.attacks.base import check_eps, flat_norm
from gradlab.attacks.report import COLUMNS, _device_of, _summed, robust_interval
from gradlab.core.distributed import DistInfo, gather_objects, sum_over_ranks
from gradlab.core.errors import GradlabError
from gradlab.core.modelstate import model_state

#: Per-eps sums: clean correct, robust correct, fooled eligible, eligible, linf, l2, confidence.
_SUMS = 7


def _predict(model, x):
    with torch.no_grad(), model_state(model, train=False):
        out = model(x).float()
    conf, pred = out.softmax(dim=1).max(dim=1)
    return pred, conf, out


def streamed_robustness(model: nn.Module, batches, attack_name: str, eps_list: Sequence[float], *,
                        dist: DistInfo = DistInfo(), criterion: Optional[str] = None,
                        progress: Optional[Callable[[int], None]] = None, **opts) -> pd.DataFrame:
    """The robustness table of ``attack_name`` at every eps over every example of ``batches``.

    ``progress(examples done)`` is called after each batch. Options as for
    :func:`~gradlab.attacks.report.robustness_sweep`.
    """
    eps_list = [float(e) for e in eps_list]
    if not eps_list:
        raise GradlabError("no eps given")
    attacks = {eps: build_attack(attack_name, model, eps, criterion=criterion, **opts) for eps in eps_list}
    device = _device_of(model)
    first = attacks[eps_list[0]]
    minnorm = getattr(first, "minimum_norm_attack", False)
    sums = torch.zeros(len(eps_list), _SUMS, dtype=torch.float64)
    norms, correct_all, n = [], [], 0
    for x, y in batches:
        x, y = x.to(device), y.to(device).long()
        if n == 0:
            for eps, attack in attacks.items():
                check_eps(eps, attack.norm, x[0].numel())
        n += len(y)
        pred, _, logits = _predict(model, x)
        correct = pred == y
        targets = None
        if first.targeted:
            targets = torch.full_like(y, first.target_class) if first.target_class is not None else logits.argmin(1)
        eligible = correct & (y != targets) if targets is not None else correct
        if minnorm:
            min_adv, nrm = attacks[max(eps_list)].minimum_norm(x, y)
            norms.append(nrm.detach().double().cpu())
            correct_all.append(correct.cpu())
        for j, eps in enumerate(eps_list):
            if minnorm:
                within = (nrm <= eps * (1 + 1e-6)).reshape(-1, *([1] * (x.dim() - 1)))
                adv = torch.where(within, min_adv, x)
            else:
                adv = attacks[eps](x, y)
            a_pred, a_conf, _ = _predict(model, adv)
            fooled = (a_pred == targets) if targets is not None else (a_pred != y)
            d = adv - x
            sums[j] += torch.stack([correct.sum(), (a_pred == y).sum(), (fooled & eligible).sum(), eligible.sum(),
                                    flat_norm(d, "linf").sum(), flat_norm(d, "l2").sum(), a_conf.sum()]).double().cpu()
        if progress is not None:
            progress(n)
    total = torch.tensor([float(n)], dtype=torch.float64)
    if dist.enabled:
        sum_over_ranks(sums, dist)
        sum_over_ranks(total, dist)
    n_all = int(total.item())
    if n_all == 0:
        raise GradlabError("no examples to attack (n = 0)")
    extra = {}
    if minnorm:
        from gradlab.attacks.minnorm import norm_summary

        parts = gather_objects((torch.cat(norms) if norms else torch.zeros(0, dtype=torch.float64),
                                torch.cat(correct_all) if correct_all else torch.zeros(0, dtype=torch.bool)), dist)
        extra = norm_summary(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
    rows = []
    for j, eps in enumerate(eps_list):
        c, r, f, e, linf, l2, conf = sums[j].tolist()
        rows.append({"attack": attack_name, "eps": eps, "clean_acc": c / n_all, "robust_acc": r / n_all,
                     "success_rate": f / e if e else float("nan"), "mean_linf": linf / n_all, "mean_l2": l2 / n_all,
                     "mean_confidence": conf / n_all, "n": n_all, **robust_interval(r / n_all, n_all),
                     **_summed(attacks[eps].summary(), dist), **extra})
    return pd.DataFrame(rows, columns=COLUMNS + [k for k in rows[0] if k not in COLUMNS])


__all__ = ["streamed_robustness"]
