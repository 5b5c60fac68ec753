"""The figure of experiments/edge_of_stability.yaml: per loss function (columns), the sharpness
lambda_max against the step with the 2/lr line of each learning rate (top) and the full-batch
training loss (bottom).

    python experiments/plot_edge_of_stability.py RUNS_DIR OUT.png
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402


def load(runs_dir: Path) -> list[dict]:
    """One dict per train run under ``runs_dir``: its loss name, lr, and the curvature and
    per-step loss series (DataFrames indexed by step)."""
    runs = []
    for cfg_path in sorted(runs_dir.glob("*/config.yaml")):
        doc = yaml.safe_load(cfg_path.read_text())
        metrics = cfg_path.parent / "metrics.csv"
        if doc.get("command") != "train" or not metrics.exists():
            continue
        m = pd.read_csv(metrics)
        curv = m[(m["split"] == "curvature") & (m["metric"] == "lambda_max")]
        loss = m[(m["split"] == "train-step") & (m["metric"] == "loss")]
        if curv.empty:
            continue
        cfg = doc["config"]
        runs.append({"loss": cfg["loss"], "lr": float(cfg["lr"]),
                     "sharpness": curv.set_index("step")["value"], "train_loss": loss.set_index("step")["value"]})
    return runs


def main(runs_dir: str, out: str) -> None:
    runs = load(Path(runs_dir))
    if not runs:
        raise SystemExit(f"no train runs with a hessian probe under {runs_dir}")
    losses = sorted({r["loss"] for r in runs}, key=lambda s: s != "mse")  # mse first, as in Cohen et al.
    fig, axes = plt.subplots(2, len(losses), figsize=(5.5 * len(losses), 7), squeeze=False, sharex="col")
    for col, name in enumerate(losses):
        top, bottom = axes[0][col], axes[1][col]
        for r in sorted((r for r in runs if r["loss"] == name), key=lambda r: r["lr"]):
            line = top.plot(r["sharpness"].index, r["sharpness"].values, label=f"lr {r['lr']:g}")[0]
            top.axhline(2 / r["lr"], color=line.get_color(), ls="--", lw=1)
            bottom.plot(r["train_loss"].index, r["train_loss"].values, color=line.get_color(), lw=0.8,
                        label=f"lr {r['lr']:g}")
        top.set_title(f"{name}: sharpness (dashed: 2/lr)")
        top.set_ylabel("lambda_max of the full-batch Hessian")
        top.legend(fontsize=8)
        bottom.set_yscale("log")
        bottom.set_xlabel("step (full-batch gradient descent)")
        bottom.set_ylabel("training loss")
        bottom.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main(*sys.argv[1:3])
