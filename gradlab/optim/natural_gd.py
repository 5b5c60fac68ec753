"""Natural gradient by Hessian-free optimization: a damped Gauss-Newton (or Fisher) solve by CG.

Martens 2010, "Deep learning via Hessian-free optimization". At each step, on the batch of the
closure, with gradient ``g`` and curvature ``G`` (the generalised Gauss-Newton matrix, or the
Monte Carlo true Fisher: equal in expectation for cross-entropy and squared error, Martens 2020)::

    d      = CG solution of (G + lambda I) d = -g,    started at cg_decay * d_previous
    theta <- theta + lr * d
    rho    = (f(theta + lr d) - f(theta)) / (q(lr d) - q(0)),   q(s) = f + g^T s + s^T G s / 2
    lambda <- 3/2 lambda if rho < 1/4;  2/3 lambda if rho > 3/4   (Levenberg-Marquardt)

``G`` is never formed: each CG iteration is one product ``J^T Lambda J v`` through the closure's
own forward pass (:class:`gradlab.curvature.ggn.Linearization`, ``J v`` by double backward;
``Lambda`` the loss's output Hessian, :mod:`gradlab.curvature.likelihood`, or for the Fisher
outer products of output gradients at labels sampled from the model). CG (:mod:`gradlab.curvature.cg`)
stops on the paper's relative-progress rule or after ``cg_iters`` iterations. ``q`` is the
*undamped* quadratic model; its value comes from CG's residual, so ``rho`` costs one extra forward
pass (``f`` at the new point, the closure evaluated once more without gradients). A step that
raises the batch loss is undone (gradlab's safeguard; ``rho < 0`` then also raises ``lambda``).
The rule, the ratio and the undo are :mod:`gradlab.optim.damping`'s, shared with ``newton`` and
``saddle-free-newton``.
Not implemented from the paper: the diagonal preconditioner of CG, backtracking over CG iterates,
separate (smaller) curvature mini-batches.

On a model linear in its parameters with squared error, ``G`` is the Hessian and a step with
``lr = 1`` and fixed damping is the damped Newton step ``-(H + lambda I)^-1 g`` (tested against a
dense solve in float64). The convention is the model-bound one (:mod:`gradlab.optim.model_bound`):
``opt.bind(model, loss_fn)`` once, then ``opt.step(closure)``. One ``lr`` and ``damping`` (the
first parameter group's) apply to all parameters.

    >>> import torch, torch.nn.functional as F
    >>> from gradlab.optim.natural_gd import NaturalGD
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    >>> x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    >>> opt = NaturalGD(model.parameters(), damping=0.1)
    >>> opt.bind(model, F.cross_entropy)
    >>> losses = [float(opt.step(lambda: F.cross_entropy(model(x), y))) for _ in range(10)]
    >>> losses[-1] < 0.7 * losses[0]
    True
"""

from __future__ import annotations

import torch
from torch import Tensor

from gradlab.core.options import Option, Options
from gradlab.curvature.cg import conjugate_gradient
from gradlab.curvature.cost import products
from gradlab.curvature.fisher import _outer_product
from gradlab.curvature.ggn import Linearization
from gradlab.core.distributed import reduce_over_ranks
from gradlab.optim.damping import adapt_groups, cg_curvature, predicted_change, trial_step
from gradlab.optim import loss_scaling
from gradlab.optim.model_bound import ModelBoundOptimizer, sampled_output_gradients, world_size
from gradlab.optim.registry import OPTIMIZERS, lr_option

CURVATURES = ("ggn", "fisher")

OPTIONS = Options(
    lr_option(1.0),
    Option("damping", float, 1.0, "initial Tikhonov damping lambda of (G + lambda I) d = -g (adapted by "
           "the reduction ratio when adapt_damping)", low=0, low_open=True, paper="Martens 2010"),
    Option("adapt_damping", bool, True, "Levenberg-Marquardt rule: lambda *= 3/2 when rho < 1/4, *= 2/3 "
           "when rho > 3/4", paper="Martens 2010"),
    Option("cg_iters", int, 20, "cap on conjugate-gradient iterations per step (each one curvature "
           "product); CG also stops on relative progress", low=1, paper="Martens 2010"),
    Option("cg_decay", float, 0.95, "CG starts at this fraction of the previous step's solution (0: "
           "from zero)", low=0, high=1, paper="Martens 2010"),
    Option("curvature", str, "ggn", "the metric: ggn (Gauss-Newton, exact output Hessian) or fisher "
           "(true Fisher, labels sampled from the model)", choices=CURVATURES),
    Option("mc_samples", int, 1, "labels sampled per example for curvature fisher", low=1),
)


class NaturalGD(ModelBoundOptimizer):
    """Hessian-free natural gradient (module docstring). Args as :data:`OPTIONS`, plus ``seed``
    (the Fisher's label draws)."""

    name = "natural-gd"

    def __init__(self, params, lr: float = 1.0, damping: float = 1.0, adapt_damping: bool = True,
                 cg_iters: int = 20, cg_decay: float = 0.95, curvature: str = "ggn", mc_samples: int = 1,
                 seed: int = 0):
        defaults = OPTIONS.resolve(dict(lr=lr, damping=damping, adapt_damping=adapt_damping, cg_iters=cg_iters,
                                        cg_decay=cg_decay, curvature=curvature, mc_samples=mc_samples),
                                   owner="optimizer natural-gd")
        super().__init__(params, defaults, seed=seed)
        self.last: dict = {}  # rho, cg iterations, damping of the last step (for inspection)

    @torch.no_grad()
    def step(self, closure=None):
        """One Hessian-free step; ``closure()`` returns the loss without backward."""
        group = self.param_groups[0]
        lr, lam = group["lr"], group["damping"]
        params = self._params()
        with torch.enable_grad():
            loss, z, _ = self._forward(closure)
            grads = self._gradients(loss, params, retain_graph=True)
            with products(0):  # the graph of J^T u that every product reuses (gradlab.curvature.cost)
                lin = Linearization.of_outputs(z, params)
        (*grads, f0), n_global = self._average([*grads, loss.detach().reshape(1)], z.shape[0])
        g = torch.cat([t.reshape(-1) for t in grads])
        matvec = self._curvature_product(lin, z.detach(), n_global / z.shape[0])
        x0 = None
        if group["cg_decay"] > 0 and "direction" in self.state[params[0]]:
            x0 = group["cg_decay"] * torch.cat([self.state[p]["direction"].reshape(-1) for p in params])
        res = conjugate_gradient(lambda v: matvec(v).add_(v, alpha=lam), -g, x0, max_iters=group["cg_iters"])
        d = res.x
        q = predicted_change(float(g.dot(d)), cg_curvature(d, g, res.residual, lam), lr)
        parts = [part.view_as(p) for part, p in zip(torch.split(d, [p.numel() for p in params]), params)]
        for p, part, gr in zip(params, parts, grads):
            self.state[p]["direction"] = part.clone()
            p.grad = gr
        trial = trial_step(params, parts, lr, closure, float(f0), q)
        rho, f1 = trial.rho, trial.loss_after
        if group["adapt_damping"]:
            adapt_groups(self.param_groups, lam, rho)
        self.steps_taken += 1
        self.last = {"rho": rho, "cg_iters": res.iterations, "cg_stop": res.reason, "damping": lam, "q": q,
                     "loss_after": f1}
        return loss.detach()

    def _curvature_product(self, lin: Linearization, z: Tensor, share: float):
        """``v -> G v`` (flat) of the global batch: this rank's mean-loss product times its share of
        the examples, summed over ranks."""
        lik, params = self.likelihood, lin.params
        sizes = [p.numel() for p in params]
        S = None
        if self.param_groups[0]["curvature"] == "fisher":
            # labels drawn on the global batch under torchrun: what one process draws
            S = sampled_output_gradients(lik, z, self.param_groups[0]["mc_samples"], self._generator)
        multi = world_size() > 1

        def product(v: Tensor) -> Tensor:
            vs = [c.view_as(p) for c, p in zip(torch.split(v, sizes), params)]
            with products(1):  # one curvature product (gradlab.curvature.cost)
                with torch.enable_grad():
                    jv = lin.jvp(vs)
                out = lik.hessian_product(z, jv) if S is None else _outer_product(S, jv.unsqueeze(0), lik.factor(z))[0]
                with torch.enable_grad():
                    r = torch.cat([t.reshape(-1) for t in self._transpose(lin, out)])
            if multi:
                r = reduce_over_ranks([r / share])[0]
            return r

        return product

    def _transpose(self, lin: Linearization, out: Tensor) -> list[Tensor]:
        """``J^T out``; under fp16 ``J^T (S out) / S`` (``out = Lambda J v`` holds the output
        Hessian's small entries, which would underflow in the float16 backward pass)."""
        scaler = self.loss_scaler
        if scaler is None:
            return lin.vjp(out)
        s = scaler.scale
        r = scaler.product(lambda c: lin.vjp(out * (s * c)), s)
        loss_scaling.check(scaler, "Gauss-Newton product", out.device)
        return r


def _make(params, *, seed: int, **options) -> NaturalGD:
    return NaturalGD(params, seed=seed, **options)


OPTIMIZERS.add(
    "natural-gd", _make, "Hessian-free natural gradient: damped Gauss-Newton/Fisher solve by CG, "
    "Levenberg-Marquardt damping (Martens 2010)", options=OPTIONS, paper="Martens 2010",
)
