"""The first-order optimizers: torch.optim's own implementations, registered under gradlab names.

gradlab does not re-implement these: torch.optim's versions are the reference the field uses and
have vectorised (foreach) kernels. Adam and AdamW use torch's fused kernel (``fused=True``: one
pass over each tensor instead of a dozen foreach calls) wherever it takes every parameter: on the
default digits MLP a whole training step is 24% faster on CPU (15% on the CNN; see
benchmarks/RESULTS.md), with the same update up to float rounding. Other parameters (complex, or on
a device without the kernel) keep the foreach path. The subclasses only add the attributes every
gradlab optimizer has (``needs_loss_closure = False``: the training loop calls ``loss.backward();
opt.step()``, and an empty ``events`` list). What gradlab defines is the mapping from names and
options:

============  ==================================================================  ==========
name          update                                                              default lr
============  ==================================================================  ==========
sgd           plain SGD (Robbins & Monro 1951); ``momentum`` is ignored            0.1
momentum      SGD with heavy-ball momentum (Polyak 1964), momentum default 0.9    0.05
nesterov      SGD with Nesterov momentum (Sutskever et al. 2013), default 0.9     0.05
adam          Adam (Kingma & Ba 2015), L2 weight decay added to the gradient      1e-3
adamw         AdamW (Loshchilov & Hutter 2019), decoupled weight decay 0.01       1e-3
rmsprop       RMSprop (Tieleman & Hinton 2012), alpha 0.99, momentum default 0    1e-3
============  ==================================================================  ==========
"""

from __future__ import annotations

import torch

from gradlab.core.errors import GradlabError
from gradlab.optim.registry import OPTIMIZERS, OptimizerSpec, fused_kernel_takes


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


def _or(value, default):
    return default if value is None else value


def _fused_if_supported(params: list) -> dict:
    """``{"fused": True}`` when torch's fused Adam/AdamW kernel takes every parameter, else ``{}``
    (torch's default, the foreach kernels)."""
    tensors = [t for p in params for t in (p["params"] if isinstance(p, dict) else [p])]
    return {"fused": True} if fused_kernel_takes(tensors) else {}


def _momentum(o: dict, name: str) -> float:
    m = _or(o["momentum"], 0.9)
    if m == 0:
        raise GradlabError(f"invalid momentum for {name}: 0 (must be in (0, 1); use --opt sgd for none)")
    return m


OPTIMIZERS.add(
    "sgd", OptimizerSpec(0.1, lambda params, o: SGD(params, lr=o["lr"], weight_decay=_or(o["weight_decay"], 0.0))),
    "plain stochastic gradient descent", options="--lr --weight-decay --schedule",
)
OPTIMIZERS.add(
    "momentum",
    OptimizerSpec(0.05, lambda params, o: SGD(params, lr=o["lr"], momentum=_momentum(o, "momentum"),
                                              weight_decay=_or(o["weight_decay"], 0.0))),
    "SGD with heavy-ball momentum (default 0.9)", options="--lr --momentum --weight-decay --schedule",
)
OPTIMIZERS.add(
    "nesterov",
    OptimizerSpec(0.05, lambda params, o: SGD(params, lr=o["lr"], momentum=_momentum(o, "nesterov"), nesterov=True,
                                              weight_decay=_or(o["weight_decay"], 0.0))),
    "SGD with Nesterov momentum (default 0.9)", options="--lr --momentum --weight-decay --schedule",
)
OPTIMIZERS.add(
    "adam",
    OptimizerSpec(1e-3, lambda params, o: Adam(params, lr=o["lr"], betas=tuple(o["betas"]), eps=_or(o["eps"], 1e-8),
                                               weight_decay=_or(o["weight_decay"], 0.0),
                                               **_fused_if_supported(params))),
    "Adam (Kingma & Ba 2015)", options="--lr --weight-decay --schedule",
)
OPTIMIZERS.add(
    "adamw",
    OptimizerSpec(1e-3, lambda params, o: AdamW(params, lr=o["lr"], betas=tuple(o["betas"]), eps=_or(o["eps"], 1e-8),
                                                weight_decay=_or(o["weight_decay"], 1e-2),
                                                **_fused_if_supported(params))),
    "Adam with decoupled weight decay (default 0.01; Loshchilov & Hutter 2019)",
    options="--lr --weight-decay --schedule",
)
OPTIMIZERS.add(
    "rmsprop",
    OptimizerSpec(1e-3, lambda params, o: RMSprop(params, lr=o["lr"], alpha=0.99, eps=_or(o["eps"], 1e-8),
                                                  momentum=_or(o["momentum"], 0.0),
                                                  weight_decay=_or(o["weight_decay"], 0.0))),
    "RMSprop (Tieleman & Hinton 2012)", options="--lr --momentum --weight-decay --schedule",
)
