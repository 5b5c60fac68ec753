"""Transfer attacks: adversarial examples crafted on a source model, evaluated on a target model.

Papernot et al. (2016, "Transferability in machine learning") and Tramèr et al. (2018, "Ensemble
adversarial training") evaluate a model against examples made with the gradients of another
one: a black-box threat model, and a check that a defence does not merely hide its own gradients.
:func:`transfer_sweep` runs the attack white-box on ``source`` (:func:`robustness_sweep`) and
scores the same adversarial inputs on ``target``. Its table has the columns of
:data:`gradlab.attacks.report.COLUMNS`, computed on the target (``clean_acc``, ``robust_acc``,
``success_rate`` over the examples the target classifies correctly, ``mean_confidence`` of the
target), then ``source_clean_acc`` and ``source_robust_acc``, the source's own (white-box)
figures. With ``source is target`` the table is the white-box one plus those two columns.
Targeted attacks keep the source's targets (its least-likely clean class unless ``target_class``).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

from torch import Tensor, nn

from gradlab.attacks.report import RobustnessResult, _device_of, _predict, robustness_sweep
from gradlab.core.modelstate import model_state

SOURCE_COLUMNS = ["source_clean_acc", "source_robust_acc"]


def transfer_sweep(source: nn.Module, target: nn.Module, x: Tensor, y: Tensor, attack_name: str,
                   eps_list: Sequence[float], batch_size: int = 256, *, keep_adv: bool = True,
                   progress: Optional[Callable[[float, int, int], None]] = None, **opts) -> RobustnessResult:
    """Craft on ``source``, evaluate on ``target``; see the module docstring. ``x`` ``(N, ...)`` in [0, 1]."""
    res = robustness_sweep(source, x, y, attack_name, eps_list, batch_size, keep_adv=True, progress=progress, **opts)
    table = res.table.copy()
    device = _device_of(target)
    with model_state(target, train=False):
        clean_pred, _, _ = _predict(target, res.x, batch_size, device)
    correct = clean_pred == res.y
    eligible = correct & (res.y != res.targets) if res.targets is not None else correct
    table["source_clean_acc"] = table["clean_acc"]
    table["source_robust_acc"] = table["robust_acc"]
    out = RobustnessResult(table=table, x=res.x, y=res.y, clean_pred=clean_pred, targets=res.targets)
    for i, eps in enumerate(table["eps"]):
        adv = res.adv[eps]
        with model_state(target, train=False):
            pred, conf, _ = _predict(target, adv, batch_size, device)
        fooled = (pred == res.targets) if res.targets is not None else (pred != res.y)
        table.loc[i, "clean_acc"] = correct.float().mean().item()
        table.loc[i, "robust_acc"] = (pred == res.y).float().mean().item()
        table.loc[i, "success_rate"] = fooled[eligible].float().mean().item() if bool(eligible.any()) else float("nan")
        table.loc[i, "mean_confidence"] = conf.mean().item()
        out.adv_pred[eps] = pred
        if keep_adv:
            out.adv[eps] = adv
    return out


def check_compatible(source_spec, target_spec) -> Optional[str]:
    """Why examples of ``target_spec``'s data cannot be fed to a model of ``source_spec``, or None."""
    if tuple(source_spec.input_shape) != tuple(target_spec.input_shape):
        return (f"takes inputs of shape {tuple(source_spec.input_shape)}, the target's data has "
                f"{tuple(target_spec.input_shape)}")
    if source_spec.num_classes != target_spec.num_classes:
        return f"has {source_spec.num_classes} classes, the target has {target_spec.num_classes}"
    return None


__all__ = ["SOURCE_COLUMNS", "check_compatible", "transfer_sweep"]

