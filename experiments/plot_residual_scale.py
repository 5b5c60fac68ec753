"""The figure of experiments/residual_scale.yaml: per-block Jacobian singular values and the mean
log|det J| per block (with eps*tr(A) beside it) against eps and depth.

    python experiments/plot_residual_scale.py RUNS_DIR OUT.png
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402


def load(runs_dir: Path) -> pd.DataFrame:
    rows = [pd.read_csv(p) for p in sorted(runs_dir.glob("*/summary.csv"))]
    rows = [r for r in rows if "block_log_abs_det" in r.columns]
    return pd.concat(rows, ignore_index=True)


def main(runs_dir: str, out: str) -> None:
    runs = load(Path(runs_dir))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for eps, grp in runs.groupby("residual_scale"):
        grp = grp.sort_values("depth")
        line = a2.plot(grp["depth"], grp["block_log_abs_det"], "o-", label=f"eps={eps:g}: log|det J|")[0]
        a2.plot(grp["depth"], grp["block_trace_minus_n"], "x--", color=line.get_color(), label=f"eps={eps:g}: eps tr(A)")
        deepest = grp.iloc[-1]
        per = pd.read_csv(Path(runs_dir) / deepest["run_id"] / "jacobian_summary.csv")
        per = per[per["mean_log_abs_det"].notna() & per["depth"].notna()]
        a1.fill_between(per["depth"], per["min_sv"], per["max_sv"], color=line.get_color(), alpha=0.2)
        a1.plot(per["depth"], per["mean_sq_sv"] ** 0.5, color=line.get_color(), label=f"eps={eps:g}")
    a1.set_yscale("log")
    a1.set_xlabel(f"block (depth {int(runs['depth'].max())})")
    a1.set_ylabel("singular values of J (band: min..max, line: rms)")
    a1.set_title("per-block Jacobian singular values")
    a1.legend(fontsize=8)
    a2.set_xscale("log", base=2)
    a2.set_xlabel("depth (hidden blocks)")
    a2.set_ylabel("mean over square blocks")
    a2.set_title("log|det J| per block and its first-order term eps tr(A)")
    a2.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main(*sys.argv[1:3])
