"""Optimizers: one registry, one factory, one scheduler builder.

Each optimizer declares exactly the options it takes, with its own defaults
(:class:`~gradlab.core.options.Options`, shown by ``gradlab list optimizers``).
``build_optimizer(name, params, **opts)`` checks ``opts`` against that declaration (one
:class:`~gradlab.core.errors.GradlabError` line per mistake; an option of another optimizer is
answered with its owner) and builds the registered ``torch.optim.Optimizer``.

Three stepping conventions, told apart by the class attributes ``needs_loss_closure`` and
``needs_model``:

* ``False`` (sgd, momentum, nesterov, adam, adamw, rmsprop, swats, langevin)::

      opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()

* ``True`` (adahessian, curvature-gd, lbfgs, sr1, newton, saddle-free-newton, sam, asam): the
  closure returns the loss and does NOT call backward;
  the optimizer takes the gradient and the Hessian-vector products itself::

      opt.zero_grad(); loss = opt.step(lambda: loss_fn(model(x), y))

  The closure may be evaluated more than once per step (sam/asam at the perturbed point,
  natural-gd at the new point for its reduction ratio); the loop reports the first evaluation's.

* ``needs_model = True`` (natural-gd, kfac; implies ``needs_loss_closure``): the optimizer also
  needs the model (K-FAC's layer inputs and output gradients, the Gauss-Newton products' outputs)
  and the loss read as a likelihood. The loop binds it once, then steps with the same closure::

      opt.bind(model, loss_fn)   # the bare module (never a DDP wrapper); loss_fn e.g. F.cross_entropy
      opt.zero_grad(); loss = opt.step(lambda: loss_fn(model(x), y))

  During ``step`` the optimizer watches the model's first forward pass of the closure through
  hooks it removes afterwards; under torchrun it all-reduces gradient and curvature itself
  (:mod:`gradlab.optim.model_bound`).

Every optimizer has an ``events`` list (SWATS records its switch there) and round-trips through
``state_dict()``/``load_state_dict()`` including its random generator, so a resumed run continues
bit-identically.

The learning-rate schedule is not an optimizer option: it wraps any optimizer and needs the run's
total number of steps, which only the training loop knows, so the train command declares it
(``schedule`` in :data:`gradlab.training.options.TRAIN_OPTIONS`) and calls :func:`build_scheduler`.
"""

from __future__ import annotations

from typing import Iterable

from torch.optim import Optimizer

from gradlab.core.errors import GradlabError
# Importing a module registers its optimizers; this order is the order `gradlab list` shows.
from gradlab.optim import first_order  # noqa: F401  (registration)
from gradlab.optim import adahessian, curvature_gd, langevin, swats  # noqa: F401,I001
from gradlab.optim import lbfgs, newton, sr1  # noqa: F401,I001  (closure.py's contract)
from gradlab.optim import sam, natural_gd, kfac  # noqa: F401,I001
from gradlab.optim.registry import OPTIMIZERS, check_seed
from gradlab.optim.schedules import SCHEDULES, build_scheduler

__all__ = ["OPTIMIZERS", "SCHEDULES", "build_optimizer", "build_scheduler", "default_lr",
           "resolve_options"]


def default_lr(name: str) -> float:
    """The learning rate ``name`` uses when none is given (its declaration's ``lr`` default)."""
    return OPTIMIZERS.entry(name).options["lr"].default


def resolve_options(name: str, **opts) -> dict:
    """Every option of optimizer ``name``: ``opts`` over its declared defaults, each checked.

    ``None`` means "not given". An unknown optimizer, an unknown key (with a "did you mean"), a
    key of another optimizer (naming it) or a bad value raise one :class:`GradlabError` line.

        >>> resolve_options("adamw", lr=0.01)
        {'lr': 0.01, 'betas': (0.9, 0.999), 'eps': 1e-08, 'weight_decay': 0.01}
    """
    entry = OPTIMIZERS.entry(name)  # unknown name -> GradlabError listing the choices
    given = {k: v for k, v in opts.items() if v is not None}
    return entry.options.resolve(given, owner=f"optimizer {name}", others=OPTIMIZERS.options_of_others(name))


def build_optimizer(name: str, params: Iterable, *, seed: int = 0, **opts) -> Optimizer:
    """Build the registered optimizer ``name`` over ``params`` (parameters or parameter groups).

    ``opts`` are the optimizer's declared options (see :func:`resolve_options`); ``seed`` seeds
    the optimizer's own generator (AdaHessian's and curvature-GD's probes, Langevin's noise) and
    is not an option: a run passes its own seed.

    Example::

        >>> import torch
        >>> opt = build_optimizer("momentum", torch.nn.Linear(2, 1).parameters(), lr=0.1)
        >>> type(opt).__name__, opt.defaults["momentum"], opt.needs_loss_closure
        ('SGD', 0.9, False)
    """
    o = resolve_options(name, **opts)
    seed = check_seed(seed)
    params = list(params)
    if not params:
        raise GradlabError(f"optimizer {name!r} got no parameters to optimize")
    return OPTIMIZERS.get(name)(params, seed=seed, **o)
