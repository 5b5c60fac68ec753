"""Learning-rate schedules, stepped once per optimizer step.

Each is a closed-form factor of the step index wrapped in ``LambdaLR``, so a scheduler rebuilt with
the same ``total_steps`` and restored from ``state_dict()`` continues bit-identically (no recursive
update accumulating rounding, no callable pickled into the checkpoint):

* ``constant``: factor 1.
* ``cosine``: ``0.5 * (1 + cos(pi * min(t, T) / T))``, cosine annealing to 0 over T = total_steps
  (Loshchilov & Hutter, SGDR, 2017, without restarts).
* ``step``: 0.1 after 50% and again (0.01) after 75% of the total steps (the ResNet recipe, He et
  al. 2016).

The schedule is an option of the train command (``gradlab.training.options.TRAIN_OPTIONS``), not
of each optimizer: it wraps any optimizer's parameter groups and needs the run's total number of
steps.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from gradlab.core.errors import GradlabError

SCHEDULES = ("constant", "cosine", "step")


def schedule_factor(schedule: str, total_steps: int):
    """The multiplier of the base learning rate as a function of the step index t = 0, 1, ..."""
    if schedule == "constant":
        return lambda t: 1.0
    if schedule == "cosine":
        return lambda t: 0.5 * (1.0 + math.cos(math.pi * min(t, total_steps) / total_steps))
    if schedule == "step":
        first, second = total_steps // 2, (3 * total_steps) // 4
        return lambda t: 0.1 ** ((t >= first) + (t >= second))
    raise GradlabError(f"unknown schedule {schedule!r}; choose from: {', '.join(SCHEDULES)}")


def build_scheduler(schedule: str, optimizer: Optimizer, total_steps: int) -> LRScheduler:
    """A scheduler for ``optimizer``; call its ``step()`` after every ``optimizer.step()``."""
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise GradlabError(f"invalid total_steps: {total_steps!r} (must be an integer >= 1)")
    return LambdaLR(optimizer, schedule_factor(schedule, total_steps))
