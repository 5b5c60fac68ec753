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
LAUNCHER_KEY = "launcher"  # a top-level mapping: where the runs execute, not an option of a command
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
    """Parse an experiment file into stages; mistakes name the file and the stage. The file's
    ``launcher:`` mapping says where the runs execute (:func:`experiment_launcher`)."""
    doc = {k: v for k, v in load_yaml(path).items() if k != LAUNCHER_KEY}
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


def experiment_launcher(path: str | Path, flags: dict | None = None) -> dict:
    """Where the runs of an experiment execute: the file's ``launcher:`` mapping (a name, or
    ``{launcher: slurm, partition: gpu, time: 120, gpus_per_job: 1, ...}``) under the flags
    typed (``None``: not typed), checked against
    :data:`gradlab.training.launch.LAUNCHER_OPTIONS`.

        launcher: {launcher: slurm, partition: gpu, time: 30}
    """
    from gradlab.training.launch import LAUNCHER_OPTIONS

    given = load_yaml(path).get(LAUNCHER_KEY) or {}
    if isinstance(given, str):
        given = {"launcher": given}
    if not isinstance(given, dict):
        raise GradlabError(f"{path}: 'launcher' must be a launcher name or a mapping of its options")
    given = normalise_keys(given)
    if "name" in given and "launcher" not in given:  # `launcher: {name: slurm}` reads naturally too
        given["launcher"] = given.pop("name")
    try:
        resolved = LAUNCHER_OPTIONS.resolve(given, owner="launcher")
    except GradlabError as e:
        raise GradlabError(f"{path}: {e}") from None
    typed = {k: v for k, v in (flags or {}).items() if v is not None}
    return LAUNCHER_OPTIONS.resolve({**given, **typed}, owner="launcher")


def runs_per_stage(stages: list[Stage]) -> list[int]:
    """How many runs each stage makes if every run before it completes: a ``@previous`` stage
    makes its combinations once for every run of the stage before it."""
    counts: list[int] = []
    for stage in stages:
        n = len(stage.combinations())
        counts.append(n * counts[-1] if stage.base.get("run") == PREVIOUS and counts else n)
    return counts


def eta_seconds(elapsed: float, ran: int, remaining: int) -> float | None:
    """Time left for ``remaining`` runs at the mean pace of the ``ran`` runs made so far in
    ``elapsed`` seconds (runs skipped by ``--resume`` do not count); None before the first."""
    if ran <= 0:
        return None
    return elapsed / ran * remaining


# -- --resume: which combinations have a completed run already ---------------------------------
# Keys that say where a run lives or what it is called, not what it computes.
NOT_COMPARED = ("runs_dir", "name", "data_dir", "device", "logger", "mlflow_uri")
# Keys holding a run folder: compared as resolved paths.
PATH_KEYS = ("run", "run_a", "run_b", "source_run")


def _plain(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, Path):
        return str(v)
    return v


def config_matches(want: dict, stored: dict) -> bool:
    """Whether a run's stored ``config.yaml`` config holds every value of the resolved ``want``
    (keys of :data:`NOT_COMPARED` and values still ``None``, decided by the command, aside)."""
    for key, value in want.items():
        if key in NOT_COMPARED or value is None:
            continue
        if key not in stored:
            return False
        have = stored[key]
        if key in PATH_KEYS and isinstance(value, str) and isinstance(have, str):
            if Path(value).resolve() != Path(have).resolve():
                return False
        elif _plain(value) != _plain(have):
            return False
    return True


def run_status(path: Path) -> str | None:
    """The ``status`` of a run's ``summary.csv``; None when it has none or it is unreadable."""
    import csv

    try:
        with open(Path(path) / "summary.csv", newline="") as f:
            row = next(csv.DictReader(f), None)
    except (OSError, UnicodeDecodeError, csv.Error):
        return None
    return (row or {}).get("status")


class EarlierRuns:
    """The runs of a runs folder that ``gradlab run --resume`` can use: completed runs, and
    interrupted train runs with a checkpoint (continued with ``gradlab train --resume``).
    :meth:`take` finds one whose command and stored config match a combination, a completed
    one first, and never hands the same run out twice (a sweep that repeats a combination runs
    it again)."""

    def __init__(self):
        self._by_dir: dict[Path, list[tuple[Path, str, str, dict]]] = {}
        self._taken: set[Path] = set()

    def _runs(self, runs_dir: str | Path) -> list:
        key = Path(runs_dir).resolve()
        if key not in self._by_dir:
            from gradlab.runs.records import has_checkpoint, list_runs, read_config

            found = []
            for path in list_runs(runs_dir):
                status = run_status(path)
                if status not in ("completed", "interrupted"):
                    continue
                try:
                    doc = read_config(path)
                except GradlabError:  # a damaged folder is not a run to reuse
                    continue
                command = str(doc.get("command"))
                if status == "interrupted" and (command != "train" or not has_checkpoint(path)):
                    continue  # only a train run continues where it stopped
                if isinstance(doc.get("config"), dict):
                    found.append((path, status, command, doc["config"]))
            found.sort(key=lambda r: r[1] != "completed")  # stable: oldest first within each
            self._by_dir[key] = found
        return self._by_dir[key]

    def take(self, command: str, resolved: dict) -> tuple[Path, str] | None:
        """``(run folder, "completed" or "interrupted")`` for a combination, or None."""
        for path, status, cmd, stored in self._runs(resolved.get("runs_dir") or "runs"):
            if cmd == command and path not in self._taken and config_matches(resolved, stored):
                self._taken.add(path)
                return path, status
        return None


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
