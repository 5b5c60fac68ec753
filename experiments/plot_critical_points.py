"""The figure of experiments/critical_points.yaml: the Morse index of every critical point found
against its loss, all seeds together, with the starts that did not converge hollow.

    python experiments/plot_critical_points.py RUNS_DIR OUT.png
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402


def load(runs_dir: Path) -> pd.DataFrame:
    frames = []
    for p in sorted(runs_dir.glob("*/critical-points.csv")):
        t = pd.read_csv(p)
        t["run"] = p.parent.name
        frames.append(t)
    return pd.concat(frames, ignore_index=True)


def main(runs_dir: str, out: str) -> None:
    table = load(Path(runs_dir))
    ok = table["converged"].astype(bool)
    found = table[ok]
    fig, ax = plt.subplots(figsize=(6, 4.4))
    for i, (run, grp) in enumerate(found.groupby("run", sort=True)):
        label = f"seed {run.split('seed=')[-1]}" if "seed=" in run else run
        ax.scatter(grp["loss"], grp["morse_index"], s=30, color=f"C{i}", label=label)
    rest = table[~ok & table["morse_index"].notna()]
    if len(rest):
        ax.scatter(rest["loss"], rest["morse_index"], s=30, facecolors="none", edgecolors="grey",
                   label="not converged (|g| > tol)")
    title = f"{len(found)} critical points of {len(table)} starts"
    if len(found) >= 3:
        rho = found["loss"].rank().corr(found["morse_index"].rank())
        title += f"; Spearman rho(loss, index) = {rho:.2f}"
    ax.set_xlabel("loss at the critical point")
    ax.set_ylabel("Morse index (fraction of negative eigenvalues)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main(*sys.argv[1:3])
