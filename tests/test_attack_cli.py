"""``gradlab attack``: outputs of a run, bad input as one line + exit 2 (in-process, tiny run)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from gradlab_cli.main import main

COLUMNS = "attack,eps,clean_acc,robust_acc,success_rate,mean_linf,mean_l2,mean_confidence,n,robust_ci_low,robust_ci_high".split(",")


def _run(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def test_no_run_at_all_tells_the_user_to_train_first(tmp_path, capsys):
    code, out, err = _run(["attack", "fgsm", "--runs-dir", str(tmp_path / "none")], capsys)
    assert code == 2
    assert "gradlab train" in err and len(err.strip().splitlines()) == 1


def test_attack_sweep_writes_csv_plots_npz_and_states_eval_mode(tiny_runs, capsys):
    code, out, err = _run(
        ["attack", "pgd", "--eps", "0,0.05,0.1", "--steps", "3", "--n-examples", "40", "--batch-size", "16",
         "--runs-dir", str(tiny_runs), "--save-adv", "--grid", "4"], capsys)
    assert code == 0, err
    assert "eval mode" in out
    path = out.strip().splitlines()[-1].removeprefix("run: ").strip()
    df = pd.read_csv(f"{path}/attack.csv")
    assert list(df.columns) == COLUMNS
    assert df["eps"].tolist() == [0.0, 0.05, 0.1]
    assert (df["n"] == 40).all()
    assert df.loc[0, "robust_acc"] == pytest.approx(df.loc[0, "clean_acc"])
    assert (df["robust_acc"] <= df["clean_acc"] + 1e-9).all()
    assert ((df["robust_ci_low"] <= df["robust_acc"]) & (df["robust_acc"] <= df["robust_ci_high"])).all()
    assert (df["mean_linf"] <= df["eps"] + 1e-6).all()
    with np.load(f"{path}/adversarial.npz") as z:
        assert z["x_adv"].shape == (3, 40, 1, 8, 8) and z["pred_adv"].shape == (3, 40)
        assert np.abs(z["x_adv"] - z["x"][None]).max() <= 0.1 + 1e-6
    from pathlib import Path

    plots = {p.name for p in (Path(path) / "plots").iterdir()}
    assert {"accuracy_vs_eps.png", "grid_eps0.05.png", "grid_eps0.1.png"} <= plots
    metrics = pd.read_csv(f"{path}/metrics.csv")
    assert set(metrics["metric"]) >= {"robust_acc", "success_rate", "clean_acc"}
    summary = pd.read_csv(f"{path}/summary.csv")
    assert summary.loc[0, "status"] == "completed" and summary.loc[0, "model_mode"] == "eval"


@pytest.mark.parametrize(
    "args,needle",
    [
        (["nope"], "choose from: apgd, autoattack, curls, curvature, cw, deepfool, fab, fgsm, fmn, pgd, square"),
        (["fgsm", "--eps", "-0.1"], "eps"),
        (["fgsm", "--eps", "1.5"], "eps"),
        (["pgd", "--steps", "0"], "steps"),
        (["pgd", "--norm", "l1"], "norm"),
        (["fgsm", "--eps", "0.1,x"], "eps"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tiny_runs, capsys, args, needle):
    code, out, err = _run(["attack", *args, "--runs-dir", str(tiny_runs)], capsys)
    assert code == 2
    assert needle in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("attack,norm,allowed", [("pgd", "l1", "linf, l2"), ("fmn", "l3", "linf, l2, l1, l0"),
                                                 ("cw", "linf", "l2"), ("deepfool", "l0", "linf, l2")])
def test_a_norm_the_attack_does_not_support_names_the_ones_it_does(tiny_runs, capsys, attack, norm, allowed):
    """Each attack's --norm takes its own norms: one line, exit 2, no run folder; --help lists them per attack."""
    before = sorted(tiny_runs.iterdir())
    code, out, err = _run(["attack", attack, "--norm", norm, "--runs-dir", str(tiny_runs)], capsys)
    assert code == 2 and sorted(tiny_runs.iterdir()) == before
    assert err.strip() == f"gradlab: error: invalid norm: {norm!r} (must be one of: {allowed})"
    code, out, err = _run(["attack", "--help"], capsys)
    flat = " ".join(out.replace("│", " ").split())
    assert code == 0 and "One of: l2 for cw; linf, l2, l1, l0 for fmn; linf, l2 for the others." in flat
    assert "(default: l2 for cw, deepfool, fmn; linf for the others)" in flat


def test_a_run_without_checkpoint_is_rejected(tiny_runs, capsys):
    code, out, err = _run(["attack", "fgsm", "--eps", "0.1", "--n-examples", "8", "--grid", "0", "--runs-dir", str(tiny_runs), "-q"], capsys)
    assert code == 0
    attack_run = out.strip().splitlines()[-1].removeprefix("run: ").strip()
    code, out, err = _run(["attack", "fgsm", "--run", attack_run, "--runs-dir", str(tiny_runs)], capsys)
    assert code == 2 and "checkpoint" in err


def test_fgsm_eps_sweep_experiment_trains_both_ways_then_attacks_each_model():
    from pathlib import Path

    from gradlab.training.experiment import PREVIOUS, load_experiment

    stages = load_experiment(Path(__file__).resolve().parents[1] / "experiments" / "fgsm_eps_sweep.yaml")
    train, attack = stages
    assert train.command == ["train"]
    combos = train.combinations()
    assert {(c["dataset"], c["adv"]) for c in combos} == {("digits", None), ("digits", "fgsm"), ("mnist", None), ("mnist", "fgsm")}
    assert attack.command == ["attack"] and attack.args == ["fgsm"] and attack.base["run"] == PREVIOUS
    assert len(attack.base["eps"].split(",")) >= 4
