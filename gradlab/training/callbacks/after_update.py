"""One pass at the weights after a step's update, shared by the instruments that measure there.

On a scheduled step ``gradstats`` takes its per-example moments, and ``stepquality`` the loss
and gradient for Cockpit's alpha, on the step's batch at the weights the update produced. Run
apart, that is two forward and two backward passes on the same batch at the same weights. When
both run on a step, :class:`AfterUpdate` makes it one: a forward pass with hooks on the
Linear/Conv2d layers and one backward to their outputs and to the parameters
(:func:`gradlab.curvature.per_example_linear.hooked_pass`), whose result the second
instrument of the step reuses. Its numbers are those of the separate passes: the pass is the
same computation (the model's forward, the same in train and eval mode for the models it is used
for; the step's loss as stepquality measures it), on a fork of the RNG state.

It is used only where the separate passes would see the same function, and otherwise each
instrument takes its own pass as before: on one process (under torchrun stepquality sums the
ranks' gradients, gradstats measures rank 0's batch), for models whose train and eval modes
compute the same (no dropout, batch or instance normalisation layer: modules whose forward reads
``self.training`` otherwise must be one of those), and where every trainable parameter belongs
to a Linear or a plain Conv2d (else gradstats needs vmap's per-example gradients).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

# torch.nn modules whose forward depends on the train/eval mode
_MODE_DEPENDENT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
                   nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.InstanceNorm1d,
                   nn.InstanceNorm2d, nn.InstanceNorm3d, nn.RNNBase, nn.MultiheadAttention,
                   nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def mode_free(model: nn.Module) -> bool:
    """Whether no submodule of ``model`` computes differently in train and eval mode."""
    return not any(isinstance(m, _MODE_DEPENDENT) for m in model.modules())


class AfterUpdate:
    """The shared pass of the module docstring, computed once per step on first request.

    Args:
        grads: whether a consumer needs the parameters' gradients (stepquality).
    """

    def __init__(self, grads: bool = False):
        self.grads = grads
        self._step: Optional[int] = None
        self._value = None
        self._usable: Optional[bool] = None

    def get(self, trainer, info) -> Optional[tuple]:
        """``(loss float, grads list or None, {layer: moments})`` on ``info``'s batch at the
        current weights, or None where the pass cannot be shared (module docstring): then the
        caller measures on its own."""
        if self._usable is None:
            self._usable = not trainer.dist.enabled and mode_free(trainer.model)
        if not self._usable:
            return None
        if self._step != info.step:
            self._step, self._value = info.step, self._compute(trainer, info)
        return self._value

    def _compute(self, trainer, info):
        from gradlab.curvature.per_example_linear import hooked_pass

        device = trainer.device
        # no mode switch: the model is mode-free, its train and eval forward passes are the same
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            done = hooked_pass(trainer.model, trainer.loss_fn, info.x, info.y, trainer.params if self.grads else None)
        if done is None:
            self._usable = False  # the model's layers do not change within a run
            return None
        loss, grads, moments = done
        return float(loss), grads, moments


def link_after_update(callbacks) -> None:
    """Give every callback that declares ``after_update_needs`` one shared :class:`AfterUpdate`
    when at least two of them run (``after_update`` stays None otherwise)."""
    users = [cb for cb in callbacks if getattr(cb, "after_update_needs", None)]
    if len(users) < 2:
        return
    shared = AfterUpdate(grads=any("grads" in cb.after_update_needs for cb in users))
    for cb in users:
        cb.after_update = shared


__all__ = ["AfterUpdate", "link_after_update", "mode_free"]
