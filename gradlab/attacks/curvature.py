"""A second-order attack: the top eigenvector of the per-example input Hessian, with the gradient.

First-order attacks follow ``g = grad_x L``; where ``g`` is tiny or masked (saturated softmax,
gradient masking by a defence) they barely move, while the loss can still curve upwards steeply
along some direction. This attack adds that direction: the eigenvector ``v`` of the input-space
Hessian ``H = grad_x^2 L(x, y)`` with the largest (most positive) eigenvalue, i.e. the direction
in which the second-order Taylor model ``L + g.d + d^T H d / 2`` grows fastest. The idea of using
input-space curvature for attacks and robustness follows Moosavi-Dezfooli et al., "Robustness via
curvature regularization, and vice versa" (CVPR 2019) and Fawzi et al. (2018).

Exact method, per iteration ``t = 0..steps-1`` from ``x_0 = x``:

1. ``g = grad_x L(x_t)`` with its graph kept (``create_graph=True``; EOT-averaged when ``eot > 1``).
   The loss is summed over the batch, so its input Hessian is block diagonal (examples do not
   interact) and one Hessian-vector product ``H V`` with ``V`` of shape ``(B, *input_shape)``
   returns every example's ``H_i v_i``. HVPs use
   :func:`gradlab.curvature.hvp.hvp_from_grads` (double backward, reusing ``g``'s graph). Under
   ``--precision fp16`` the graph kept is that of ``S g`` (dynamic loss scaling,
   :mod:`gradlab.attacks.loss_scale`) and every product is divided by ``S`` in float32.
2. The curvature engine's batched Lanczos with full reorthogonalisation
   (:func:`gradlab.curvature.batched.batched_lanczos`: ``lanczos_iters`` HVPs, default 20, at
   most the input dimension D; random Gaussian start and restarts from the attack's seeded
   generator; dot products and norms in float64; an example whose Krylov space is exhausted --
   e.g. a ReLU net's input Hessian ``J^T (diag(p) - p p^T) J`` has rank <= C - 1 -- restarts in
   the complement of its basis, and stops once that complement is one eigenspace). The top Ritz
   pair of each example's tridiagonal matrix gives ``(lambda_max, v)`` with ``||v||_2 = 1``; ``v``'s sign is
   chosen so that ``g . v >= 0`` (the side where the linear term also increases the loss).
3. Four candidate steps, each ``x_t + alpha * d`` projected onto the eps-ball and [0, 1]:
   ``d = dir(g)`` (the PGD/FGSM step), ``dir(v)``, ``dir(-v)``, and ``dir(g + H delta_v)`` -- the
   gradient of the quadratic model at ``delta_v``, the projected ``+v`` step (one more HVP).
   ``dir`` is ``sign`` for linf and ``u / ||u||_2`` for l2.
4. Per example keep the candidate that is worst for the model under the deterministic eval-mode
   model: an adversarial candidate beats a non-adversarial one; otherwise the higher loss wins.

``steps`` defaults to 1 (a single step of size eps, FGSM's cost class plus ``lanczos_iters + 1``
HVPs); ``alpha`` defaults to ``2.5 * eps / steps`` as for PGD. Which candidate won is counted in
``last_choices`` (dict name -> count over examples and steps) and the first iteration's
eigenvalues are kept in ``last_eigenvalues`` ``(B,)`` for reports.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Optional

import torch
from torch import Tensor

from gradlab.attacks import ATTACKS
from gradlab.attacks.base import ALPHA, ATTACK_OPTIONS, STEPS, Attack, per_example
from gradlab.attacks.loss_scale import InputGradScaler
from gradlab.core.options import Option, Options
from gradlab.curvature.batched import batched_lanczos
from gradlab.curvature.hvp import hvp_from_grads
from gradlab.curvature.sampling import gaussian

CANDIDATES = ("gradient", "+eigvec", "-eigvec", "quadratic")
OPTIONS = ATTACK_OPTIONS + Options(
    replace(STEPS, default=1),
    ALPHA,
    Option("lanczos_iters", int, 20, "Hessian-vector products per Lanczos solve (at most the input dimension)",
           low=1),
)


@ATTACKS.register(
    "curvature",
    "second-order: top input-Hessian eigenvector (batched Lanczos on HVPs) combined with the gradient",
    options=OPTIONS,
    paper="Moosavi-Dezfooli et al. 2019",
)
class CurvatureAttack(Attack):
    """Second-order attack; see the module docstring for the exact method. Options: :data:`OPTIONS`."""

    name = "curvature"
    options = OPTIONS
    steps: int
    alpha: float
    lanczos_iters: int

    def __init__(self, model, eps: float, **opts):
        super().__init__(model, eps, **opts)
        if self.alpha is None:
            self.alpha = 2.5 * self.eps / self.steps
        self.last_choices: dict = {}
        self.last_eigenvalues: Optional[Tensor] = None

    # ------------------------------------------------------------------ curvature -----------
    def _grad_and_hvp(self, x: Tensor) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
        """Input gradient (graph kept) and a batched HVP ``(B, D) -> (B, D)`` at ``x``."""
        xr = x.detach().requires_grad_(True)
        if self.precision == "fp16":  # loss scaling: S g's graph, so that the HVPs run on scaled values
            if self.__dict__.get("_scaler") is None:
                self._scaler = InputGradScaler()
            gs, scale = self._scaler.scaled_grad(self.eot_objective_sum(xr), xr)
            g = gs.float() / scale
        else:
            (g,) = torch.autograd.grad(self.eot_objective_sum(xr), xr, create_graph=True)
            gs, scale = g, 1.0

        def hvp(v: Tensor) -> Tensor:
            if not gs.requires_grad:  # the loss is linear in x here: zero Hessian
                return torch.zeros_like(v)
            hv = hvp_from_grads([gs], [xr], [v.reshape(xr.shape).to(xr.dtype)])[0].reshape(v.shape)
            return hv if scale == 1.0 else hv.float() / scale

        return g, hvp

    def _eigenpairs(self, g: Tensor, hvp) -> tuple[Tensor, Tensor, Tensor]:
        flat_g = g.detach().reshape(g.shape[0], -1)
        v0 = gaussian(flat_g.shape, self.generator, dtype=g.dtype, device=g.device)
        # tol=0: always lanczos_iters HVPs, unless an example's spectrum is resolved exactly first
        eig = batched_lanczos(hvp, v0, 1, max_iter=self.lanczos_iters, tol=0.0, return_vectors=True,
                              generator=self.generator)
        return eig.eigenvalues[:, 0], eig.eigenvectors[:, 0], eig.residuals[:, 0]

    def top_eigenpairs(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """``(lambda_max (B,), v (B, *input_shape))`` of each example's input Hessian at ``x``.

        The Hessian is of the attack's objective (CE of the true label, or -CE of the target),
        with the model in eval mode; ``||v||_2 = 1`` per example, sign arbitrary. Float64 output.
        """
        with self.session(x, y) as (x0, _):
            with torch.enable_grad():
                g, hvp = self._grad_and_hvp(x0)
                lam, vec, _ = self._eigenpairs(g, hvp)
        return lam, vec.reshape(x.shape)

    # ------------------------------------------------------------------ the attack ----------
    def _step(self, x_t: Tensor) -> tuple[Tensor, Tensor]:
        g, hvp = self._grad_and_hvp(x_t)
        lam, vec, _ = self._eigenpairs(g, hvp)
        gd = g.detach()
        side = torch.where((gd.reshape(gd.shape[0], -1).double() * vec).sum(dim=1) >= 0, 1.0, -1.0)
        u = (vec * side[:, None]).to(gd.dtype).reshape(gd.shape)
        d_u = self.step_direction(u)
        delta_u = self.project(x_t + self.alpha * d_u) - x_t  # the +v step actually taken
        quad = gd + hvp(delta_u.reshape(gd.shape[0], -1)).reshape(gd.shape).detach()
        directions = [self.step_direction(gd), d_u, -d_u, self.step_direction(quad)]
        best = best_adv = best_obj = None
        choice = torch.zeros(x_t.shape[0], dtype=torch.long, device=x_t.device)
        for i, d in enumerate(directions):
            cand = self.project(x_t + self.alpha * d)
            adv, obj = self.score(cand)
            if best is None:
                best, best_adv, best_obj = cand, adv, obj
                continue
            take = self.better(adv, obj, best_adv, best_obj)
            best = torch.where(per_example(take, best), cand, best)
            best_adv, best_obj = torch.where(take, adv, best_adv), torch.where(take, obj, best_obj)
            choice = torch.where(take, torch.full_like(choice, i), choice)
        return best, choice, lam

    def perturb(self, x: Tensor, y: Tensor) -> Tensor:
        self.last_choices = {name: 0 for name in CANDIDATES}
        x_t = x.clone()
        for t in range(self.steps):
            x_t, choice, lam = self._step(x_t)
            if t == 0:
                self.last_eigenvalues = lam.detach().cpu()
            counts = torch.bincount(choice, minlength=len(CANDIDATES)).tolist()
            for name, c in zip(CANDIDATES, counts):
                self.last_choices[name] += int(c)
        return x_t
