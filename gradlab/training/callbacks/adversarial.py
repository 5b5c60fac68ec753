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

    ``warmup`` (epochs, may be fractional): the budget of step ``t`` (1-based) is
    ``eps * min(1, t / (warmup * steps_per_epoch))``, a linear ramp from ~0 to ``eps``; without it
    a small model trained on PGD examples at MNIST's eps 0.3 from the first step often never
    leaves chance accuracy. The ramp is a function of the global step only, so a resumed run
    continues it exactly.
    """

    def __init__(self, attack: str, eps: float, ratio: float, warmup: float = 0.0):
        self.attack, self.eps, self.ratio, self.warmup = attack, eps, ratio, warmup

    def eps_at(self, step: int, steps_per_epoch: int) -> float:
        """The budget of global step ``step`` (1-based)."""
        ramp = self.warmup * steps_per_epoch
        return self.eps if ramp <= 0 else self.eps * min(1.0, step / ramp)

    def transform_loss(self, trainer, x: torch.Tensor, y: torch.Tensor, out: torch.Tensor,
                       loss: torch.Tensor, n_global: int) -> torch.Tensor:
        from gradlab.attacks import attack_batch

        eps = self.eps_at(trainer.step + 1, trainer.total_steps // trainer.cfg["epochs"])
        x_adv = attack_batch(self.attack, trainer.model, x, y, eps,
                             criterion=trainer.cfg.get("loss"))  # (B, *input_shape), detached
        adv_loss = trainer.batch_loss(trainer.net(x_adv), y, n_global)
        r = self.ratio
        return (1 - r) * loss + r * adv_loss


__all__ = ["AdversarialLoss"]
