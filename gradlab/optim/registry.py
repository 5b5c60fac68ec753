"""The optimizer registry, and the option declarations several optimizers share.

An optimizer is one file that registers one factory with the options it takes, declared once::

    from gradlab.core.options import Option, Options
    from gradlab.optim.registry import OPTIMIZERS, lr_option, weight_decay_option

    OPTIMIZERS.add(
        "langevin", lambda params, *, seed, **o: Langevin(params, seed=seed, **o),
        "noisy SGD (Neelakantan et al. 2015)",
        options=Options(lr_option(0.1), Option("noise_eta", float, 0.01, "...", low=0), ...),
        paper="Neelakantan et al. 2015",
    )

The factory is called as ``make(params, seed=seed, **resolved)``: ``params`` is a list of
parameters or parameter groups, ``resolved`` holds every declared option, checked and with its
default filled in (:func:`gradlab.optim.build_optimizer`), and ``seed`` seeds the optimizer's own
random generator (ignored by deterministic optimizers). The entry's ``lr`` default is the
optimizer's default learning rate (:func:`gradlab.optim.default_lr`). An option name means one
thing across optimizers: ``momentum`` is a float everywhere, though its default differs.
"""

from __future__ import annotations

from gradlab.core.options import Option, Options
from gradlab.core.registry import Registry

OPTIMIZERS = Registry("optimizer")


def lr_option(default: float) -> Option:
    """The learning rate, with the optimizer's own default."""
    return Option("lr", float, default, "learning rate", low=0, low_open=True)


def weight_decay_option(default: float = 0.0, *, decoupled: bool = False) -> Option:
    """L2 weight decay: added to the gradient, or with ``decoupled`` subtracted from the weights
    as ``lr * wd * p`` (Loshchilov & Hutter 2019)."""
    if decoupled:
        return Option("weight_decay", float, default, "decoupled weight decay: p -= lr * wd * p", low=0,
                      paper="Loshchilov & Hutter 2019")
    return Option("weight_decay", float, default, "L2 penalty: wd * p added to the gradient", low=0)


def betas_option(second: str = "the squared gradient") -> Option:
    """Adam's two EMA coefficients (b1 of the gradient, b2 of ``second``)."""
    return Option("betas", tuple, (0.9, 0.999), f"EMA coefficients (b1, b2) of the gradient and of {second}",
                  length=2, low=0, high=1, high_open=True, paper="Kingma & Ba 2015")


def eps_option(default: float, paper: str = "") -> Option:
    """The term added to an adaptive method's denominator."""
    return Option("eps", float, default, "added to the denominator for numerical stability", low=0,
                  low_open=True, paper=paper)


# The schedule of the Hutchinson diagonal shared by AdaHessian and curvature-GD (the optimizers of
# gradlab.optim.hessian_diag). `hessian_update_every` is named apart from `gradlab train
# --hessian-every N` (the lambda_max probe); the classes take it as `hessian_every=k`.
HESSIAN_DIAG_OPTIONS = Options(
    Option("hessian_update_every", int, 1, "refresh the Hessian diagonal every k steps and reuse it in "
           "between (the delayed update)", low=1, paper="Yao et al. 2021, Sec. 3.4"),
    Option("hessian_warmup", int, 10, "refresh the diagonal every step for this many first steps before "
           "delaying", low=0),
    Option("hessian_samples", int, 1, "Rademacher probes z averaged in each Hutchinson estimate z * Hz",
           low=1, paper="Bekas, Kokiopoulou & Saad 2007"),
)

_SEED = Option("seed", int, 0, "seed of the optimizer's own random generator", low=0)


def check_seed(seed) -> int:
    """``seed`` as an integer >= 0 (one :class:`~gradlab.core.errors.GradlabError` line otherwise)."""
    return _SEED.check(seed)


def check_int(name: str, value, low: int) -> int:
    """An integer ``>= low``, checked as a declared option would be (``hessian_every`` of
    :class:`~gradlab.optim.hessian_diag.HessianDiagOptimizer`, whose keyword names differ from the
    declared option names)."""
    return Option(name, int, low, name, low=low).check(value)
