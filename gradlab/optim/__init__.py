"""Optimizers: one registry, one factory, one scheduler builder.

``build_optimizer(name, params, **opts)`` resolves the options against :data:`OPTIM_DEFAULTS`,
validates every value (a :class:`~gradlab.core.errors.GradlabError` names the bad one) and builds the
registered ``torch.optim.Optimizer``; options that do not apply to the chosen optimizer are ignored.

Two stepping conventions, told apart by the class attribute ``needs_loss_closure``:

* ``False`` (sgd, momentum, nesterov, adam, adamw, rmsprop, swats, langevin)::

      opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()

* ``True`` (adahessian, curvature-gd): the closure returns the loss and does NOT call backward;
  the optimizer takes the gradient and the Hessian-vector products itself::

      opt.zero_grad(); loss = opt.step(lambda: loss_fn(model(x), y))

Every optimizer has an ``events`` list (SWATS records its switch there) and round-trips through
``state_dict()``/``load_state_dict()`` including its random generator, so a resumed run continues
bit-identically.
"""

from __future__ import annotations

from typing import Iterable

from torch.optim import Optimizer

from gradlab.core.errors import GradlabError
# Importing a module registers its optimizers; this order is the order `gradlab list` shows.
from gradlab.optim import first_order  # noqa: F401  (registration)
from gradlab.optim import adahessian, curvature_gd, langevin, swats  # noqa: F401,I001
from gradlab.optim.registry import OPTIMIZERS, OptimizerSpec, check_betas, check_int, check_range
from gradlab.optim.schedules import SCHEDULES, build_scheduler

# Every option an optimizer may take. ``None`` means "the chosen optimizer's own default":
# lr (see default_lr), momentum (0.9 for momentum/nesterov, 0 for rmsprop), weight_decay
# (0.01 for adamw, else 0), eps (1e-4 for adahessian, 1e-8 for the Adam family).
OPTIM_DEFAULTS: dict = {
    "lr": None,
    "momentum": None,
    "weight_decay": None,
    "schedule": "constant",
    "betas": [0.9, 0.999],
    "eps": None,
    "hessian_power": 1.0,  # adahessian: denominator exponent k (paper: 1)
    # adahessian, curvature-gd: refresh diag(H) every k steps (the paper's delayed update). Named
    # apart from `gradlab train --hessian-every N` (lambda_max logging); the classes take it as
    # `hessian_every=k`.
    "hessian_update_every": 1,
    "hessian_warmup": 10,  # ...but refresh every step for the first N steps (see optim/hessian_diag.py)
    "hessian_samples": 1,  # adahessian, curvature-gd: Rademacher probes per refresh
    "damping": curvature_gd.DEFAULT_DAMPING,  # curvature-gd: added to |diag H|
    "hessian_ema": curvature_gd.DEFAULT_EMA,  # curvature-gd: EMA of the diagonal estimate
    "switch_eps": 1e-9,  # swats: tolerance of the Adam -> SGD switching test
    "noise_eta": 0.01,  # langevin: initial gradient-noise variance
    "noise_gamma": 0.55,  # langevin: variance decay exponent
    "temperature": 0.0,  # langevin: > 0 switches to SGLD at this temperature
}

# Accepted by build_optimizer but kept out of OPTIM_DEFAULTS because the run config already has a
# top-level ``seed``: pass it on so that different run seeds draw different probes/noise.
_EXTRA_OPTIONS = {"seed": 0}

__all__ = ["OPTIMIZERS", "OPTIM_DEFAULTS", "SCHEDULES", "OptimizerSpec", "build_optimizer", "build_scheduler",
           "default_lr", "resolve_options"]


def default_lr(name: str) -> float:
    """The learning rate ``name`` uses when none is given."""
    return OPTIMIZERS.get(name).default_lr


def resolve_options(name: str, **opts) -> dict:
    """Fill defaults, reject unknown keys and check every value; returns the resolved options."""
    known = {**OPTIM_DEFAULTS, **_EXTRA_OPTIONS}
    unknown = sorted(set(opts) - set(known))
    if unknown:
        raise GradlabError(f"unknown optimizer option(s) {', '.join(unknown)}; valid: {', '.join(known)}")
    spec = OPTIMIZERS.get(name)  # unknown name -> GradlabError listing the choices
    o = {**known, **{k: v for k, v in opts.items() if v is not None}}  # None: keep the default
    o["lr"] = check_range("lr", spec.default_lr if o["lr"] is None else o["lr"], 0.0, None, low_open=True)
    if o["momentum"] is not None:
        o["momentum"] = check_range("momentum", o["momentum"], 0.0, 1.0)
    if o["weight_decay"] is not None:
        o["weight_decay"] = check_range("weight_decay", o["weight_decay"], 0.0)
    if o["eps"] is not None:
        o["eps"] = check_range("eps", o["eps"], 0.0, None, low_open=True)
    if o["schedule"] not in SCHEDULES:
        raise GradlabError(f"unknown schedule {o['schedule']!r}; choose from: {', '.join(SCHEDULES)}")
    o["betas"] = check_betas(o["betas"])
    o["hessian_power"] = check_range("hessian_power", o["hessian_power"], 0.0, 1.0, high_open=False)
    o["hessian_update_every"] = check_int("hessian_update_every", o["hessian_update_every"], 1)
    o["hessian_warmup"] = check_int("hessian_warmup", o["hessian_warmup"], 0)
    o["hessian_samples"] = check_int("hessian_samples", o["hessian_samples"], 1)
    o["damping"] = check_range("damping", o["damping"], 0.0, None, low_open=True)
    o["hessian_ema"] = check_range("hessian_ema", o["hessian_ema"], 0.0, 1.0)
    o["switch_eps"] = check_range("switch_eps", o["switch_eps"], 0.0, None, low_open=True)
    o["noise_eta"] = check_range("noise_eta", o["noise_eta"], 0.0)
    o["noise_gamma"] = check_range("noise_gamma", o["noise_gamma"], 0.0)
    o["temperature"] = check_range("temperature", o["temperature"], 0.0)
    o["seed"] = check_int("seed", o["seed"], 0)
    return o


def build_optimizer(name: str, params: Iterable, **opts) -> Optimizer:
    """Build the registered optimizer ``name`` over ``params`` (parameters or parameter groups).

    Example::

        >>> import torch
        >>> opt = build_optimizer("momentum", torch.nn.Linear(2, 1).parameters(), lr=0.1)
        >>> type(opt).__name__, opt.defaults["momentum"], opt.needs_loss_closure
        ('SGD', 0.9, False)
    """
    o = resolve_options(name, **opts)
    params = list(params)
    if not params:
        raise GradlabError(f"optimizer {name!r} got no parameters to optimize")
    return OPTIMIZERS.get(name).make(params, o)
