"""One optimizer step of the training loop: the plain step and the closure step.

Three stepping conventions (:mod:`gradlab.optim`): a first-order optimizer gets
``loss.backward(); step()`` (through :class:`gradlab.training.precision.Precision`, which
scales fp16 losses); a ``needs_loss_closure`` optimizer (lbfgs, sr1, newton, sam, ...) gets
``step(closure)`` and takes its own gradients (loss-scaled under fp16,
:mod:`gradlab.optim.loss_scaling`; a step that overflows even unscaled is skipped); a ``needs_model`` one (kfac, natural-gd) is
bound to the model and the run's loss once (:func:`uses_closure`), then steps like the second.

:class:`StepMixin` is the part of :class:`gradlab.training.loop.Trainer` that runs one step; it
reads the trainer's ``net``, ``optimizer``, ``precision``, ``loss_fn``, ``dist``, ``params`` and
the hook lists ``fit`` sets (``_transforms``, ``_loss_checks``, ``_grad_checks``).

Each step runs inside :func:`gradlab.curvature.cost.counting`: the forward and backward passes
through the model and the curvature products it makes add to ``trainer.cost``, the run's
cumulative cost in gradient-equivalents (that module's docstring defines the units).
"""

from __future__ import annotations

import math

import torch

from gradlab.core.loss_scale import GradientOverflow
from gradlab.curvature.cost import counting
from gradlab.training.callbacks.base import gradient_norms


def uses_closure(optimizer, model, loss_fn) -> bool:
    """Whether ``optimizer`` steps with a loss closure; a model-bound one (K-FAC, natural
    gradient: :mod:`gradlab.optim.model_bound`) is bound to ``model`` and ``loss_fn`` here."""
    if getattr(optimizer, "needs_model", False):
        optimizer.bind(model, loss_fn)
    return bool(getattr(optimizer, "needs_loss_closure", False))


class StepMixin:
    """The optimizer step of :class:`~gradlab.training.loop.Trainer` (module docstring)."""

    def batch_loss(self, out, yb, n_global):
        """This rank's share of the mean loss over the global batch (sum * W / B, see sampler);
        on one process the batch is the global batch and this is the plain mean."""
        if self.dist.world_size == 1:
            return self.loss_fn(out, yb)
        return self.loss_fn(out, yb, reduction="sum") * (self.dist.world_size / n_global)

    def _loss(self, xb, yb, n_global, checks: bool = True):
        with self.precision.autocast():
            out = self.net(xb)
            loss = self.batch_loss(out, yb, n_global)
            for cb in self._transforms:
                loss = cb.transform_loss(self, xb, yb, out, loss, n_global)
        value = loss.item()
        for cb in self._loss_checks if checks else ():  # before any backward or update
            cb.on_loss(self, value)
        return loss, value, out.detach()

    def train_step(self, xb, yb, n_global) -> tuple[float, torch.Tensor]:
        """One optimizer step on batch ``(xb, yb)``: this rank's loss sum and its logits."""
        if not self.model.training:  # evaluation and probes restore the mode; this is a guard
            self.model.train()
        with counting(self.cost, len(xb)):  # the step's forward/backward passes and products
            return self._train_step(xb, yb, n_global)

    def _train_step(self, xb, yb, n_global) -> tuple[float, torch.Tensor]:
        optimizer = self.optimizer
        optimizer.zero_grad(set_to_none=True)
        self._step_norms = None  # set by _check_gradients when the gradients are checked before the update
        if self.closure_step:
            captured = []

            def closure():
                # a line search / trust region evaluates it again at trial weights: the step
                # reports (and the loss checks see) the FIRST evaluation, at the step's start
                loss, value, out = self._loss(xb, yb, n_global, checks=not captured)
                if not captured:
                    captured[:] = [value, out]
                return loss

            self._closure_step(optimizer, closure)
            loss_value, out = captured
            self._check_gradients()  # the optimizer took its own gradients (p.grad) inside step
        else:
            loss, loss_value, out = self._loss(xb, yb, n_global)
            self.precision.backward_and_step(loss, optimizer, self._check_gradients)
        # Correct predictions are counted in bulk (_count_correct): keep this step's logits.
        self._outputs.append((out, yb))
        return loss_value * n_global / self.dist.world_size, out

    def _closure_step(self, optimizer, closure) -> None:
        """``optimizer.step(closure)``; under fp16 a step whose gradient or curvature product
        overflowed even at loss scale 1 (:class:`GradientOverflow`) is skipped: the weights it
        started from are restored (a line search may have moved them) and the gradients left
        infinite, as the first-order fp16 path leaves them, so the checks see an overflow, not a
        divergence."""
        if self.precision.loss_scaler is None:
            optimizer.step(closure)
            return
        start = [p.detach().clone() for p in self.params]
        try:
            optimizer.step(closure)
        except GradientOverflow:
            with torch.no_grad():
                for p, p0 in zip(self.params, start):
                    p.copy_(p0)
                    p.grad = torch.full_like(p, math.inf)
            self.precision.skipped += 1

    def _check_gradients(self) -> None:
        if self._grad_checks:
            # kept for this step's StepInfo: the callbacks that log the norms do not compute them again
            self._step_norms = gradient_norms(self.params)
            if self.precision.scaling and not math.isfinite(self._step_norms[0]):
                return  # fp16 overflow: the scaler skips this step (not a divergence)
            for cb in self._grad_checks:
                cb.on_gradients(self, self._step_norms[0])


__all__ = ["StepMixin", "uses_closure"]
