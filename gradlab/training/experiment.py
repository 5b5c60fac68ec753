"""Experiment files for ``gradlab run``: a base configuration plus an optional sweep grid.

One stage::

    command: train              # any run-making command: train, probe-jacobian, attack, ...
    args: []                    # positional arguments, e.g. [fgsm] for `attack`
    dataset: digits             # the command's options, the same keys as its flags / --config
    sweep:                      # optional: every combination becomes its own run
      opt: [sgd, adam]
      seed: [0, 1, 2]

Several stages run in order under ``steps:``; a stage whose ``run`` is ``"@previous"`` runs once
for every run the previous stage made (e.g. attack every model that stage 1 trained).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gradlab.core.config import load_yaml, normalise_keys
from gradlab.core.errors import GradlabError

PREVIOUS = "@previous"
RESERVED = {"command", "args", "sweep"}  # a stage's own `steps: 25` is the command's --steps


@dataclass
class Stage:
    command: list[str]  # e.g. ["train"] or ["probe", "jacobian"]
    args: list[str]
    base: dict
    sweep: dict = field(default_factory=dict)

    def combinations(self) -> list[dict]:
        """Base config updated with every point of the sweep grid (in file order)."""
        if not self.sweep:
            return [dict(self.base)]
        keys = list(self.sweep)
        return [{**self.base, **dict(zip(keys, values))} for values in itertools.product(*self.sweep.values())]

    def label(self, combo: dict) -> str:
        """A run-name suffix from the swept values: ``opt=sgd_seed=1`` (no commas: TensorBoard's
        --logdir_spec splits on them)."""
        parts = [f"{k}={_short(combo[k])}" for k in self.sweep]
        return "_".join(parts)[:80]


def _short(v: Any) -> str:
    s = str(v).lower() if isinstance(v, bool) else str(v)
    return "".join(c if c.isalnum() or c in "._-+" else "_" for c in s)


def _parse_command(value: Any, where: str) -> list[str]:
    if not isinstance(value, str) or not value.strip():
        raise GradlabError(f"{where}: 'command' must name a gradlab command, e.g. train or probe-jacobian")
    words = value.replace("-", " ", 1).split() if value.startswith("probe") else value.split()
    return words


def _parse_stage(doc: dict, where: str) -> Stage:
    if "command" not in doc:
        raise GradlabError(f"{where}: missing 'command' (e.g. command: train)")
    sweep = doc.get("sweep") or {}
    if not isinstance(sweep, dict):
        raise GradlabError(f"{where}: 'sweep' must map option names to lists of values")
    for k, v in sweep.items():
        if not isinstance(v, list) or not v:
            raise GradlabError(f"{where}: sweep value for {k!r} must be a non-empty list")
    args = doc.get("args") or []
    if not isinstance(args, list):
        args = [args]
    base = normalise_keys({k: v for k, v in doc.items() if k not in RESERVED})
    return Stage(_parse_command(doc["command"], where), [str(a) for a in args], base, normalise_keys(sweep))


def load_experiment(path: str | Path) -> list[Stage]:
    """Parse an experiment file into stages; mistakes name the file and the stage."""
    doc = load_yaml(path)
    if isinstance(doc.get("steps"), list):  # a list of stages (a number is a command option)
        steps = doc["steps"]
        if not steps:
            raise GradlabError(f"{path}: 'steps' must be a non-empty list of stages")
        shared = {k: v for k, v in doc.items() if k != "steps"}
        stages = []
        for i, s in enumerate(steps, 1):
            if not isinstance(s, dict):
                raise GradlabError(f"{path}: step {i} must be a mapping")
            stages.append(_parse_stage({**shared, **s}, f"{path} step {i}"))
    else:
        stages = [_parse_stage(doc, str(path))]
    if stages[0].base.get("run") == PREVIOUS:
        raise GradlabError(f"{path}: the first stage cannot use run: {PREVIOUS}")
    return stages


# Final metrics of a train run worth a column in TensorBoard's HParams table: summary.csv column ->
# the run's scalar tag.
HPARAM_METRICS = {"test_acc": "test/acc", "test_loss": "test/loss", "train_loss": "train/loss"}
# Config keys that say where a run lives, not what it is.
NOT_HPARAMS = ("runs_dir", "name", "data_dir", "device")


def hparams_of(cfg: dict, metrics: dict) -> tuple[dict, dict]:
    """``(hparams, metrics)`` for the HParams dashboard from a run's resolved config (every
    declared option of the command and of the plug-ins it chose) and its final metrics."""
    hp = {k: v for k, v in cfg.items() if k not in NOT_HPARAMS}
    final = {tag: metrics[col] for col, tag in HPARAM_METRICS.items()
             if isinstance(metrics.get(col), (int, float)) and metrics[col] == metrics[col]}
    return hp, final


def log_hparams(run_path: str | Path, hparams: dict, metrics: dict) -> None:
    """Write TensorBoard hparams into a finished run's own folder, so sweeps compare in the
    HParams dashboard. ``metrics`` maps scalar tags already in the run (``test/acc``) to values."""
    from torch.utils.tensorboard import SummaryWriter

    from gradlab.runs.logging import hparams_summaries

    w = SummaryWriter(log_dir=str(run_path))
    for s in hparams_summaries(hparams, metrics):
        w.file_writer.add_summary(s)
    w.close()
