"""One context for every temporary change to a model: mode, ``requires_grad``, norm statistics.

Evaluation, curvature products, landscapes, attacks and probes all run a model in a state other
than the one the caller left it in (eval mode, frozen parameters, BatchNorm that must not learn
from probe batches). :func:`model_state` saves that state, sets what was asked, and restores all
of it in ``finally``, so an exception inside leaves the model as it was. Nested uses restore in
order, each to what it found.

Also the public module families that several parts of gradlab test for (torch's own base classes
for them are private): :data:`BATCH_NORMS` and :data:`DROPOUTS`.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from torch import nn

#: BatchNorm layers (their running statistics are used in eval mode, updated in train mode).
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
               nn.LazyBatchNorm1d, nn.LazyBatchNorm2d, nn.LazyBatchNorm3d)
#: Dropout layers (random masks in train mode).
DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)

_STAT_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


@contextlib.contextmanager
def model_state(
    model: nn.Module,
    *,
    train: Optional[bool] = None,
    requires_grad: Optional[bool] = None,
    keep_bn_stats: bool = False,
) -> Iterator[nn.Module]:
    """Temporarily set ``model``'s mode and parameter flags; restore everything on exit.

    Args:
        model: the module; every submodule's ``training`` flag and every parameter's
            ``requires_grad`` are saved on entry and restored on exit (whatever the body changed).
        train: True/False calls ``model.train(train)`` (so a module's own ``train`` override
            applies); None leaves the modes as they are.
        requires_grad: True/False sets every parameter's flag; None leaves them.
        keep_bn_stats: running statistics stay as they are. BatchNorm layers stop tracking for
            the duration (in train mode they then normalise with batch statistics and update
            nothing), and the running buffers (``running_mean``, ``running_var``,
            ``num_batches_tracked``) of every module that has them are copied back on exit.
    Yields:
        ``model``.

    Only what differs from the saved state is written back, so a context that changes nothing
    costs one pass over the modules and parameters.
    """
    modules = list(model.modules())
    modes = [m.training for m in modules]
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    tracking, stats = [], []
    if keep_bn_stats:
        tracking = [m for m in modules if isinstance(m, BATCH_NORMS) and m.track_running_stats]
        stats = [(m, name, buf.clone()) for m in modules for name in _STAT_BUFFERS
                 if isinstance(buf := getattr(m, name, None), torch.Tensor)]
    try:
        if train is not None and any(t != train for t in modes):
            model.train(train)
        if requires_grad is not None:
            for p, f in zip(params, flags):
                if f != requires_grad:
                    p.requires_grad_(requires_grad)
        for m in tracking:
            m.track_running_stats = False
        yield model
    finally:
        for m in tracking:
            m.track_running_stats = True
        if stats:
            with torch.no_grad():
                for m, name, saved in stats:
                    getattr(m, name).copy_(saved)
        for m, was in zip(modules, modes):
            if m.training != was:
                m.training = was
        for p, f in zip(params, flags):
            if p.requires_grad != f:
                p.requires_grad_(f)
