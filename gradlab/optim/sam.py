"""Sharpness-aware minimisation (SAM) and its adaptive variant (ASAM), over any first-order optimizer.

SAM (Foret, Kleiner, Mobahi & Neyshabur 2021, "Sharpness-aware minimization for efficiently
improving generalization") minimises ``max_{|e| <= rho} L(w + e)`` by one ascent step and the
gradient there::

    g  = grad L(w)
    e  = rho * g / |g|                       (the whole parameter vector's 2-norm)
    g' = grad L(w + e)
    w <- base_update(w, g')                  (base: momentum SGD by default; sgd gives SAM-SGD)

ASAM (Kwon, Kim, Park & Choi 2021, "ASAM: Adaptive sharpness-aware minimization for scale-
invariant learning of deep neural networks") measures the neighbourhood relative to the weights,
with the elementwise operator ``T = |w| + eta``::

    e  = rho * T^2 g / |T g|

so a rescaling of a layer's weights (which leaves a ReLU network's function unchanged) does not
change the sharpness it sees. The perturbation is removed exactly (the weights are restored
bit for bit) before the base optimizer steps. A step costs two gradients (target: at most 2.1x
an SGD step, ``benchmarks/bench_second_order.py``).

Convention: ``needs_loss_closure`` (:mod:`gradlab.optim`): the closure returns the loss without
backward and is evaluated twice per step (at ``w`` and at ``w + e``); ``step`` returns the loss at
``w``. Under torchrun both gradients are averaged over ranks here (the model is not DDP-wrapped).
The base optimizer's other options take their defaults (``momentum`` 0.9 for momentum).

    >>> import torch
    >>> w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    >>> opt = SAM([w], lr=0.1, rho=0.5, base="sgd")
    >>> loss = opt.step(lambda: 0.5 * (w * w).sum())      # g = w, e = 0.5 w / 5, g' = 1.1 w
    >>> [round(v, 5) for v in w.detach().tolist()]       # w - 0.1 * 1.1 w
    [2.67, 3.56]
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.optim import Optimizer

from gradlab.core.options import Option, Options
from gradlab.core.distributed import reduce_over_ranks
from gradlab.optim import loss_scaling
from gradlab.optim.model_bound import perturbed
from gradlab.optim.registry import OPTIMIZERS, lr_option, weight_decay_option

BASES = ("sgd", "momentum", "nesterov", "adam", "adamw", "rmsprop")


def _options(rho: float, adaptive: bool) -> Options:
    opts = [
        lr_option(0.05),
        Option("rho", float, rho, "radius of the neighbourhood whose worst-case loss is minimised"
               + (" (relative to |w| + eta)" if adaptive else ""), low=0,
               paper="Kwon et al. 2021" if adaptive else "Foret et al. 2021"),
        Option("base", str, "momentum", "the first-order optimizer that steps with the gradient at the "
               "perturbed point (sgd: SAM-SGD)", choices=BASES),
        weight_decay_option(),
    ]
    if adaptive:
        opts.append(Option("eta", float, 0.01, "added to |w| in the elementwise scale T = |w| + eta", low=0,
                           paper="Kwon et al. 2021"))
    return Options(*opts)


SAM_OPTIONS, ASAM_OPTIONS = _options(0.05, False), _options(0.5, True)


class SAM(Optimizer):
    """SAM, or with ``adaptive=True`` ASAM (module docstring).

    Args:
        params: parameters or parameter groups.
        lr: the base optimizer's learning rate.
        rho: neighbourhood radius (>= 0; 0 is the base optimizer).
        base: one of :data:`BASES`.
        weight_decay: the base optimizer's (L2, or decoupled for adamw).
        adaptive: ASAM's scale ``T = |w| + eta``.
        eta: ASAM's offset.
    """

    needs_loss_closure = True
    loss_scaler = None  # fp16: a gradlab.core.loss_scale.LossScaler (gradlab.optim.loss_scaling.attach)

    def __init__(self, params, lr: float = 0.05, rho: float = 0.05, base: str = "momentum",
                 weight_decay: float = 0.0, adaptive: bool = False, eta: float = 0.01, seed: int = 0):
        from gradlab.optim import build_optimizer

        opts = ASAM_OPTIONS if adaptive else SAM_OPTIONS
        given = dict(lr=lr, rho=rho, base=base, weight_decay=weight_decay, **({"eta": eta} if adaptive else {}))
        defaults = opts.resolve(given, owner=f"optimizer {'asam' if adaptive else 'sam'}")
        super().__init__(params, {**defaults, "adaptive": adaptive})
        self.base = build_optimizer(base, self.param_groups, lr=lr, weight_decay=weight_decay, seed=seed)
        self.param_groups = self.base.param_groups  # one set of groups: a scheduler's lr reaches the base

    @property
    def events(self) -> list:
        return []

    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"] if p.requires_grad]

    def _gradient(self, closure, params):
        with torch.enable_grad():
            loss = closure()
            grads = loss_scaling.gradients(self.loss_scaler, loss, params)  # fp16: loss-scaled
        return loss.detach(), reduce_over_ranks(grads, mean=True)

    def ascent(self, grads: list[Tensor]) -> list[Tensor]:
        """The perturbation ``e`` for gradients ``grads`` (one per parameter of :meth:`_params`):
        foreach operations, one norm of the whole vector, one new tensor per parameter."""
        adaptive = self.defaults["adaptive"]
        groups, i = [], 0
        for group in self.param_groups:
            ps = [p for p in group["params"] if p.requires_grad]
            if ps:
                groups.append((group, ps, grads[i:i + len(ps)]))
            i += len(ps)
        if adaptive:  # T = |w| + eta; the norm is of T g, the direction T^2 g
            scales = [torch._foreach_add(torch._foreach_abs([p.detach() for p in ps]), group["eta"])
                      for group, ps, _ in groups]
            tg = [torch._foreach_mul(gs, ts) for (_, _, gs), ts in zip(groups, scales)]
        else:
            tg = [gs for _, _, gs in groups]
        norm = torch.linalg.vector_norm(torch.stack([n for t in tg for n in torch._foreach_norm(t)]))
        inv = norm.clamp_min(1e-12).reciprocal()
        e = []
        for j, (group, _, _) in enumerate(groups):
            direction = torch._foreach_mul(tg[j], scales[j]) if adaptive else tg[j]
            e += torch._foreach_mul(direction, inv * group["rho"])
        return e

    @torch.no_grad()
    def step(self, closure=None):
        """One SAM step: two closure evaluations, then the base optimizer's step."""
        from gradlab.core.errors import GradlabError

        if closure is None:
            raise GradlabError("SAM.step needs a closure that returns the loss without calling backward, "
                               "e.g. opt.step(lambda: loss_fn(model(x), y))")
        params = self._params()
        loss, grads = self._gradient(closure, params)
        with perturbed(params, self.ascent(grads)):
            _, sharp = self._gradient(closure, params)
        for p, g in zip(params, sharp):
            p.grad = g
        self.base.step()
        return loss

    def state_dict(self) -> dict:
        return self.base.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.base.load_state_dict(state_dict)
        self.param_groups = self.base.param_groups


OPTIMIZERS.add("sam", lambda params, *, seed, **o: SAM(params, seed=seed, **o),
               "sharpness-aware minimisation over a first-order base optimizer (Foret et al. 2021)",
               options=SAM_OPTIONS, paper="Foret et al. 2021")
OPTIMIZERS.add("asam", lambda params, *, seed, **o: SAM(params, adaptive=True, seed=seed, **o),
               "adaptive SAM: the neighbourhood scaled by |w| + eta (Kwon et al. 2021)",
               options=ASAM_OPTIONS, paper="Kwon et al. 2021")
