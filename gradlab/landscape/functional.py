"""Evaluate and train a model at weights that are functions of other tensors.

Simplexes (:mod:`gradlab.landscape.simplex`) and mode-connecting curves
(:mod:`gradlab.landscape.connect`) never own a network of their own: a point of the simplex or the
curve is a name -> tensor dict built from the vertices/control points, and the model is run there
through ``torch.func.functional_call`` (the module itself is never written to).

BatchNorm: a point's running statistics are those of no trained network, so they are recomputed
at each evaluated point (Garipov et al. 2018, Sec. 4; Izmailov et al. 2018): one pass over
training batches in train mode with ``momentum=None`` (an exact cumulative average), into fresh
buffers.
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from gradlab.core.errors import GradlabError
from gradlab.core.losses import LOSSES
from gradlab.core.options import Option
from gradlab.core.precision import precision_option
from gradlab.core.autocast import autocast, upcast
from gradlab.core.modelstate import BATCH_NORMS, model_state

# Options of the commands that train and evaluate points (simplex, connect).
EVAL_SPLIT = Option("split", str, "test", "evaluation split", choices=("train", "test"))
EVAL_PRECISION = precision_option("arithmetic of each evaluated point's forward pass: bf16/fp16 under autocast "
                                  "(training and the BatchNorm passes stay float32; losses summed in float64)")
LOSS = Option("loss", str, None, "loss to train and evaluate with (default: the source run's --loss)",
              choices=LOSSES)
BN_BATCHES = Option("bn_batches", int, 8, "training batches (of 512) for recomputing BatchNorm statistics at "
                    "each evaluated point", low=1)


def source_loss(given: Optional[str], *runs) -> str:
    """The loss of a command on trained runs (``runs``: their :class:`~gradlab.training.load.LoadedRun`):
    ``given`` (``--loss``) when set, else the loss the runs trained with (``config.yaml``); runs
    trained with different losses need ``--loss`` (one :class:`GradlabError` line)."""
    from gradlab.core.losses import DEFAULT_LOSS, check_loss, run_loss

    if given:
        return check_loss(given)
    losses = {run_loss(r.config) for r in runs}
    if len(losses) > 1:
        raise GradlabError(f"the runs trained with different losses ({', '.join(sorted(losses))}): "
                           "choose one with --loss")
    return losses.pop() if losses else DEFAULT_LOSS


def batchnorms(model: nn.Module) -> list:
    return [m for m in model.modules() if isinstance(m, BATCH_NORMS)]


def recompute_bn(model: nn.Module, params: Mapping[str, Tensor], batches: Sequence[tuple]) -> dict:
    """Buffers for ``model`` at ``params`` with BatchNorm statistics averaged over ``batches``.

    Returns the model's buffers with every BatchNorm's ``running_mean/var/num_batches_tracked``
    replaced by fresh tensors filled by a train-mode pass (``momentum=None``: exact mean over the
    batches). Without BatchNorm, the model's own buffers are returned unchanged.
    """
    buffers = {n: b for n, b in model.named_buffers()}
    bns = batchnorms(model)
    if not bns:
        return buffers
    bn_names = {id(m): name for name, m in model.named_modules() if isinstance(m, BATCH_NORMS)}
    fresh = dict(buffers)
    for m in bns:
        prefix = bn_names[id(m)] + "."
        if m.running_mean is not None:
            fresh[prefix + "running_mean"] = torch.zeros_like(m.running_mean)
            fresh[prefix + "running_var"] = torch.ones_like(m.running_var)
            fresh[prefix + "num_batches_tracked"] = torch.zeros_like(m.num_batches_tracked)
    # model_state saves modes, requires_grad and running buffers, not hyperparameters such as
    # momentum, so the momenta are saved and restored here (the one place that changes them)
    momenta = [m.momentum for m in bns]
    try:
        for m in bns:
            m.momentum = None  # cumulative average over the passes below
        with torch.no_grad(), model_state(model, train=True):
            for x, _ in batches:
                functional_call(model, ({k: v.detach() for k, v in params.items()}, fresh), (x,))
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
    return fresh


def evaluate_at(
    model: nn.Module,
    params: Mapping[str, Tensor],
    batches: Sequence[tuple],
    *,
    bn_batches: Optional[Sequence[tuple]] = None,
    return_probs: bool = False,
    loss_fn=F.cross_entropy,
    precision: str = "fp32",
    raw_outputs: bool = False,
):
    """Mean loss (``loss_fn``, default cross-entropy) and accuracy of ``model`` at ``params`` over ``batches`` (eval mode).

    With BatchNorm, its statistics are recomputed at ``params`` on ``bn_batches`` (default:
    ``batches``). ``return_probs`` also returns the softmax outputs, concatenated over the batches
    (N, C), for ensembles (``raw_outputs``: the outputs themselves, for an MSE-trained model whose
    ensemble averages its outputs). ``precision`` bf16/fp16: the forward passes under autocast
    (outputs cast back to float32); the sums over batches are float64 tensors, read back once.
    """
    buffers = recompute_bn(model, params, bn_batches if bn_batches is not None else batches)
    losses, hits = [], []
    n = 0
    probs = []
    device_type = next(iter(params.values())).device.type if params else "cpu"
    with torch.no_grad(), model_state(model, train=False):
        for x, y in batches:
            with autocast(precision, device_type):
                out = functional_call(model, ({k: v.detach() for k, v in params.items()}, buffers), (x,))
            out = upcast(out)
            losses.append(loss_fn(out, y, reduction="sum").double().reshape(1))
            hits.append((out.argmax(dim=-1) == y).sum().double().reshape(1))
            n += len(y)
            if return_probs:
                probs.append(out.double() if raw_outputs else out.softmax(dim=-1).double())
    if n == 0:
        raise GradlabError("no evaluation batches")
    tot_l, tot_a = torch.stack([torch.cat(losses).sum(), torch.cat(hits).sum()]).tolist()  # one read-back
    if return_probs:
        return tot_l / n, tot_a / n, torch.cat(probs)
    return tot_l / n, tot_a / n


def shuffled_batches(x: Tensor, y: Tensor, batch_size: int, generator: torch.Generator, device) -> Iterable[tuple]:
    """One epoch of ``(x, y)`` batches in a random order drawn from ``generator``."""
    perm = torch.randperm(len(x), generator=generator)
    for i in range(0, len(x), batch_size):
        idx = perm[i : i + batch_size]
        yield x[idx].to(device), y[idx].to(device)


def train_points(
    model: nn.Module,
    make_params: Callable[[torch.Generator], tuple],
    trainable: Sequence[Tensor],
    x: Tensor,
    y: Tensor,
    *,
    epochs: int,
    lr: float,
    batch_size: int = 128,
    seed: int = 0,
    device="cpu",
    weight_decay: float = 0.0,
    on_epoch: Optional[Callable[[int, dict], None]] = None,
    loss_fn=F.cross_entropy,
) -> list:
    """SGD (momentum 0.9, cosine-annealed lr) on ``trainable`` through sampled points
    (``loss_fn``: the data loss, default cross-entropy; the ``ce`` column holds it).

    Every step calls ``make_params(generator)`` -> ``(params, extra_loss, info)``: the weights of
    a freshly sampled point (built from ``trainable``) and a differentiable regulariser added to
    the batch's cross-entropy (``info`` is a dict of floats averaged into the epoch's record).
    The model runs in train mode with scratch copies of its buffers, so its own BatchNorm
    statistics are never updated. Returns one dict per epoch (``loss``, ``ce`` and the info keys).
    """
    if epochs < 1:
        raise GradlabError(f"invalid epochs: {epochs} (must be >= 1)")
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(list(trainable), lr=lr, momentum=0.9, weight_decay=weight_decay)
    steps_per_epoch = (len(x) + batch_size - 1) // batch_size
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    scratch = {n: b.clone() for n, b in model.named_buffers()}
    history = []
    with model_state(model, train=True):
        for epoch in range(epochs):
            sums: dict = {}
            count = 0
            for xb, yb in shuffled_batches(x, y, batch_size, gen, device):
                params, extra, info = make_params(gen)
                ce = loss_fn(functional_call(model, (params, scratch), (xb,)), yb)
                loss = ce + extra
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                for k, v in {"loss": loss.item(), "ce": ce.item(), **info}.items():
                    sums[k] = sums.get(k, 0.0) + v
                count += 1
            rec = {k: v / count for k, v in sums.items()}
            history.append(rec)
            if on_epoch is not None:
                on_epoch(epoch, rec)
    return history
