"""Transfer attacks (``gradlab attack NAME --run TARGET --source RUN``) and ``--manifold`` on the CLI:
source == target is the white-box result, a source's own figures are its white-box ones, bad input
is one line, exit 2, no run folder."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from attack_models import trained_mlp
from clihelp import cli
from gradlab.attacks.report import COLUMNS, robustness_sweep
from gradlab.attacks.transfer import SOURCE_COLUMNS, transfer_sweep

ATTACK = ["--eps", "0,0.05,0.1", "--steps", "3", "--n-examples", "40", "--grid", "0", "--quiet"]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two digits runs with the same seed (the same test split) and different learning rates."""
    runs = tmp_path_factory.mktemp("transfer")
    from gradlab_cli.main import main

    for lr in ("0.1", "0.02"):
        with pytest.raises(SystemExit) as exc:
            main(["train", "--epochs", "1", "--lr", lr, "--runs-dir", str(runs), "--quiet", "--name", f"lr{lr}"])
        assert exc.value.code == 0
    made = sorted(p for p in runs.iterdir())
    return runs, made[0], made[1]


def test_transfer_sweep_with_source_as_target_is_the_white_box_sweep():
    model, x, y = trained_mlp()
    torch.manual_seed(0)
    white = robustness_sweep(model, x[:60], y[:60], "pgd", [0.05, 0.1], steps=5, seed=1).table
    torch.manual_seed(0)
    both = transfer_sweep(model, model, x[:60], y[:60], "pgd", [0.05, 0.1], steps=5, seed=1).table
    assert list(both.columns) == COLUMNS + SOURCE_COLUMNS
    pd.testing.assert_frame_equal(both[COLUMNS], white)
    assert both["source_robust_acc"].tolist() == white["robust_acc"].tolist()


def _csv(r):
    assert r.code == 0, r.err
    return pd.read_csv(r.run_path / "attack.csv")


def test_cli_source_equal_target_equals_white_box_and_source_columns_are_its_white_box(two_runs, capsys):
    runs, a, b = two_runs
    white_a = _csv(cli(capsys, "attack", "pgd", "--run", a, "--runs-dir", runs, *ATTACK))
    same = _csv(cli(capsys, "attack", "pgd", "--run", a, "--source", a, "--runs-dir", runs, *ATTACK))
    pd.testing.assert_frame_equal(same[COLUMNS], white_a)
    white_b = _csv(cli(capsys, "attack", "pgd", "--run", b, "--runs-dir", runs, *ATTACK))
    r = cli(capsys, "attack", "pgd", "--run", a, "--source", b, "--runs-dir", runs, *ATTACK)
    cross = _csv(r)
    assert cross["source_robust_acc"].tolist() == pytest.approx(white_b["robust_acc"].tolist())
    assert cross["source_clean_acc"].tolist() == pytest.approx(white_b["clean_acc"].tolist())
    assert cross["clean_acc"].tolist() == pytest.approx(white_a["clean_acc"].tolist())
    assert cross.loc[0, "robust_acc"] == pytest.approx(cross.loc[0, "clean_acc"])
    assert (cross["mean_linf"] <= cross["eps"] + 1e-6).all()
    summary = pd.read_csv(r.run_path / "summary.csv")
    assert summary.loc[0, "transfer_source"] == b.name


def test_cli_manifold_writes_on_and_off_manifold_columns(two_runs, capsys):
    runs, a, _ = two_runs
    r = cli(capsys, "attack", "pgd", "--run", a, "--manifold", "pca:10", "--tangent-dim", "4", "--runs-dir", runs,
            "--eps", "0.1", "--steps", "3", "--n-examples", "30", "--quiet")
    t = _csv(r)
    assert {"robust_acc", "robust_on", "robust_off", "tangent_dim", "leak"} <= set(t.columns)
    assert t.loc[0, "tangent_dim"] <= 4
    assert (r.run_path / "plots" / "accuracy_vs_eps.png").exists()


@pytest.mark.parametrize("args,needle", [
    (["--source", "nope"], "nope"),
    (["--manifold", "pca"], "pca:K"),
    (["--manifold", "pca:5", "--tangent-dim", "0"], "tangent_dim"),
    (["--tangent-dim", "3"], "--manifold"),
    (["--manifold", "pca:5", "--source", "last"], "cannot be combined"),
])
def test_bad_source_or_manifold_is_one_line_exit_2_no_run_folder(two_runs, capsys, args, needle):
    runs, a, _ = two_runs
    before = sorted(p.name for p in runs.iterdir())
    r = cli(capsys, "attack", "pgd", "--run", a, *args, "--runs-dir", runs, "--quiet")
    assert r.code == 2 and needle in r.err and len(r.err.strip().splitlines()) == 1, r.err
    assert sorted(p.name for p in runs.iterdir()) == before


def test_manifold_with_an_unsupported_attack_is_refused(two_runs, capsys):
    runs, a, _ = two_runs
    r = cli(capsys, "attack", "square", "--run", a, "--manifold", "pca:5", "--runs-dir", runs)
    assert r.code == 2 and "fgsm, pgd, apgd" in r.err
