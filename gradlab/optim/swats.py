"""SWATS: start with Adam, switch to SGD once Adam's implied SGD learning rate has settled.

Keskar & Socher, "Improving Generalization Performance by Switching from Adam to SGD", 2017
(arXiv:1712.07628), Algorithm 1. At step k (1-based) of the Adam phase, with ``g_k`` the gradient::

    m_k = b1 m + (1 - b1) g_k,   a_k = b2 a + (1 - b2) g_k^2
    p_k = -lr * sqrt(1 - b2^k) / (1 - b1^k) * m_k / (sqrt(a_k) + eps)      # the Adam step
    w  <- w + p_k
    if p_k . g_k != 0:
        gamma_k  = (p_k . p_k) / (-p_k . g_k)        # SGD lr whose step projects onto p_k
        lambda_k = b2 lambda + (1 - b2) gamma_k
        if k > 1 and |lambda_k / (1 - b2^k) - gamma_k| < switch_eps:     # paper: 1e-9
            switch to SGD with Lambda = lambda_k / (1 - b2^k)

and in the SGD phase ``v_k = b1 v + g_k; w <- w - (1 - b1) Lambda v_k``. The switch is global (the
dot products run over every parameter), as in the paper. After the switch a learning-rate schedule
still applies: Lambda is scaled by ``lr_now / lr_at_switch``. Dot products accumulate in float64.

The switch is recorded in :attr:`SWATS.events` as ``{"step": k, "event": "switch-to-sgd",
"sgd_lr": Lambda}`` (kept in ``state_dict``) for the training loop to log.
"""

from __future__ import annotations

import math

import torch

from gradlab.core.options import Option, Options
from gradlab.optim.registry import OPTIMIZERS, betas_option, eps_option, lr_option, weight_decay_option
from gradlab.optim.state import ExtraState

OPTIONS = Options(
    lr_option(1e-3),
    betas_option(),
    eps_option(1e-8, "Kingma & Ba 2015"),
    weight_decay_option(),
    Option("switch_eps", float, 1e-9, "tolerance of the Adam -> SGD switching test "
           "|lambda_k / (1 - b2^k) - gamma_k| < switch_eps", low=0, low_open=True, paper="Keskar & Socher 2017"),
)


class SWATS(ExtraState):
    """Adam, then SGD with momentum at the projected learning rate (see module docstring).

    Args:
        params: parameters or parameter groups.
        lr: Adam-phase learning rate.
        betas: Adam's (b1, b2); b1 is also the SGD-phase momentum, b2 the EMA of gamma.
        eps: Adam's denominator term.
        weight_decay: L2 penalty added to the gradient (both phases).
        switch_eps: tolerance of the switching test (paper 1e-9).
    """

    needs_loss_closure = False

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, switch_eps: float = 1e-9):
        defaults = OPTIONS.resolve(dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                        switch_eps=switch_eps), owner="optimizer swats")
        self.switch_eps = defaults.pop("switch_eps")  # global (the switch is), not per group
        super().__init__(params, defaults)
        self.phase = "adam"
        self.k = 0  # global step
        self.lambda_ema = 0.0  # EMA of gamma_k (not bias-corrected)
        self.sgd_lr = None  # Lambda, once switched
        self._events: list[dict] = []

    @property
    def events(self) -> list[dict]:
        return self._events

    @torch.no_grad()
    def step(self, closure=None):
        """One step; ``closure`` (optional) re-evaluates the loss and calls backward, as in torch.optim."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.k += 1
        if self.phase == "adam":
            self._adam_step()
        else:
            self._sgd_step()
        return loss

    def _grad(self, p, wd):
        return p.grad.add(p, alpha=wd) if wd != 0 else p.grad

    def _adam_step(self) -> None:
        k = self.k
        pg, pp = [], []  # per-tensor p.g and p.p, in float64 on the parameter's device
        b2 = None
        for group in self.param_groups:
            b1, b2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = self._grad(p, wd)
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                m, a = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(b1).add_(g, alpha=1 - b1)
                a.mul_(b2).addcmul_(g, g, value=1 - b2)
                step = m / (a.sqrt() + eps) * (-lr * math.sqrt(1 - b2 ** k) / (1 - b1 ** k))
                p.add_(step)
                pg.append((step.double() * g.double()).sum())
                pp.append((step.double() ** 2).sum())
        if b2 is None:
            return
        dot_pg, dot_pp = (sum(t.item() for t in pg), sum(t.item() for t in pp))
        if dot_pg == 0.0:
            return
        gamma = dot_pp / -dot_pg
        self.lambda_ema = b2 * self.lambda_ema + (1 - b2) * gamma
        corrected = self.lambda_ema / (1 - b2 ** k)
        if k > 1 and abs(corrected - gamma) < self.switch_eps:
            self.phase = "sgd"
            self.sgd_lr = corrected
            for group in self.param_groups:
                group["lr_at_switch"] = group["lr"]
            self._events.append({"step": k, "event": "switch-to-sgd", "sgd_lr": corrected})

    def _sgd_step(self) -> None:
        for group in self.param_groups:
            b1 = group["betas"][0]
            lr = self.sgd_lr * group["lr"] / group["lr_at_switch"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = self._grad(p, group["weight_decay"])
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                v = state["momentum_buffer"]
                v.mul_(b1).add_(g)
                p.add_(v, alpha=-(1 - b1) * lr)

    def _gradlab_state(self) -> dict:
        return {"phase": self.phase, "k": self.k, "lambda_ema": self.lambda_ema, "sgd_lr": self.sgd_lr,
                "events": [dict(e) for e in self._events]}

    def _load_gradlab_state(self, extra: dict) -> None:
        self.phase, self.k = extra["phase"], int(extra["k"])
        self.lambda_ema, self.sgd_lr = float(extra["lambda_ema"]), extra["sgd_lr"]
        self._events = [dict(e) for e in extra["events"]]


def _make(params, *, seed: int, **options) -> SWATS:
    return SWATS(params, **options)  # deterministic: no generator to seed


OPTIMIZERS.add(
    "swats", _make, "SWATS: Adam, switching to SGD at the projected lr (Keskar & Socher 2017)",
    options=OPTIONS, paper="Keskar & Socher 2017",
)
