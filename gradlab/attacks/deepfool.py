"""DeepFool (Moosavi-Dezfooli, Fawzi & Frossard, CVPR 2016), L2 and Linf, batched.

At the iterate ``x_i`` the boundaries between the clean prediction ``y`` and each of the other
``candidates - 1`` most likely clean classes ``k`` are linearised, ``f'_k = Z_k - Z_y`` and
``w'_k = grad Z_k - grad Z_y``; the closest one in the attack's norm (dual norm ``q``: 2 for L2,
1 for Linf) is ``l = argmin_k |f'_k| / ||w'_k||_q`` and the step onto it is::

    L2:    r_i = (|f'_l| + 1e-4) / ||w'_l||_2^2 * w'_l
    Linf:  r_i = (|f'_l| + 1e-4) / ||w'_l||_1   * sign(w'_l)

(Algorithms 2 and 3 of the paper; 1e-4 as in the reference code). The steps add up to ``r``
and the iterate is ``x_(i+1) = x + (1 + overshoot) r`` (the paper's overshoot on the total
perturbation, which without a box equals ``x_i + (1 + overshoot) r_i``: overshoot on every step)
until it is misclassified or after ``steps`` iterations. In the box, ``x_(i+1)`` is clipped to
[0, 1] and ``r`` is reset to the part of it that took effect, ``(x_(i+1) - x) / (1 + overshoot)``,
so each step starts from the point it was linearised at and never has to undo a clipped-away
excess of earlier ones first (as a sum of unclipped steps does; torchattacks clips every step,
which is the same iterate). The misclassified iterate is then refined (at most ``refine`` forward
passes of a secant search on the scale of its perturbation, steered by the logit margin
``max_{k != y} Z_k - Z_y``, :meth:`~gradlab.attacks.minnorm.MinimumNormAttack.shrink`): the
overshoot was a margin to cross the linearised boundary, and the smallest scale that is still
misclassified replaces it. All examples of the batch move together; one forward pass and one
vmapped backward pass (``is_grads_batched``) give the ``candidates - 1`` Jacobian rows of every
example (one backward per class with EOT, whose passes average); under ``--precision fp16``
that backward pass is loss-scaled (:mod:`gradlab.attacks.loss_scale`), as every attack's input
gradient is. DeepFool is untargeted.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from gradlab.attacks import ATTACKS
from gradlab.attacks.base import ATTACK_OPTIONS, STEPS, per_example
from gradlab.attacks.loss_scale import InputGradScaler
from gradlab.attacks.minnorm import REFINE, MinimumNormAttack, class_margin
from gradlab.core.errors import GradlabError
from gradlab.core.budgets import NORMS
from gradlab.core.options import Option, Options

OPTIONS = ATTACK_OPTIONS.without("norm") + Options(
    Option("norm", str, "l2", "the norm minimised (dual norm of the step: l2 or l1)", choices=NORMS),
    replace(STEPS, default=50),  # the most linearisation steps
    Option("overshoot", float, 0.02, "the sum of the steps is scaled by 1 + overshoot", low=0,
           paper="Moosavi-Dezfooli et al. 2016"),
    Option("candidates", int, 10, "classes considered: the most likely clean ones, the prediction included", low=2,
           paper="Moosavi-Dezfooli et al. 2016"),
    REFINE,
)


@ATTACKS.register("deepfool", "DeepFool: minimum norm by linearised boundaries, l2 or linf",
                  options=OPTIONS, paper="Moosavi-Dezfooli et al. 2016")
class DeepFool(MinimumNormAttack):
    """DeepFool; see the module docstring. Options: :data:`OPTIONS`."""

    name = "deepfool"
    options = OPTIONS

    def __init__(self, model, eps: float, **opts):
        super().__init__(model, eps, **opts)
        if self.targeted:
            raise GradlabError("invalid targeted: true (deepfool is untargeted; for a target class use fmn or cw "
                               "with --target-class C)")

    def jacobian_rows(self, x: Tensor, y: Tensor, cand: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(f', w', pred)`` at ``x`` ``(b, ...)``: ``f'`` ``(b, K)`` = ``Z_cand - Z_y``, ``w'``
        ``(b, K, D)`` its input gradients, ``pred`` ``(b,)`` the eval-mode prediction."""
        b, k = cand.shape
        rows = torch.arange(b, device=x.device)
        if self.eot > 1 or self.eot_noise > 0:
            grads, diffs = [], []
            for j in range(k):
                g, d = self.input_grad(x, lambda z: z[rows, cand[:, j]] - z[rows, y])
                grads.append(g.reshape(b, -1))
                diffs.append(d)
            with torch.no_grad():
                pred = self.logits(x).argmax(dim=1)
            return torch.stack(diffs, 1), torch.stack(grads, 1), pred
        xr = x.detach().requires_grad_(True)
        z = self.model(xr)
        diff = z.gather(1, cand) - z[rows, y][:, None]  # (b, K)
        basis = torch.eye(k, device=x.device, dtype=diff.dtype)[:, None, :].expand(k, b, k)
        if self.precision == "fp16":  # dynamic loss scaling, the scale kept from call to call
            if self.__dict__.get("_scaler") is None:
                self._scaler = InputGradScaler()
            g = self._scaler.grad(diff, xr, basis)
        else:
            (g,) = torch.autograd.grad(diff, xr, grad_outputs=basis, is_grads_batched=True)  # (K, b, ...)
        return diff.detach(), g.reshape(k, b, -1).transpose(0, 1), z.detach().argmax(dim=1)

    def search(self, x: Tensor, y: Tensor) -> Tensor:
        b = x.shape[0]
        clean = self.clean_logits(x)
        k = min(self.candidates, clean.shape[1])
        cand_all = clean.argsort(dim=1, descending=True)[:, 1:k]  # the prediction is column 0
        label = clean.argmax(dim=1)  # equals y wherever the attack has work to do
        r = torch.zeros(b, x[0].numel(), device=x.device, dtype=x.dtype)
        idx = (label == y).nonzero()[:, 0]
        flat0 = x.reshape(b, -1)
        for _ in range(self.steps):
            if idx.numel() == 0:
                break
            xi = (flat0[idx] + (1 + self.overshoot) * r[idx]).clamp(0, 1).reshape(-1, *x.shape[1:])
            f, w, pred = self.jacobian_rows(xi, label[idx], cand_all[idx])
            going = pred == label[idx]
            idx, f, w = idx[going], f[going], w[going]
            if idx.numel() == 0:
                break
            dual = w.norm(dim=2) if self.norm == "l2" else w.abs().sum(dim=2)  # (b, K)
            dist = f.abs() / (dual + 1e-8)
            l = dist.argmin(dim=1)
            pick = torch.arange(idx.numel(), device=x.device)
            fl, wl, dl = f[pick, l].abs() + 1e-4, w[pick, l], dual[pick, l].clamp_min(1e-12)
            if self.norm == "l2":
                step = per_example(fl / dl.pow(2), wl) * wl
            else:
                step = per_example(fl / dl, wl) * wl.sign()
            # r: the steps' sum as far as the box let it act
            moved = (flat0[idx] + (1 + self.overshoot) * (r[idx] + step)).clamp(0, 1)
            r[idx] = (moved - flat0[idx]) / (1 + self.overshoot)
        adv = (flat0 + (1 + self.overshoot) * r).clamp(0, 1).reshape(x.shape)
        with torch.no_grad():
            z_adv = self.logits(adv)
        fooled = z_adv.argmax(dim=1) != label
        return self.shrink(x, adv, fooled & (label == y), lambda z, i: (z.argmax(dim=1) != label[i],
                                                                        class_margin(z, label[i])),
                           self.refine, clean, z_adv)
