"""Adversarial training as a batch transform of the loss."""

from __future__ import annotations

import torch

from gradlab.training.callbacks.base import Callback


class AdversarialLoss(Callback):
    """Mix the clean loss with the loss on adversarial inputs of the same batch::

        loss = (1 - ratio) * L(x, y) + ratio * L(attack(x, y), y)

    ``ratio = 0.5`` is Goodfellow et al. (2015, "Explaining and harnessing adversarial examples")
    with FGSM; ``ratio = 1`` trains on adversarial inputs only, as Madry et al. (2018, "Towards
    deep learning models resistant to adversarial attacks") with PGD. The attack is an L-inf
    ball of radius ``eps`` in pixel units (inputs in [0, 1]); it runs in eval mode on the bare
    model (the model's modes and ``requires_grad`` flags come back afterwards), and the
    adversarial forward pass goes through the trainer's network (DDP-wrapped or not) in
    training mode, as the clean one.
    """

    def __init__(self, attack: str, eps: float, ratio: float):
        self.attack, self.eps, self.ratio = attack, eps, ratio

    def transform_loss(self, trainer, x: torch.Tensor, y: torch.Tensor, out: torch.Tensor,
                       loss: torch.Tensor, n_global: int) -> torch.Tensor:
        from gradlab.attacks import attack_batch

        x_adv = attack_batch(self.attack, trainer.model, x, y, self.eps,
                             criterion=trainer.cfg.get("loss"))  # (B, *input_shape), detached
        adv_loss = trainer.batch_loss(trainer.net(x_adv), y, n_global)
        r = self.ratio
        return (1 - r) * loss + r * adv_loss


__all__ = ["AdversarialLoss"]
