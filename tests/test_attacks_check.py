"""``gradlab attack check``: a plain trained model passes, models with masked gradients are flagged;
the CLI's check.csv, exit codes (0 pass, 1 a check failed, 2 bad input) and no run folder on bad input."""

from __future__ import annotations

import sys

import pandas as pd
import pytest
import torch
from torch import nn

from attack_models import trained_mlp
from clihelp import cli
from gradlab.attacks.check import CHECKS, COLUMNS, masking_checks


class Quantise(nn.Module):
    """Input quantisation to 4 levels: round() has a zero gradient almost everywhere."""

    def forward(self, x):
        return torch.round(x * 4) / 4


class Saturate(nn.Module):
    """Logits times 1e4: the softmax saturates and the float32 cross-entropy gradient vanishes."""

    def forward(self, z):
        return z * 1e4


def test_a_plain_trained_model_passes_every_check():
    model, x, y = trained_mlp()
    table, extra = masking_checks(model, x[:150], y[:150], 0.1, steps=10, queries=500)
    assert list(table.columns) == COLUMNS and tuple(table["check"]) == CHECKS
    assert table["passed"].all(), table.to_string()
    loss = extra["loss_curve"]
    assert len(loss) == 10 and loss[-1] > loss[0]
    assert extra["accuracy"]["pgd-unbounded"] == 0.0


@pytest.mark.parametrize("wrap", ["quantise", "saturate"])
def test_masked_gradients_are_flagged(wrap):
    model, x, y = trained_mlp()
    masked = (nn.Sequential(Quantise(), model) if wrap == "quantise" else nn.Sequential(model, Saturate())).eval()
    table, _ = masking_checks(masked, x[:150], y[:150], 0.1, steps=10, queries=500)
    failed = set(table.loc[~table["passed"], "check"])
    assert "unbounded" in failed, table.to_string()  # PGD with the whole box as budget still fails
    if wrap == "quantise":  # zero gradients: a flat loss curve, and Square breaks what PGD could not
        assert {"loss_rises", "black_box"} <= failed, table.to_string()


QUANTISED_MODULE = """
import torch
from torch import nn

class Quantise(nn.Module):
    def forward(self, x):
        return torch.round(x * 4) / 4

def quantised(spec):
    return nn.Sequential(Quantise(), nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, spec.num_classes))
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("check_runs")


def test_cli_flags_a_quantised_user_model_with_exit_1(runs, tmp_path, monkeypatch, capsys):
    (tmp_path / "gl_quant_mod.py").write_text(QUANTISED_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("GRADLAB_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delitem(sys.modules, "gl_quant_mod", raising=False)
    r = cli(capsys, "train", "--model", "gl_quant_mod:quantised", "--epochs", "3", "--runs-dir", runs, "--quiet")
    assert r.code == 0, r.err
    r = cli(capsys, "attack", "check", r.run_path, "--runs-dir", runs, "--n-examples", "100", "--queries", "300")
    assert r.code == 1, r.err
    table = pd.read_csv(r.run_path / "check.csv")
    assert list(table.columns) == COLUMNS
    failed = table.loc[~table["passed"], "check"].tolist()
    assert failed and all(f"{c}:" in r.err for c in failed)
    assert r.err.count("gradient masking suspected") == len(failed)
    assert (r.run_path / "plots" / "loss_curve.png").exists()


def test_cli_bad_input_is_one_line_exit_2_and_no_run_folder(runs, capsys):
    before = sorted(p.name for p in runs.iterdir())
    for args in (["nope"], ["--eps", "2"], ["--steps", "0"], ["--norm", "l1"]):
        r = cli(capsys, "attack", "check", *args, "--runs-dir", runs)
        assert r.code == 2 and len(r.err.strip().splitlines()) == 1, (args, r.err)
    assert sorted(p.name for p in runs.iterdir()) == before
