"""``gradlab attack fmn|cw|deepfool|fab``: per-example norms, the curve and median from one run."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from gradlab_cli.main import main


def _run(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out, err = capsys.readouterr()
    return exc.value.code, out, err


@pytest.mark.parametrize("attack,norm,extra", [("fmn", "l0", ["--steps", "30"]), ("deepfool", "l2", []),
                                               ("cw", "l2", ["--steps", "20", "--binary-search-steps", "2"])])
def test_minimum_norm_run_writes_norms_curve_plot_and_eps_rows_from_the_norms(tiny_runs, capsys, attack, norm, extra):
    code, out, err = _run(["attack", attack, "--norm", norm, "--eps", "0,1,3", "--n-examples", "30", "--grid", "0",
                           "--runs-dir", str(tiny_runs), *extra], capsys)
    assert code == 0, err
    assert "minimum" in out and "median" in out
    path = Path(out.strip().splitlines()[-1].removeprefix("run: ").strip())
    per = pd.read_csv(path / "min_norms.csv")
    assert list(per.columns) == ["index", "label", "clean_pred", "norm", "found", "adv_pred"] and len(per) == 30
    assert ((per["norm"] == 0) == (per["label"] != per["clean_pred"])).all()
    assert (per.loc[per["found"] & (per["norm"] > 0), "adv_pred"] != per.loc[per["found"] & (per["norm"] > 0), "label"]).all()
    table = pd.read_csv(path / "attack.csv")
    for row in table.itertuples():  # robust accuracy at every eps is the share of norms above it
        assert row.robust_acc == pytest.approx((per["norm"] > row.eps).mean(), abs=1e-6)
    correct = per[per["label"] == per["clean_pred"]]["norm"].sort_values().to_numpy()
    assert table["median_norm"].iloc[0] == pytest.approx(correct[math.ceil(len(correct) / 2) - 1])
    curve = pd.read_csv(path / "norm_curve.csv")
    assert curve["robust_acc"].is_monotonic_decreasing and (path / "plots" / "robust_acc_vs_norm.png").exists()
    assert not math.isnan(pd.read_csv(path / "summary.csv").loc[0, "median_norm"])


@pytest.mark.parametrize("args,needle", [(["pgd", "--norm", "l1"], "norm"), (["cw", "--norm", "linf"], "norm"),
                                         (["fmn", "--norm", "l0", "--eps", "65"], "invalid eps")])
def test_a_norm_an_attack_does_not_take_is_one_line_and_exit_2(tiny_runs, capsys, args, needle):
    code, out, err = _run(["attack", *args, "--n-examples", "4", "--runs-dir", str(tiny_runs)], capsys)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
