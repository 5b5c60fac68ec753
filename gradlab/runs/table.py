"""The combined table of runs behind ``gradlab runs``, and the columns worth showing per command."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from gradlab.runs.records import (REBUILT_FROM, RunFolderError, check_metrics, list_runs, read_config, read_summary,
                                  require_config_keys)

ID_COLUMNS = ["run_id", "command", "model", "dataset", "opt", "seed", "status"]
#: The headline columns of each command's runs (after ``run_id``): what a glance at 80 columns
#: should tell. A command not named here (a plug-in probe) shows its status and first numbers.
HEADLINES = {
    "train": ("model", "dataset", "opt", "status", "test_acc"),
    "attack": ("attack", "max_eps", "clean_acc", "robust_acc", "status"),
    "probe-hessian": ("model", "lambda_max", "trace", "classification", "status"),
    "probe-gradnorm": ("model", "verdict", "signal_rate", "status"),
    "probe-jacobian": ("model", "verdict", "gain_rate", "io_condition_number", "status"),
    "probe-landscape": ("model", "centre_loss", "centre_acc", "lambda_max", "status"),
    "simplex": ("vertices", "single_acc", "ensemble_acc", "status"),
    "connect": ("curve", "barrier", "line_barrier", "status"),
    "optimize": ("fn", "best_optimizer", "best_final_loss", "status"),
}
_OTHER_NUMBERS = 3  # numeric columns shown for a command without headlines


def runs_table(runs_dir: str | Path):
    """One row per run folder: identity from config.yaml, results from summary.csv.

    A folder with no summary.csv is ``incomplete`` (still running, or killed). One whose
    config.yaml, summary.csv, metrics.csv or checkpoints/last.pt is damaged is ``corrupt``, with
    the damaged file and what is wrong in the ``problem`` column; the other runs are listed as
    usual. Numbers in summary.csv come back as numbers.
    """
    import pandas as pd

    rows = []
    for path in list_runs(runs_dir):
        row = {"run_id": path.name}
        try:
            doc = read_config(path)
            cfg = doc["config"]
            row.update({"command": doc["command"], **{k: cfg.get(k) for k in ("model", "dataset", "opt", "seed")}})
            require_config_keys(path, cfg, REBUILT_FROM.get(doc["command"], ()))
            summary = read_summary(path)
            check_metrics(path)
            check_checkpoint_file(path / "checkpoints" / "last.pt")
        except RunFolderError as e:
            row.update(status="corrupt", problem=str(e))
            rows.append(row)
            continue
        if summary is None:
            row["status"] = "incomplete"
        else:
            row.update({k: _value(v) for k, v in summary.items() if k not in ("run_id", "command")})
        rows.append(row)
    df = pd.DataFrame(rows)
    if df.empty:
        return pd.DataFrame(columns=ID_COLUMNS)
    first = [c for c in ID_COLUMNS if c in df.columns]
    return df[first + [c for c in df.columns if c not in first]]


def check_checkpoint_file(path: Path) -> None:
    """RunFolderError if the checkpoint at ``path`` (when there is one) is empty or is not a
    whole ``torch.save`` file (a zip archive with its closing directory, so a cut file shows),
    judged without torch; whether its keys fit is for the command that loads it."""
    import zipfile

    if not path.is_file():
        return
    if path.stat().st_size == 0:
        raise RunFolderError(path, "the file is empty (0 bytes)", prefix="cannot read checkpoint")
    if not zipfile.is_zipfile(path):
        raise RunFolderError(path, "not a torch.save file, or truncated", prefix="cannot read checkpoint")


def _value(text: str):
    """A summary.csv cell as Python: empty -> None, True/False, int, float, or the text itself."""
    if text == "":
        return None
    if text in ("True", "False"):
        return text == "True"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def columns_for(df, command: Optional[str], chosen: Optional[Sequence[str]] = None) -> list[str]:
    """The columns to show for runs of ``command``: ``run_id``, then ``chosen`` (``--columns``)
    or the command's :data:`HEADLINES`, keeping those the table has; ``status`` always."""
    if chosen:
        wanted = list(chosen)
    elif command in HEADLINES:
        wanted = list(HEADLINES[command])
    else:
        numeric = [c for c in df.columns if c not in ID_COLUMNS and df[c].dtype.kind in "fiu"]
        wanted = ["model", "status"] + numeric[:_OTHER_NUMBERS]
    cols = ["run_id"] + [c for c in wanted if c in df.columns and c != "run_id"]
    if "status" not in cols:
        cols.append("status")
    return [c for c in cols if c == "status" or c == "run_id" or df[c].notna().any()]
