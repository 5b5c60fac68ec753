"""The first-order optimizers: torch.optim's own implementations, registered under gradlab names.

gradlab does not re-implement these: torch.optim's versions are the reference the field uses and
have vectorised (foreach) kernels. Adam and AdamW ask torch for its fused kernel (``fused=True``,
one pass over each tensor instead of a dozen foreach calls; the same update up to float rounding)
and, where torch refuses it for the given parameters (complex ones, a device without the kernel,
an older torch), fall back to torch's default implementation: torch itself is asked, through
its public ``fused`` argument (:func:`fused_or_default`). The subclasses only add the attributes every
gradlab optimizer has (``needs_loss_closure = False``: the training loop calls ``loss.backward();
opt.step()``, and an empty ``events`` list). What gradlab defines is the mapping from names and
options:

============  ==================================================================  ==========
name          update                                                              default lr
============  ==================================================================  ==========
sgd           plain SGD (Robbins & Monro 1951); no momentum                       0.1
momentum      SGD with heavy-ball momentum (Polyak 1964), momentum default 0.9    0.05
nesterov      SGD with Nesterov momentum (Sutskever et al. 2013), default 0.9     0.05
adam          Adam (Kingma & Ba 2015), L2 weight decay added to the gradient      1e-3
adamw         AdamW (Loshchilov & Hutter 2019), decoupled weight decay 0.01       1e-3
rmsprop       RMSprop (Tieleman & Hinton 2012), alpha 0.99, momentum default 0    1e-3
============  ==================================================================  ==========
"""

from __future__ import annotations

import torch

from gradlab.core.options import Option, Options
from gradlab.optim.registry import OPTIMIZERS, betas_option, eps_option, lr_option, weight_decay_option


class _GradlabFirstOrder:
    needs_loss_closure = False

    @property
    def events(self) -> list:
        return []


class SGD(_GradlabFirstOrder, torch.optim.SGD):
    """torch.optim.SGD (plain, heavy-ball or Nesterov momentum)."""


class Adam(_GradlabFirstOrder, torch.optim.Adam):
    """torch.optim.Adam."""


class AdamW(_GradlabFirstOrder, torch.optim.AdamW):
    """torch.optim.AdamW."""


class RMSprop(_GradlabFirstOrder, torch.optim.RMSprop):
    """torch.optim.RMSprop."""


def fused_or_default(cls: type, params: list, **kwargs) -> torch.optim.Optimizer:
    """``cls(params, fused=True, **kwargs)`` where torch's fused kernel takes every parameter,
    else ``cls(params, **kwargs)`` (torch's default implementation).

    Whether it does is asked of torch itself, through its public ``fused`` argument, for each
    (device, dtype) of ``params`` on a one-element scratch tensor: a torch without the kernel for
    that device or dtype (complex parameters; CPU before torch 2.4) raises ``RuntimeError`` at
    construction or, in newer versions, at the first step, and a torch whose ``cls`` has no
    ``fused`` argument raises ``TypeError``. The parameters themselves are never touched by the
    trial.
    """
    params = [{**p, "params": _listed(p["params"])} if isinstance(p, dict) else p for p in params]
    tensors = [t for p in params for t in (p["params"] if isinstance(p, dict) else [p])]
    kinds = {(t.device, t.dtype) for t in tensors}
    if kinds and all(_fused_takes(cls, device, dtype) for device, dtype in kinds):
        return cls(params, fused=True, **kwargs)
    return cls(params, **kwargs)


def _fused_takes(cls: type, device: torch.device, dtype: torch.dtype) -> bool:
    scratch = torch.zeros(1, device=device, dtype=dtype, requires_grad=True)
    try:
        trial = cls([scratch], fused=True)
        scratch.grad = torch.zeros_like(scratch)
        trial.step()
    except (RuntimeError, TypeError):
        return False
    return True


def _listed(ps) -> list:
    """A group's parameters as a list (a generator would serve only one pass)."""
    return [ps] if isinstance(ps, torch.Tensor) else list(ps)


def _momentum_option(default: float, what: str, paper: str, *, allow_zero: bool) -> Option:
    if allow_zero:
        return Option("momentum", float, default, what, low=0, high=1, high_open=True, paper=paper)
    return Option("momentum", float, default, what, low=0, high=1, low_open=True, high_open=True,  # 0: use sgd
                  paper=paper)


def _sgd(params, *, seed, lr, weight_decay):
    return SGD(params, lr=lr, weight_decay=weight_decay)


def _heavy_ball(params, *, seed, lr, momentum, weight_decay):
    return SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def _nesterov(params, *, seed, lr, momentum, weight_decay):
    return SGD(params, lr=lr, momentum=momentum, nesterov=True, weight_decay=weight_decay)


def _adam(params, *, seed, lr, betas, eps, weight_decay):
    return fused_or_default(Adam, params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def _adamw(params, *, seed, lr, betas, eps, weight_decay):
    return fused_or_default(AdamW, params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def _rmsprop(params, *, seed, lr, momentum, eps, weight_decay):
    return RMSprop(params, lr=lr, alpha=0.99, eps=eps, momentum=momentum, weight_decay=weight_decay)


OPTIMIZERS.add(
    "sgd", _sgd, "plain stochastic gradient descent",
    options=Options(lr_option(0.1), weight_decay_option()), paper="Robbins & Monro 1951",
)
OPTIMIZERS.add(
    "momentum", _heavy_ball, "SGD with heavy-ball momentum (default 0.9)",
    options=Options(lr_option(0.05), _momentum_option(0.9, "momentum coefficient (heavy ball)", "Polyak 1964",
                                                      allow_zero=False), weight_decay_option()),
    paper="Polyak 1964",
)
OPTIMIZERS.add(
    "nesterov", _nesterov, "SGD with Nesterov momentum (default 0.9)",
    options=Options(lr_option(0.05), _momentum_option(0.9, "momentum coefficient (Nesterov)",
                                                      "Sutskever et al. 2013", allow_zero=False),
                    weight_decay_option()),
    paper="Sutskever et al. 2013",
)
OPTIMIZERS.add(
    "adam", _adam, "Adam (Kingma & Ba 2015)",
    options=Options(lr_option(1e-3), betas_option(), eps_option(1e-8, "Kingma & Ba 2015"), weight_decay_option()),
    paper="Kingma & Ba 2015",
)
OPTIMIZERS.add(
    "adamw", _adamw, "Adam with decoupled weight decay (default 0.01; Loshchilov & Hutter 2019)",
    options=Options(lr_option(1e-3), betas_option(), eps_option(1e-8, "Kingma & Ba 2015"),
                    weight_decay_option(1e-2, decoupled=True)),
    paper="Loshchilov & Hutter 2019",
)
OPTIMIZERS.add(
    "rmsprop", _rmsprop, "RMSprop (Tieleman & Hinton 2012)",
    options=Options(lr_option(1e-3), _momentum_option(0.0, "momentum coefficient (of the RMSprop step)", "",
                                                      allow_zero=True), eps_option(1e-8), weight_decay_option()),
    paper="Tieleman & Hinton 2012",
)
