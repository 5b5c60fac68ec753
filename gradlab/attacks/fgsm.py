"""FGSM: the fast gradient sign method (Goodfellow, Shlens & Szegedy, ICLR 2015).

One step of size eps along the steepest-ascent direction of the loss in the budget's norm::

    linf:  x_adv = clip_[0,1]( x + eps * sign(grad_x L(x, y)) )
    l2:    x_adv = clip_[0,1]( x + eps * grad_x L / ||grad_x L||_2 )   (the "fast gradient method")

``L`` is the cross-entropy of the true label (targeted: minus the cross-entropy of the target).
Inputs ``(B, *input_shape)`` in [0, 1]; eps in pixel units. With ``eot > 1`` the gradient is the
EOT average (see :mod:`gradlab.attacks.base`). A zero gradient entry leaves that pixel unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gradlab.attacks import ATTACKS
from gradlab.attacks.base import ATTACK_OPTIONS, Attack


@ATTACKS.register("fgsm", "fast gradient sign method, one step (Goodfellow et al. 2015)", options=ATTACK_OPTIONS,
                  paper="Goodfellow et al. 2015")
class FGSM(Attack):
    """One-step attack; see the module docstring. Options: :data:`~gradlab.attacks.base.ATTACK_OPTIONS`."""

    name = "fgsm"
    options = ATTACK_OPTIONS
    single_step = True
    trainable = True

    def perturb(self, x: Tensor, y: Tensor) -> Tensor:
        g, _ = self.grad(x)
        return torch.add(x, self.step_direction(g), alpha=self.eps)
