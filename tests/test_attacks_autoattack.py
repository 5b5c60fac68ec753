"""AutoAttack (Croce & Hein 2020): order, survivors only, the breakdown, and torchattacks' numbers."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from attack_models import accuracy, tiny_model, trained_mlp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from gradlab.attacks import build_attack
from gradlab.attacks.base import Attack, flat_norm
from gradlab.attacks.report import COLUMNS, robustness_sweep

TA_NORM = {"linf": "Linf", "l2": "L2"}


def test_standard_runs_the_reference_members_in_order_with_their_settings():
    model, _, _ = trained_mlp()
    aa = build_attack("autoattack", model, 0.1)
    assert [(col, name) for col, name, _ in aa.plan] == [
        ("apgd_ce", "apgd"), ("apgd_t", "apgd"), ("fab_t", "fab"), ("square", "square")]
    opts = [o for _, _, o in aa.plan]
    assert opts[0]["loss"] == "ce" and opts[0]["steps"] == 100 and opts[0]["eot"] == 1
    assert opts[1]["targeted"] and opts[1]["loss"] == "dlr" and opts[1]["n_target_classes"] == 9
    assert opts[2]["targeted"] and opts[2]["n_target_classes"] == 9 and opts[2]["steps"] == 100
    assert opts[3]["n_queries"] == 5000
    rand = build_attack("autoattack", model, 0.1, version="rand")
    assert [(c, o["loss"], o["eot"]) for c, _, o in rand.plan] == [("apgd_ce", "ce", 20), ("apgd_dlr", "dlr", 20)]


def test_autoattack_refuses_a_targeted_run_in_one_line():
    from gradlab.core.errors import GradlabError

    model, _, _ = trained_mlp()
    for opts in ({"targeted": True}, {"target_class": 2}):
        with pytest.raises(GradlabError, match="autoattack is untargeted") as exc:
            build_attack("autoattack", model, 0.1, **opts)
        assert "\n" not in str(exc.value)


def test_each_member_attacks_only_the_survivors_and_the_breakdown_adds_up(monkeypatch):
    model, x, y = trained_mlp()
    seen = []
    call = Attack.__call__

    def spy(self, xb, yb):
        seen.append((self.name, xb.shape[0]))
        return call(self, xb, yb)

    monkeypatch.setattr(Attack, "__call__", spy)
    res = robustness_sweep(model, x[:150], y[:150], "autoattack", [0.1], batch_size=150, steps=20, n_queries=100,
                           seed=0)
    row = res.table.iloc[0]
    broken = [int(row[f"broken_by_{c}"]) for c in ("apgd_ce", "apgd_t", "fab_t", "square")]
    correct = int(round(row["clean_acc"] * 150))
    robust = int(round(row["robust_acc"] * 150))
    assert sum(broken) == correct - robust and broken[0] > 0
    sizes = [n for name, n in seen if name != "autoattack"]
    assert [name for name, _ in seen] == ["autoattack", "apgd", "apgd", "fab", "square"][: len(seen)]
    want = [correct]
    for b in broken[:-1]:
        want.append(want[-1] - b)
    assert sizes == want[: len(sizes)]  # each member sees exactly the examples still robust
    assert list(res.table.columns[: len(COLUMNS)]) == COLUMNS


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), norm=st.sampled_from(["linf", "l2"]), version=st.sampled_from(["standard", "rand"]))
def test_autoattack_stays_in_the_eps_ball_and_the_unit_box(seed, norm, version):
    model = tiny_model(seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(10, 1, 4, 4, generator=g)
    y = torch.randint(0, 10, (10,), generator=g)
    eps = 0.3
    adv = build_attack("autoattack", model, eps, norm=norm, version=version, steps=5, n_queries=20,
                       n_target_classes=2, eot=2, seed=seed)(x, y)
    assert adv.min() >= 0 and adv.max() <= 1 and (flat_norm(adv - x, norm) <= eps * (1 + 1e-5) + 1e-6).all()


def test_rand_version_averages_gradients_over_dropout_draws():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 24), nn.ReLU(), nn.Dropout(0.3), nn.Linear(24, 10)).eval()
    x, y = torch.rand(20, 1, 4, 4), torch.randint(0, 10, (20,))
    calls = []
    model[3].register_forward_hook(lambda m, i, o: calls.append(m.training))
    res = robustness_sweep(model, x, y, "autoattack", [0.2], version="rand", steps=3, eot=4, seed=0)
    assert {"broken_by_apgd_ce", "broken_by_apgd_dlr"} <= set(res.table.columns)
    assert "broken_by_square" not in res.table.columns
    assert any(calls) and not model.training  # dropout sampled during EOT passes, eval mode restored


def test_autoattack_within_half_a_point_of_torchattacks_and_at_most_pgd20():
    torchattacks = pytest.importorskip("torchattacks")
    model, x, y = trained_mlp()
    x, y = x[:200], y[:200]
    eps = 0.1
    ours = accuracy(model, build_attack("autoattack", model, eps, n_queries=500, seed=0)(x, y), y)
    # like for like: the reference's 100 steps (torchattacks' AutoAttack defaults to 10) and the same Square budget
    ref = torchattacks.MultiAttack([
        torchattacks.APGD(model, eps=eps, steps=100, seed=0),
        torchattacks.APGDT(model, eps=eps, steps=100, n_classes=10, seed=0),
        torchattacks.FAB(model, eps=eps, steps=100, multi_targeted=True, n_classes=10, seed=0),
        torchattacks.Square(model, eps=eps, n_queries=500, seed=0)])(x, y)
    theirs = accuracy(model, ref, y)
    assert abs(ours - theirs) <= 0.005, (ours, theirs)
    pgd = accuracy(model, build_attack("pgd", model, eps, steps=20, seed=0)(x, y), y)
    assert ours <= pgd, (ours, pgd)


def test_autoattack_cli_writes_the_breakdown_to_attack_csv(tmp_path, capsys):
    from clihelp import cli

    r = cli(capsys, "train", "--epochs", "1", "--runs-dir", str(tmp_path), "--quiet", "--name", "tiny")
    assert r.code == 0, r.err
    r = cli(capsys, "attack", "autoattack", "--eps", "0.05,0.2", "--steps", "5", "--n-queries", "20",
            "--n-examples", "30", "--runs-dir", str(tmp_path))
    assert r.code == 0, r.err
    df = pd.read_csv(r.run_path / "attack.csv")
    cols = ["broken_by_apgd_ce", "broken_by_apgd_t", "broken_by_fab_t", "broken_by_square"]
    assert list(df.columns) == COLUMNS + cols
    total = df[cols].sum(axis=1)
    assert ((df["clean_acc"] - df["robust_acc"]) * 30 - total).abs().max() < 1e-4  # accuracies are float32 means
