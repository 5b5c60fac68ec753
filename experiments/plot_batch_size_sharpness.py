"""The figure of experiments/batch_size_sharpness.yaml: lambda_max and the trace of the
full-training-set Hessian at the end of training against the batch size (each run, and the mean
with min-max bars over the seeds), the mean final training loss written beside each point and
2/lr drawn for lambda_max. (Each trace's own standard error, in the CSVs, is far below the bars.)

    python experiments/plot_batch_size_sharpness.py RUNS_DIR OUT.png
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402


def load(runs_dir: Path) -> pd.DataFrame:
    """One row per probed train run: batch_size, lr, epochs, steps, train_loss (the last epoch's
    mean, from the train run) and lambda_max, trace, trace_stderr, loss (the full-split loss at
    the probed weights, from the probe run)."""
    train = {}
    for cfg_path in sorted(runs_dir.glob("*/config.yaml")):
        doc = yaml.safe_load(cfg_path.read_text())
        if doc.get("command") == "train":
            cfg, summary = doc["config"], pd.read_csv(cfg_path.parent / "summary.csv").iloc[0]
            train[doc["run_id"]] = {"batch_size": int(cfg["batch_size"]), "lr": float(cfg["lr"]),
                                    "epochs": int(summary["epochs"]), "steps": int(summary["steps"]),
                                    "train_loss": float(summary["train_loss"])}
    rows = []
    for summary_path in sorted(runs_dir.glob("*/summary.csv")):
        s = pd.read_csv(summary_path).iloc[0]
        if s["command"] == "probe-hessian" and s["source_run"] in train:
            rows.append({**train[s["source_run"]], "lambda_max": s["lambda_max"], "trace": s["trace"],
                         "trace_stderr": s["trace_stderr"], "loss": s["loss"]})
    return pd.DataFrame(rows).sort_values("batch_size", ignore_index=True)


def main(runs_dir: str, out: str) -> None:
    runs = load(Path(runs_dir))
    if runs.empty:
        raise SystemExit(f"no probed train runs under {runs_dir}")
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10.5, 4.2))
    by = runs.groupby("batch_size")
    n = by.size().max()
    for ax, key in ((a1, "lambda_max"), (a2, "trace")):
        mean, low, high = by[key].mean(), by[key].min(), by[key].max()
        ax.plot(runs["batch_size"], runs[key], ".", color="grey", alpha=0.6, label="one run")
        ax.errorbar(mean.index, mean.values, yerr=[mean - low, high - mean], fmt="o-", capsize=3,
                    label=f"mean (bars: min-max over {n} seed{'s' if n > 1 else ''})")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size (SGD, same lr)")
    for lr in sorted(runs["lr"].unique()):
        a1.axhline(2 / lr, ls="--", color="grey", lw=1, label=f"2/lr (lr {lr:g})")
    loss, lam = by["loss"].mean(), by["lambda_max"].mean()
    for b in loss.index:
        a1.annotate(f"loss {loss[b]:.3f}", (b, lam[b]), textcoords="offset points", xytext=(5, -13), fontsize=8)
    a1.set_ylabel("lambda_max (whole training set)")
    a1.set_title("sharpness at the end of training (final loss beside)")
    a2.set_ylabel("trace of the Hessian")
    a2.set_title("trace at the end of training")
    a1.legend(fontsize=8)
    a2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main(*sys.argv[1:3])
