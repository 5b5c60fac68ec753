"""The gradient-statistics probe during training (``--probe gradstats:every=N``).

It is the generic :class:`~gradlab.training.callbacks.probes.ProbeCallback` (the probe's
whole-model statistics on the step's batch at the weights after the update), except that when
``stepquality`` runs too, both take what they need from one shared pass
(:mod:`gradlab.training.callbacks.after_update`) instead of one pass each.
"""

from __future__ import annotations

from gradlab.training.callbacks.base import StepInfo, every
from gradlab.training.callbacks.probes import ProbeCallback


class GradStats(ProbeCallback):
    """``--probe gradstats:every=N`` (see the module docstring)."""

    after_update_needs = ("moments",)

    def __init__(self, name: str, every: int, **options):
        super().__init__(name, every, **options)
        from gradlab.probes.gradstats import OPTIONS

        self.after_update = None  # an AfterUpdate shared with stepquality, when both run
        self.theta = OPTIONS.resolve(self.options, owner=f"probe {name}")["theta"]

    def on_step_end(self, trainer, info: StepInfo) -> None:
        if not (every(self.every, info.step) and trainer.is_main):
            return
        done = self.after_update.get(trainer, info) if self.after_update is not None else None
        if done is None:
            return super().on_step_end(trainer, info)
        from gradlab.probes.gradstats import STATS, statistics_from_moments

        layers = done[2]
        s, v, g2 = (sum(m[k] for m in layers.values()) for k in range(3))
        whole = statistics_from_moments(s, v, g2, self.theta)
        scalars = {k: float(whole[k]) for k in STATS}
        trainer.run.log_metrics(info.step, info.epoch, self.split, scalars)
        self.last = {k: scalars[k] for k in self.summary if k in scalars}


__all__ = ["GradStats"]
