"""The callback contract of the training loop.

The loop (:class:`gradlab.training.loop.Trainer`) owns data, the optimizer step, DDP and the
position in training; everything else (metric rows, TensorBoard, histograms, checkpoints, the NaN
stop, probes, adversarial batches) is a :class:`Callback` with its own schedule, in the manner of
Lightning's ``Callback`` and cockpit's quantities with ``every N steps`` schedules.

Hooks, in the order the loop calls them::

    on_fit_start(trainer)                      once per fit(), after a resume state is loaded
    per step:
        transform_loss(trainer, x, y, out, loss, n_global) -> loss   may replace or mix the loss
        on_loss(trainer, value)                before any backward or update; may raise StopTraining
        on_gradients(trainer, grad_norm)       after backward, before the update (after it for
                                               optimizers that take their own gradients); may raise StopTraining
        on_step_end(trainer, info)             after the update, with a StepInfo
    on_epoch_end(trainer, info)                with an EpochInfo; the position is already the next epoch's
    on_epoch_report(trainer, info)             once the epoch's checkpoint (if one was written) is on
                                               disk: what tells a reader the epoch is done (its rows, a line)
    summarize(trainer, metrics) -> metrics     the run's final metrics (summary.csv)
    on_fit_end(trainer, status, exact)         once, whatever the status

Only hooks a callback overrides are called. Callbacks run in list order, sorted (stably) by
``order``: :class:`~gradlab.training.callbacks.checkpoints.Checkpoints` has ``order = 100`` so
the state it saves includes what every other callback did at that step. A callback whose state
must survive ``--resume`` returns it from :meth:`Callback.state_dict` (plain Python values: it
goes through ``torch.load(weights_only=True)``) under its ``key``.

Under ``torchrun`` every rank runs every hook; only ``trainer.is_main`` writes to the run folder.
"""

from __future__ import annotations

import math

import torch


class StopTraining(Exception):
    """Raised by a hook to end the run at once with ``status`` (``diverged``, ``interrupted``,
    ``completed``) and a one-line ``message``; ``exact=False``: the position is not one to save
    (the last checkpoint is kept as it is). Under torchrun it must be raised on every rank at
    the same step (see :class:`~gradlab.training.callbacks.metrics.DivergenceStop`)."""

    def __init__(self, status: str, message: str = "", exact: bool = True):
        super().__init__(message or status)
        self.status, self.message, self.exact = status, message, exact


class Callback:
    """Base class: every hook does nothing. ``key`` names the callback's state in checkpoints."""

    order: int = 0

    @property
    def key(self) -> str:
        return type(self).__name__

    def on_fit_start(self, trainer) -> None:
        pass

    def transform_loss(self, trainer, x: torch.Tensor, y: torch.Tensor, out: torch.Tensor,
                       loss: torch.Tensor, n_global: int) -> torch.Tensor:
        """The loss to optimise on batch ``x`` (B, *input_shape), ``y`` (B,), given the clean
        logits ``out`` (B, classes) and the clean loss (this rank's share of the global-batch mean,
        see :meth:`Trainer.batch_loss`)."""
        return loss

    def on_loss(self, trainer, value: float) -> None:
        pass

    def on_gradients(self, trainer, grad_norm: float) -> None:
        """``grad_norm``: the global L2 norm of the step's gradients (float64 sum of squares)."""

    def on_step_end(self, trainer, info: "StepInfo") -> None:
        pass

    def on_epoch_end(self, trainer, info: "EpochInfo") -> None:
        """Measure and update state: the checkpoint (``order = 100``) saves it after this."""

    def on_epoch_report(self, trainer, info: "EpochInfo") -> None:
        """Report the epoch (``info.metrics`` holds what the epoch-end hooks measured): a run
        killed after this resumes from this epoch's end or later, never from before it."""

    def summarize(self, trainer, metrics: dict) -> dict:
        """The final metrics with this callback's added; return a new dict to put keys first
        (the runs table shows summary.csv's first columns)."""
        return metrics

    def on_fit_end(self, trainer, status: str, exact: bool) -> None:
        """``exact``: the trainer stopped at a step boundary (False after a second Ctrl-C, which
        stops mid-step: then nothing may be saved as a resumable position)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def overrides(cb: Callback, hook: str) -> bool:
    return getattr(type(cb), hook) is not getattr(Callback, hook)


def every(n: int, step: int) -> bool:
    """The schedule of a callback that runs every ``n`` steps (``n <= 0``: never): steps n, 2n, ...
    Counted on the global step, so a resumed run keeps the same schedule."""
    return n > 0 and step % n == 0


def gradient_norms(params) -> tuple[float, list]:
    """The global L2 norm of the parameters' gradients and the per-tensor norms (of those that
    have a gradient, in order): one fused norm call and one read-back, combined in float64."""
    grads = [p.grad for p in params if p.grad is not None]
    norms = torch.stack(torch._foreach_norm(grads)).tolist() if grads else []
    return math.hypot(*norms), norms


class StepInfo:
    """What one training step did, for ``on_step_end``.

    Attributes:
        step: the global step just finished (1-based); epoch: its epoch (0-based);
        batch: its index inside the epoch; loss: the mean loss over the global batch; lr: the
        learning rate the step used; x (B, *input_shape), y (B,): this rank's batch; out (B,
        classes): its logits (detached); n_global: examples in the global batch.
    """

    __slots__ = ("step", "epoch", "batch", "loss", "lr", "x", "y", "out", "n_global", "_params", "_norms")

    def __init__(self, step, epoch, batch, loss, lr, x, y, out, n_global, params, norms=None):
        self.step, self.epoch, self.batch, self.loss, self.lr = step, epoch, batch, loss, lr
        self.x, self.y, self.out, self.n_global = x, y, out, n_global
        self._params, self._norms = params, norms  # norms: what grad_norms() returns, if known already

    def grad_norms(self) -> tuple[float, list]:
        """Global L2 norm of this step's gradients, and the per-tensor norms (of the parameters
        that have a gradient, in order): taken before the update where the loop checks the
        gradients (then known already), else computed on the first call only, so that steps
        nobody logs pay nothing (:func:`gradient_norms`)."""
        if self._norms is None:
            self._norms = gradient_norms(self._params)
        return self._norms

    def grad_norm(self) -> float:
        return self.grad_norms()[0]


class EpochInfo:
    """An epoch that has just ended: its index, the global step at its end, the training loss
    and accuracy over its batches (all ranks together), and ``metrics``, where epoch-end hooks
    put what they measured for ``on_epoch_report`` (``test_loss``, ``test_acc``)."""

    __slots__ = ("epoch", "step", "train_loss", "train_acc", "metrics")

    def __init__(self, epoch: int, step: int, train_loss: float, train_acc: float):
        self.epoch, self.step, self.train_loss, self.train_acc = epoch, step, train_loss, train_acc
        self.metrics = {"train_loss": train_loss, "train_acc": train_acc}


def sort_callbacks(callbacks) -> list:
    return sorted(callbacks, key=lambda cb: cb.order)


__all__ = ["Callback", "StopTraining", "StepInfo", "EpochInfo", "every", "overrides", "sort_callbacks"]
