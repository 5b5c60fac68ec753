"""FAB-T (Croce & Hein 2020b): the exact projection against a solver in float64, the ball, torchattacks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from attack_models import accuracy, tiny_model, trained_mlp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.optimize import linprog, minimize

from gradlab.attacks import build_attack
from gradlab.attacks.base import flat_norm
from gradlab.attacks.fab import project_hyperplane_box


def _reference(w, c, lo, hi, norm):
    """The same problem by a generic solver: an LP for linf, SLSQP for l2 (float64, one row)."""
    d = len(w)
    if norm == "linf":  # variables (delta, s): min s, -s <= delta_i <= s, w . delta = c
        cost = np.r_[np.zeros(d), 1.0]
        a_ub = np.block([[np.eye(d), -np.ones((d, 1))], [-np.eye(d), -np.ones((d, 1))]])
        res = linprog(cost, A_ub=a_ub, b_ub=np.zeros(2 * d), A_eq=np.r_[w, 0.0][None], b_eq=[c],
                      bounds=[*zip(lo, hi), (0, None)], method="highs")
        return res.x[:d] if res.status == 0 else None
    res = minimize(lambda v: 0.5 * v @ v, np.zeros(d), jac=lambda v: v, method="SLSQP", bounds=list(zip(lo, hi)),
                   constraints=[{"type": "eq", "fun": lambda v: w @ v - c, "jac": lambda v: w}],
                   options={"ftol": 1e-14, "maxiter": 500})
    return res.x if res.success and abs(w @ res.x - c) < 1e-9 else None


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_projection_onto_hyperplane_and_box_matches_a_solver_in_float64(norm):
    g = torch.Generator().manual_seed(0)
    b, d = 40, 7
    w = torch.randn(b, d, generator=g, dtype=torch.float64)
    w[:5, :2] = 0.0  # coordinates the hyperplane ignores
    p = torch.rand(b, d, generator=g, dtype=torch.float64)
    p[5:10, :3] = p[5:10, :3].round()  # points on the box's faces
    c = torch.randn(b, generator=g, dtype=torch.float64) * 0.5
    lo, hi = -p, 1 - p
    delta = project_hyperplane_box(w, c, lo, hi, norm)
    assert (delta >= lo - 1e-12).all() and (delta <= hi + 1e-12).all()
    checked = 0
    for i in range(b):
        ref = _reference(w[i].numpy(), c[i].item(), lo[i].numpy(), hi[i].numpy(), norm)
        if ref is None:  # the box misses the hyperplane: every coordinate saturated towards it
            towards = w[i] * torch.sign(c[i])
            corner = torch.where(towards > 0, hi[i], torch.where(towards < 0, lo[i], torch.zeros_like(lo[i])))
            assert ((w[i] * corner).sum().abs() < c[i].abs()).item()  # truly out of reach
            assert torch.allclose(delta[i], corner, atol=1e-12)
            continue
        assert (w[i] * delta[i]).sum().item() == pytest.approx(c[i].item(), abs=1e-9)
        ours, theirs = flat_norm(delta[i: i + 1], norm).item(), flat_norm(torch.tensor(ref)[None], norm).item()
        assert ours == pytest.approx(theirs, rel=1e-6, abs=1e-9)
        checked += 1
    assert checked >= 30


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), norm=st.sampled_from(["linf", "l2"]), eps=st.sampled_from([0.05, 0.3, 1.0]),
       mode=st.sampled_from([{}, {"targeted": True}, {"target_class": 3}]))
def test_fab_stays_in_the_eps_ball_and_the_unit_box(seed, norm, eps, mode):
    model = tiny_model(seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(12, 1, 4, 4, generator=g)
    x[:3] = x[:3].round()
    y = torch.randint(0, 10, (12,), generator=g)
    adv = build_attack("fab", model, eps, norm=norm, steps=10, n_target_classes=3, restarts=2, seed=seed, **mode)(x, y)
    assert adv.shape == x.shape and adv.min() >= 0 and adv.max() <= 1
    assert (flat_norm(adv - x, norm) <= eps * (1 + 1e-5) + 1e-6).all()


@pytest.mark.parametrize("norm,eps,targeted", [("linf", 0.1, True), ("l2", 0.5, True), ("linf", 0.1, False)])
def test_fab_robust_accuracy_close_to_torchattacks_fab(norm, eps, targeted):
    torchattacks = pytest.importorskip("torchattacks")
    model, x, y = trained_mlp()
    x, y = x[:200], y[:200]
    ours = accuracy(model, build_attack("fab", model, eps, norm=norm, steps=30, targeted=targeted, seed=0)(x, y), y)
    ref = torchattacks.FAB(model, norm={"linf": "Linf", "l2": "L2"}[norm], eps=eps, steps=30, multi_targeted=targeted,
                           n_classes=10, seed=0)(x, y)
    theirs = accuracy(model, ref, y)
    # never weaker than the peer (0.5 points: one example of 200); ours may be stronger, since it
    # also keeps an adversarial found beyond eps once projected into the ball (measured: 0.33 vs
    # 0.34 at linf 0.1), but not by so much that it would hint at a different attack (3 points)
    assert ours <= theirs + 0.005 and ours >= theirs - 0.03, (ours, theirs)


def test_fab_finds_small_perturbations_on_a_linear_model():
    # Softmax regression: the boundaries are hyperplanes, so FAB's linearisation is exact and the
    # smallest l2 perturbation to the runner-up class is |gap| / ||w_t - w_y||.
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 10)
    model = torch.nn.Sequential(torch.nn.Flatten(), lin)
    x = 0.4 + 0.2 * torch.rand(10, 1, 4, 4)
    with torch.no_grad():
        z = model(x)
    y = z.argmax(dim=1)
    wd = lin.weight[None] - lin.weight[y][:, None]  # (B, C, D)
    gap = (z.gather(1, y[:, None]) - z)  # (B, C) >= 0
    closest = (gap / wd.norm(dim=2).clamp_min(1e-12)).masked_fill(torch.nn.functional.one_hot(y, 10).bool(), 1e9)
    need = closest.min(dim=1).values
    for mode in ({}, {"targeted": True}):  # the closest boundary, and FAB-T trying the top classes in turn
        adv = build_attack("fab", model, 1.0, norm="l2", steps=20, seed=0, **mode)(x, y)
        with torch.no_grad():
            assert (model(adv).argmax(dim=1) != y).all()
        assert (flat_norm(adv - x, "l2") <= need.double() * 1.06 + 1e-6).all(), mode  # eta = 1.05 overshoot at most


def test_fab_with_a_target_class_reaches_it():
    model, x, y = trained_mlp()
    adv = build_attack("fab", model, 1.0, norm="linf", steps=30, target_class=5, seed=0)(x[:30], y[:30])
    with torch.no_grad():
        pred = model(adv).argmax(dim=1)
    assert ((pred == 5) | (y[:30] == 5)).float().mean() > 0.9
