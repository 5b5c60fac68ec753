"""The figure of experiments/second_order.yaml: test accuracy against training wall time (top)
and against gradient-equivalents (bottom), one column per model, one line per optimizer; and a
table of each run's final numbers on stdout.

    python experiments/plot_second_order.py RUNS_DIR OUT.png

Wall time is measured from the run folder's creation (config.yaml's ``created``, to the second;
the model and data exist by then, so it is training time) to each test evaluation's
``wall_time``; gradient-equivalents are the ``grad_equivalents`` column of the same rows.
"""

from __future__ import annotations

import datetime as dt
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402

FIRST_ORDER = ("sgd", "momentum", "adam")


def load(runs_dir: Path) -> pd.DataFrame:
    """One row per test evaluation of every train run: model, opt, step, seconds, grad_eq, acc,
    budget (the run's max_seconds, drawn as a dotted line). A run that diverged before its first
    evaluation has no row."""
    frames = []
    for cfg_path in sorted(Path(runs_dir).glob("*/config.yaml")):
        doc = yaml.safe_load(cfg_path.read_text())
        metrics = cfg_path.parent / "metrics.csv"
        if doc.get("command") != "train" or not metrics.is_file():
            continue
        cfg, start = doc["config"], dt.datetime.fromisoformat(doc["created"]).timestamp()
        budget = cfg.get("max_seconds")
        m = pd.read_csv(metrics)
        acc = m[(m["split"] == "test") & (m["metric"] == "acc")]
        frames.append(pd.DataFrame({"model": cfg["model"], "opt": cfg["opt"], "step": acc["step"].values,
                                    "seconds": acc["wall_time"].values - start,
                                    "grad_eq": acc["grad_equivalents"].values, "acc": acc["value"].values,
                                    "budget": float("nan") if budget is None else budget}))
    if not frames:
        raise SystemExit(f"no train runs with metrics.csv under {runs_dir}")
    return pd.concat(frames, ignore_index=True)


def final_table(runs: pd.DataFrame) -> pd.DataFrame:
    last = runs.sort_values("step").groupby(["model", "opt"], sort=False).tail(1)
    return last.sort_values(["model", "acc"], ascending=[True, False])[["model", "opt", "step", "seconds",
                                                                       "grad_eq", "acc"]]


def main(runs_dir: str, out: str) -> None:
    runs = load(Path(runs_dir))
    models = sorted(runs["model"].unique(), key=lambda m: (m != "mlp", m))
    opts = list(dict.fromkeys(runs["opt"]))
    order = [*range(0, 20, 2), *range(1, 20, 2)]  # tab20's dark shades first: neighbours differ
    colors = {o: plt.get_cmap("tab20")(order[i % 20]) for i, o in enumerate(opts)}
    handles = {}
    fig, axes = plt.subplots(2, len(models), figsize=(6.2 * len(models), 8.4), squeeze=False)
    for j, model in enumerate(models):
        for opt, grp in runs[runs["model"] == model].groupby("opt", sort=False):
            grp = grp.sort_values("step")
            style = "--" if opt in FIRST_ORDER else "-"
            for ax, x in ((axes[0, j], "seconds"), (axes[1, j], "grad_eq")):
                handles[opt] = ax.plot(grp[x], grp["acc"], style, marker="o", ms=3, color=colors[opt], label=opt)[0]
        budget = runs.loc[runs["model"] == model, "budget"].max()
        if budget == budget:
            axes[0, j].axvline(budget, color="grey", lw=0.8, ls=":")
        axes[0, j].set_title(f"{model}: test accuracy against wall time")
        axes[0, j].set_xlabel("training wall time (s)")
        axes[1, j].set_title(f"{model}: test accuracy against cost")
        axes[1, j].set_xlabel("gradient-equivalents (forward + backward of a batch = 1)")
        axes[1, j].set_xscale("log")
        for ax in axes[:, j]:
            ax.set_ylabel("test accuracy")
            ax.set_ylim(0, 1)
            ax.grid(alpha=0.3)
    fig.legend([handles[o] for o in opts if o in handles], [o for o in opts if o in handles], fontsize=8,
               ncol=min(len(handles), 6), loc="lower center")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(out, dpi=100)
    print(final_table(runs).to_string(index=False, float_format=lambda v: f"{v:.4g}"))


if __name__ == "__main__":
    main(*sys.argv[1:3])
