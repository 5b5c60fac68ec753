"""Noisy SGD: annealed gradient noise, or stochastic gradient Langevin dynamics.

Two modes, chosen by ``temperature``:

* ``temperature == 0`` (default), annealed gradient noise (Neelakantan et al., "Adding Gradient
  Noise Improves Learning for Very Deep Networks", 2015): at step t = 0, 1, 2, ...::

      p <- p - lr * (g + n_t),   n_t ~ N(0, sigma_t^2 I),   sigma_t^2 = noise_eta / (1 + t)^noise_gamma

  (paper defaults eta 0.01, gamma 0.55).
* ``temperature = T > 0``, SGLD (Welling & Teh, "Bayesian Learning via Stochastic Gradient Langevin
  Dynamics", ICML 2011), sampling from ``exp(-L / T)``::

      p <- p - lr * g + sqrt(2 * lr * T) * xi,   xi ~ N(0, I)

``weight_decay`` adds ``wd * p`` to the gradient (a Gaussian prior in the SGLD reading). The noise
comes from an optimizer-owned CPU ``torch.Generator`` seeded by ``seed`` (the global RNG is
untouched); its state and the step counter are part of ``state_dict()``. Under data-parallel
training every rank must use the same seed so that all replicas add the same noise.
"""

from __future__ import annotations

import math

import torch

from gradlab.core.options import Option, Options
from gradlab.optim.registry import OPTIMIZERS, check_seed, lr_option, weight_decay_option
from gradlab.optim.state import ExtraState

OPTIONS = Options(
    lr_option(0.1),
    Option("noise_eta", float, 0.01, "initial gradient-noise variance eta", low=0,
           paper="Neelakantan et al. 2015"),
    Option("noise_gamma", float, 0.55, "decay exponent gamma of the noise variance eta / (1 + t)^gamma",
           low=0, paper="Neelakantan et al. 2015"),
    Option("temperature", float, 0.0, "SGLD temperature T (> 0 switches from annealed noise to SGLD)", low=0,
           paper="Welling & Teh 2011"),
    weight_decay_option(),
)


class Langevin(ExtraState):
    """Noisy SGD / SGLD (see module docstring).

    Args:
        params: parameters or parameter groups.
        lr: learning rate.
        noise_eta: initial gradient-noise variance eta (>= 0).
        noise_gamma: decay exponent gamma of the variance (>= 0).
        temperature: SGLD temperature T; > 0 switches to SGLD mode.
        weight_decay: L2 penalty added to the gradient.
        seed: seed of the optimizer's own noise generator.
    """

    needs_loss_closure = False

    def __init__(self, params, lr: float = 0.1, noise_eta: float = 0.01, noise_gamma: float = 0.55,
                 temperature: float = 0.0, weight_decay: float = 0.0, seed: int = 0):
        defaults = OPTIONS.resolve(dict(lr=lr, noise_eta=noise_eta, noise_gamma=noise_gamma,
                                        temperature=temperature, weight_decay=weight_decay),
                                   owner="optimizer langevin")
        super().__init__(params, defaults)
        self._generator = torch.Generator(device="cpu")
        self._generator.manual_seed(check_seed(seed))
        self.t = 0  # steps taken; the schedule's t

    @property
    def events(self) -> list:
        return []

    def noise_std(self, group: dict) -> float:
        """Standard deviation of the noise added to ``p`` at the current step (parameter units)."""
        if group["temperature"] > 0:
            return math.sqrt(2.0 * group["lr"] * group["temperature"])
        variance = group["noise_eta"] / (1.0 + self.t) ** group["noise_gamma"]
        return group["lr"] * math.sqrt(variance)

    @torch.no_grad()
    def step(self, closure=None):
        """One step; ``closure`` (optional) re-evaluates the loss and calls backward, as in torch.optim."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            std = self.noise_std(group)
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.add(p, alpha=group["weight_decay"]) if group["weight_decay"] != 0 else p.grad
                p.add_(g, alpha=-group["lr"])
                if std > 0:
                    xi = torch.randn(p.shape, generator=self._generator, dtype=p.dtype)
                    p.add_(xi.to(p.device), alpha=std)
        self.t += 1
        return loss

    def _gradlab_state(self) -> dict:
        return {"rng_state": self._generator.get_state(), "t": self.t}

    def _load_gradlab_state(self, extra: dict) -> None:
        self._generator.set_state(extra["rng_state"])
        self.t = int(extra["t"])


OPTIMIZERS.add(
    "langevin", Langevin,
    "noisy SGD with annealed gradient noise (Neelakantan et al. 2015) or SGLD (--temperature)",
    options=OPTIONS, paper="Neelakantan et al. 2015; Welling & Teh 2011",
)
