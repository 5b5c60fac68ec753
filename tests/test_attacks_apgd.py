"""APGD (Croce & Hein 2020): schedule, losses, budget, and agreement with torchattacks' APGD."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from attack_models import accuracy, tiny_model, trained_mlp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradlab.attacks import ATTACKS, build_attack
from gradlab.attacks.apgd import checkpoints, dlr_loss, dlr_targeted_loss
from gradlab.attacks.base import flat_norm
from gradlab.attacks.report import robustness_sweep
from gradlab.core.errors import GradlabError

torchattacks = pytest.importorskip("torchattacks")
TA_NORM = {"linf": "Linf", "l2": "L2"}


def test_apgd_is_registered_with_the_papers_defaults():
    opts = ATTACKS.entry("apgd").options
    assert opts["steps"].default == 100 and opts["rho"].default == 0.75 and opts["momentum"].default == 0.75
    assert opts["n_target_classes"].default == 9 and opts["loss"].choices == ("ce", "dlr")


def test_checkpoints_follow_the_papers_recurrence():
    # p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06), times N = 100
    p = [0.0, 0.22]
    while p[-1] + max(p[-1] - p[-2] - 0.03, 0.06) <= 1.0:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    assert checkpoints(100) == [round(100 * v) for v in p[1:]] == [22, 41, 57, 70, 80, 87, 93, 99]
    assert checkpoints(1) == [1] and checkpoints(10) == [2, 3, 4, 5, 6, 7, 8, 9, 10]


def test_dlr_losses_match_their_formulas_in_float64_and_are_shift_and_scale_invariant():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(50, 10, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (50,), generator=g)
    t = (y + 1 + torch.randint(0, 9, (50,), generator=g)) % 10
    zs = z.sort(dim=1, descending=True).values
    for i in range(50):
        others = torch.cat([z[i, : y[i]], z[i, y[i] + 1:]])
        want = -(z[i, y[i]] - others.max()) / (zs[i, 0] - zs[i, 2])
        assert dlr_loss(z, y)[i].item() == pytest.approx(want.item(), rel=1e-10)
        want_t = -(z[i, y[i]] - z[i, t[i]]) / (zs[i, 0] - 0.5 * (zs[i, 2] + zs[i, 3]))
        assert dlr_targeted_loss(z, y, t)[i].item() == pytest.approx(want_t.item(), rel=1e-10)
    assert torch.allclose(dlr_loss(3.0 * z + 7.0, y), dlr_loss(z, y), rtol=1e-9)
    assert torch.allclose(dlr_targeted_loss(0.5 * z - 2.0, y, t), dlr_targeted_loss(z, y, t), rtol=1e-9)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), norm=st.sampled_from(["linf", "l2"]), loss=st.sampled_from(["ce", "dlr"]),
       mode=st.sampled_from(["untargeted", "apgd-t", "target"]), eps=st.sampled_from([0.03, 0.3, 1.0]))
def test_apgd_stays_in_the_eps_ball_and_the_unit_box(seed, norm, loss, mode, eps):
    model = tiny_model(seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(16, 1, 4, 4, generator=g)
    x[:4] = x[:4].round()  # pixels at 0 and 1, where the box binds
    y = torch.randint(0, 10, (16,), generator=g)
    extra = {"apgd-t": {"targeted": True, "n_target_classes": 3}, "target": {"target_class": 2}}.get(mode, {})
    adv = build_attack("apgd", model, eps, norm=norm, loss=loss, steps=12, restarts=2, seed=seed, **extra)(x, y)
    assert adv.shape == x.shape and adv.min() >= 0 and adv.max() <= 1
    assert (flat_norm(adv - x, norm) <= eps * (1 + 1e-5) + 1e-6).all()


def test_apgd_t_is_untargeted_for_the_report_and_target_class_is_targeted():
    model, x, y = trained_mlp()
    assert not build_attack("apgd", model, 0.1, targeted=True).targeted  # success = misclassified
    res = robustness_sweep(model, x[:60], y[:60], "apgd", [0.3], steps=20, target_class=3, seed=0)
    assert res.targets is not None and (res.targets == 3).all()
    reached = (res.adv_pred[0.3] == 3) | (y[:60] == 3)
    assert reached.float().mean() > 0.9  # eps 0.3 linf is a large budget on 8x8 digits


class _Bowl(torch.nn.Module):
    """Logits ``(||x - c||^2, 0)``: the CE of class 0 peaks at ``x = c``, inside the ball, never adversarial."""

    def __init__(self, c):
        super().__init__()
        self.c = c

    def forward(self, x):
        d = ((x - self.c) ** 2).flatten(1).sum(dim=1)
        return torch.stack([d, torch.zeros_like(d)], dim=1)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_apgd_halves_the_step_at_checkpoints_and_keeps_the_best_point(norm):
    # With its first step eta = 2 eps the iterate overshoots the interior maximum and oscillates
    # around it; only the halvings at the checkpoints (eight for 100 steps) bring it close.
    g = torch.Generator().manual_seed(0)
    x = 0.3 + 0.4 * torch.rand(6, 1, 4, 4, generator=g)
    eps = 0.1 if norm == "linf" else 0.3
    offset = torch.rand(6, 1, 4, 4, generator=g) - 0.5
    c = x + 0.5 * eps * offset / flat_norm(offset, norm).reshape(-1, 1, 1, 1).float()
    adv = build_attack("apgd", _Bowl(c), eps, norm=norm, steps=100, seed=0)(x, torch.zeros(6, dtype=torch.long))
    assert (flat_norm(adv - c, norm) < eps / 40).all(), flat_norm(adv - c, norm)
    few = build_attack("apgd", _Bowl(c), eps, norm=norm, steps=4, seed=0)(x, torch.zeros(6, dtype=torch.long))
    assert (flat_norm(few - c, norm) > eps / 40).any()  # the schedule, not luck, closes the gap


def test_apgd_rejects_dlr_on_too_few_classes():
    model = tiny_model(0, classes=3)
    x, y = torch.rand(4, 1, 4, 4), torch.zeros(4, dtype=torch.long)
    with pytest.raises(GradlabError, match="needs at least 4 classes"):
        build_attack("apgd", model, 0.1, loss="dlr", targeted=True)(x, y)


# ------------------------------------------------------------- against torchattacks' APGD ---------
CASES = [("linf", 0.1, "ce"), ("linf", 0.1, "dlr"), ("linf", 0.05, "ce"), ("l2", 0.5, "ce"), ("l2", 0.5, "dlr")]


@pytest.mark.parametrize("norm,eps,loss", CASES)
def test_apgd_robust_accuracy_within_half_a_point_of_torchattacks_and_at_most_pgd20(norm, eps, loss):
    model, x, y = trained_mlp()
    ours = accuracy(model, build_attack("apgd", model, eps, norm=norm, loss=loss, seed=0)(x, y), y)
    ref = torchattacks.APGD(model, norm=TA_NORM[norm], eps=eps, steps=100, loss=loss, seed=0)(x, y)
    theirs = accuracy(model, ref, y)
    assert abs(ours - theirs) <= 0.005, (ours, theirs)
    if loss == "ce":  # DLR is the weaker loss on undefended models (the paper's Table 2 too)
        pgd = accuracy(model, build_attack("pgd", model, eps, norm=norm, steps=20, seed=0)(x, y), y)
        assert ours <= pgd + 1e-9, (ours, pgd)


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.5)])
def test_apgd_t_within_half_a_point_of_torchattacks_apgdt(norm, eps):
    model, x, y = trained_mlp()
    ours = accuracy(model, build_attack("apgd", model, eps, norm=norm, loss="dlr", targeted=True, seed=0)(x, y), y)
    ref = torchattacks.APGDT(model, norm=TA_NORM[norm], eps=eps, steps=100, n_classes=10, seed=0)(x, y)
    theirs = accuracy(model, ref, y)
    assert abs(ours - theirs) <= 0.005, (ours, theirs)
    ce = accuracy(model, build_attack("apgd", model, eps, norm=norm, seed=0)(x, y), y)
    assert ours <= ce + 0.005  # nine targeted runs are at least as strong as one untargeted


def test_apgd_cli_sweep_writes_the_table(tmp_path, capsys):
    from clihelp import cli

    r = cli(capsys, "train", "--epochs", "1", "--runs-dir", str(tmp_path), "--quiet", "--name", "tiny")
    assert r.code == 0, r.err
    r = cli(capsys, "attack", "apgd", "--eps", "0,0.1", "--steps", "10", "--loss", "dlr", "--n-examples", "40",
            "--runs-dir", str(tmp_path), "--grid", "4")
    assert r.code == 0, r.err
    import pandas as pd

    df = pd.read_csv(r.run_path / "attack.csv")
    assert df["attack"].tolist() == ["apgd", "apgd"] and df["eps"].tolist() == [0.0, 0.1]
    assert df.loc[0, "robust_acc"] == pytest.approx(df.loc[0, "clean_acc"])
    assert df.loc[1, "mean_linf"] <= 0.1 + 1e-6 and not math.isnan(df.loc[1, "robust_acc"])
