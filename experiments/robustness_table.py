"""One table and one plot of an experiments/robustness.yaml run: robust accuracy per training
(standard / adversarial), attack and eps, from every attack run under RUNS_DIR.

    python experiments/robustness_table.py runs/robustness   # writes robustness.csv, robustness.png there

Beside the table, robustness_ci.csv gives every figure's 95% Wilson score interval for its n
attacked images (the plot draws them as error bars): with 200 images, one image is 0.5 points and
an accuracy near 0.6 is known to about +-7 points, while a gap between two attacks on the same
images is a paired count and much sharper than the two intervals suggest.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import yaml

from gradlab.attacks.report import wilson_interval


ATTACK_ORDER = ("fgsm", "pgd", "apgd", "autoattack")


def collect(runs_dir: Path) -> pd.DataFrame:
    """Rows ``training, attack, eps, clean_acc, robust_acc, n`` of every attack run in ``runs_dir``."""
    rows = []
    for csv in sorted(runs_dir.glob("*-attack*/attack.csv")):
        cfg = yaml.safe_load((csv.parent / "config.yaml").read_text())["config"]
        train = yaml.safe_load((Path(cfg["run"]) / "config.yaml").read_text())["config"]
        training = f"adversarial ({train['adv']}, eps {train['adv_eps']:g})" if train.get("adv") else "standard"
        table = pd.read_csv(csv)
        for r in table.itertuples(index=False):
            rows.append({"training": training, "attack": r.attack, "eps": r.eps, "clean_acc": r.clean_acc,
                         "robust_acc": r.robust_acc, "n": r.n})
    df = pd.DataFrame(rows, columns=["training", "attack", "eps", "clean_acc", "robust_acc", "n"])
    # rows in a reader's order: the standard model first, attacks from the weakest to AutoAttack
    rank = {a: i for i, a in enumerate(ATTACK_ORDER)}
    key = df["training"].ne("standard").astype(int) * 1000 + df["attack"].map(lambda a: rank.get(a, len(rank)))
    return df.assign(_key=key).sort_values(["_key", "eps"], kind="stable").drop(columns="_key").reset_index(drop=True)


def intervals(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` (from :func:`collect`) with ``ci_low``, ``ci_high``: the 95% Wilson interval of each
    robust accuracy over its ``n`` images (:func:`gradlab.attacks.report.wilson_interval`, the
    same as attack.csv's ``robust_ci_*``)."""
    bounds = [wilson_interval(float(r.robust_acc), int(r.n)) for r in df.itertuples(index=False)]
    return df.assign(ci_low=[b[0] for b in bounds], ci_high=[b[1] for b in bounds])


def plot(df: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 4))
    for (training, attack), part in df.groupby(["training", "attack"], sort=False):
        part = intervals(part.sort_values("eps"))
        err = [part["robust_acc"] - part["ci_low"], part["ci_high"] - part["robust_acc"]]
        ax.errorbar(part["eps"], part["robust_acc"], yerr=err, marker="o", capsize=3,
                    linestyle="-" if training == "standard" else "--", label=f"{training}: {attack}")
    ax.set_xlabel("eps (linf, pixel units)")
    ax.set_ylabel("robust accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, title="bars: 95% Wilson interval", title_fontsize=7,
              loc="upper left", bbox_to_anchor=(1.02, 1.0))  # outside: no line runs under it
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list) -> int:
    if len(argv) != 1 or not Path(argv[0]).is_dir():
        print("usage: python experiments/robustness_table.py RUNS_DIR", file=sys.stderr)
        return 2
    runs = Path(argv[0])
    df = collect(runs)
    if df.empty:
        print(f"no attack runs under {runs}", file=sys.stderr)
        return 2
    wide = df.pivot_table(index=["training", "attack"], columns="eps", values="robust_acc", sort=False)
    wide.columns = [f"eps {c:g}" for c in wide.columns]
    wide.insert(0, "clean", df.groupby(["training", "attack"], sort=False)["clean_acc"].first())
    wide.reset_index().to_csv(runs / "robustness.csv", index=False)
    intervals(df).to_csv(runs / "robustness_ci.csv", index=False)
    plot(df, runs / "robustness.png")
    print(wide.round(3).to_string())
    n = int(df["n"].min())
    low, high = wilson_interval(0.5, n)
    print(f"{n} images per figure: 95% intervals up to +-{(high - low) / 2:.3f} (robustness_ci.csv)")
    print(f"wrote {runs / 'robustness.csv'}, {runs / 'robustness_ci.csv'} and {runs / 'robustness.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
