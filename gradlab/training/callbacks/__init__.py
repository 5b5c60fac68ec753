"""Training callbacks: everything the training loop does besides data, step, DDP and resume.

See :mod:`gradlab.training.callbacks.base` for the hooks. :func:`default_callbacks` is what
``gradlab train`` runs for a config; ``Trainer(cfg, callbacks=[...])`` adds more.
"""

from __future__ import annotations

from gradlab.training.callbacks.adversarial import AdversarialLoss
from gradlab.training.callbacks.base import Callback, EpochInfo, StepInfo, StopTraining, every
from gradlab.training.callbacks.checkpoints import Checkpoints
from gradlab.training.callbacks.dashboard import Dashboard
from gradlab.training.callbacks.metrics import (
    DivergenceStop,
    EpochEvaluation,
    GradHistograms,
    OptimizerEvents,
    Progress,
    StepMetrics,
    evaluate,
)
from gradlab.training.callbacks.probes import ProbeCallback, parse_probe_spec, probe_callbacks, training_probe


def default_callbacks(cfg: dict) -> list[Callback]:
    """The callbacks of a ``gradlab train`` config, in the order they run at each step."""
    cbs: list[Callback] = [DivergenceStop(cfg.get("max_loss"), loss=cfg.get("loss"))]
    if cfg.get("adv") is not None:
        cbs.append(AdversarialLoss(cfg["adv"], cfg["adv_eps"], cfg["adv_ratio"], cfg.get("adv_warmup") or 0.0))
    probes = probe_callbacks(cfg)
    cbs += [StepMetrics(cfg["log_every_steps"]), GradHistograms(cfg["log_every"]), *probes,
            OptimizerEvents(), EpochEvaluation(),
            Checkpoints(cfg["checkpoint_seconds"], cfg["keep_checkpoints"])]
    if probes:  # the instruments' dashboard and overview figure (callbacks/dashboard.py)
        cbs.append(Dashboard())
    return cbs


__all__ = ["Callback", "StepInfo", "EpochInfo", "StopTraining", "every", "default_callbacks", "AdversarialLoss",
           "Checkpoints", "Dashboard", "DivergenceStop", "EpochEvaluation", "GradHistograms", "OptimizerEvents",
           "Progress", "StepMetrics", "evaluate", "ProbeCallback", "parse_probe_spec", "probe_callbacks",
           "training_probe"]
