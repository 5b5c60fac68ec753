"""The step-quality probe during training: it must see the update, so it is a callback.

On a scheduled step (``every(N, step)``) it copies the weights at the step's first loss
evaluation (``on_loss``: before any backward or update, also inside a closure optimizer's first
closure call) and the gradient the update will use (``on_gradients``, for optimizers that take
``p.grad``), then after the update (``on_step_end``) takes one forward and backward pass on the
same batch at the new weights (shared with gradstats when both run on the step,
:mod:`gradlab.training.callbacks.after_update`) and logs :func:`gradlab.probes.stepquality.step_quality`
(:func:`~gradlab.probes.stepquality.step_alpha` and :func:`~gradlab.probes.stepquality.ratios`
from one flattening of each list) as rows of the ``step_quality`` split. Other steps
cost two integer comparisons. The initial weights (for the distance) are copied at the first
step of the run and kept in the checkpoint, so a resumed run measures from the same origin.

For closure optimizers (L-BFGS and friends), and where a callback replaces the loss (``--adv``),
the loss and gradient before the update are measured at the saved weights after it (one more
pass). The after-update pass runs on a fork
of the RNG state with the model's buffers (BatchNorm statistics) restored, so training is
unchanged by it. With ``--adv`` the step quality is that of the clean loss of the batch.
Under torchrun every rank measures its share and the results are summed; rank 0 logs.
"""

from __future__ import annotations

import torch

from gradlab.training.callbacks.base import StepInfo, every, overrides
from gradlab.training.callbacks.probes import ProbeCallback


class StepQuality(ProbeCallback):
    """``--probe stepquality:every=N`` (see the module docstring)."""

    def __init__(self, name: str, every: int, **options):
        super().__init__(name, every, **options)
        self._init = None  # the weights at the start of the run
        self._w0 = self._g0 = None
        self.after_update = None  # an AfterUpdate shared with gradstats, when both run

    after_update_needs = ("grads",)

    def on_fit_start(self, trainer) -> None:
        if self._init is None and trainer.step == 0:
            self._init = [p.detach().clone() for p in trainer.params]
        elif self._init is not None:
            self._init = [t.to(p.device, p.dtype) for t, p in zip(self._init, trainer.params)]

    def on_loss(self, trainer, value: float) -> None:
        if self._w0 is None and every(self.every, trainer.step + 1):  # the first closure call only
            self._w0 = [p.detach().clone() for p in trainer.params]
            self._g0 = None

    def on_gradients(self, trainer, grad_norm: float) -> None:
        if self._w0 is not None and self._g0 is None and not trainer.closure_step:
            self._g0 = [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in trainer.params]

    def on_step_end(self, trainer, info: StepInfo) -> None:
        if self._w0 is None:
            return
        from gradlab.probes.stepquality import step_quality

        w0, g0, self._w0, self._g0 = self._w0, self._g0, None, None
        params = trainer.params
        w1 = [p.detach().clone() for p in params]
        f0 = info.loss
        if g0 is None or self._mixed_loss(trainer):  # measure the clean loss at the saved weights
            f0, g0 = self._at(trainer, info, w0)
        shared = self.after_update.get(trainer, info) if self.after_update is not None else None
        f1, g1 = shared[:2] if shared is not None else self._at(trainer, info, None)
        names = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
        scalars = step_quality(names, w0, w1, f0, g0, f1, g1, self._init, layers=self.options.get("layers", True))
        scalars["loss_after"] = f1
        if trainer.is_main:
            trainer.run.log_metrics(info.step, info.epoch, self.split, scalars)
        self.last = {k: float(scalars[k]) for k in self.summary if k in scalars}

    @staticmethod
    def _mixed_loss(trainer) -> bool:
        """Whether a callback replaced the step's loss (``--adv``): then ``info.loss`` and the
        step's gradient are not those of the clean loss measured after the update."""
        return any(overrides(cb, "transform_loss") for cb in trainer.callbacks)

    def _at(self, trainer, info: StepInfo, weights) -> tuple[float, list]:
        """The global-batch mean loss and gradient on the step's batch at ``weights`` (None: the
        current ones), leaving weights, buffers, ``.grad`` and the RNG state as they were."""
        model, params = trainer.model, trainer.params
        device = trainer.device
        buffers = [b.detach().clone() for b in model.buffers()]
        current = [p.detach().clone() for p in params] if weights is not None else None
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                if weights is not None:
                    with torch.no_grad():
                        for p, w in zip(params, weights):
                            p.copy_(w)
                loss = trainer.batch_loss(model(info.x), info.y, info.n_global)
                grads = torch.autograd.grad(loss, params, allow_unused=True)
        finally:
            with torch.no_grad():
                for b, saved in zip(model.buffers(), buffers):
                    b.copy_(saved)
                if current is not None:
                    for p, w in zip(params, current):
                        p.copy_(w)
        grads = [torch.zeros_like(p) if g is None else g.detach() for g, p in zip(grads, params)]
        value = loss.detach()
        if trainer.dist.enabled:
            from gradlab.core.distributed import reduce_over_ranks

            value, *grads = reduce_over_ranks([value.reshape(1), *grads], mean=True)
        return float(value), grads

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self._init is not None:
            state["init"] = [t.detach().cpu().clone() for t in self._init]
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if "init" in state:
            self._init = list(state["init"])  # moved to the parameters' device in on_fit_start


__all__ = ["StepQuality"]
