"""The combined table of runs behind ``gradlab runs``."""

from __future__ import annotations

from pathlib import Path

from gradlab.runs.records import list_runs, read_config

ID_COLUMNS = ["run_id", "command", "model", "dataset", "opt", "seed", "status"]
KEY_COLUMNS = ID_COLUMNS + [
    "test_acc", "test_loss", "train_acc", "steps_to_95", "lambda_max", "trace", "epochs", "seconds",
    "verdict", "classification", "clean_acc", "robust_acc", "eps",
]


def runs_table(runs_dir: str | Path):
    """One row per run folder: identity from config.yaml, results from summary.csv.

    A folder with no summary.csv is shown as ``incomplete`` (still running, or killed).
    """
    import pandas as pd

    rows = []
    for path in list_runs(runs_dir):
        try:
            doc = read_config(path)
        except Exception:  # a corrupt config must not hide every other run
            rows.append({"run_id": path.name, "status": "corrupt"})
            continue
        cfg = doc.get("config", {}) or {}
        row = {"run_id": path.name, "command": doc.get("command")}
        row.update({k: cfg.get(k) for k in ("model", "dataset", "opt", "seed")})
        summary = path / "summary.csv"
        if summary.is_file():
            try:
                s = pd.read_csv(summary)
                if len(s):
                    rec = s.iloc[0].to_dict()
                    rec.pop("run_id", None)
                    rec.pop("command", None)
                    row.update(rec)
            except (pd.errors.ParserError, pd.errors.EmptyDataError):
                row["status"] = "corrupt"
        else:
            row["status"] = "incomplete"
        rows.append(row)
    df = pd.DataFrame(rows)
    if df.empty:
        return pd.DataFrame(columns=ID_COLUMNS)
    first = [c for c in ID_COLUMNS if c in df.columns]
    return df[first + [c for c in df.columns if c not in first]]
