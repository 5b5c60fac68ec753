"""Square Attack (Andriushchenko et al. 2020): outputs only, the budget, the schedule, the ball."""

from __future__ import annotations

import pytest
import torch
from attack_models import accuracy, tiny_model, trained_mlp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from gradlab.attacks import ATTACKS, build_attack
from gradlab.attacks.base import flat_norm
from gradlab.attacks.square import SCHEDULE, eta_pattern, p_at
from gradlab.core.errors import GradlabError


class _NoBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        raise AssertionError("the black-box attack called backward")


class _Counting(nn.Module):
    """Wraps a model: counts forward calls, fails on any backward, and on any forward with grad enabled."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, x):
        assert not torch.is_grad_enabled(), "a forward pass ran with autograd recording"
        self.calls += 1
        return self.inner(_NoBackward.apply(x))


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_square_uses_outputs_only_never_backward_and_keeps_its_query_budget(norm):
    model, x, y = trained_mlp()
    inner = tiny_model(0, d_in=64)
    for p in inner.parameters():
        p.requires_grad_(True)  # frozen by the base during the call, restored afterwards
    wrapped = _Counting(inner)
    x_in = x[:20].clone().requires_grad_(False)
    adv = build_attack("square", wrapped, 0.1 if norm == "linf" else 0.5, norm=norm, n_queries=40, seed=0)(x_in, y[:20])
    assert all(p.grad is None and p.requires_grad for p in inner.parameters())
    assert not adv.requires_grad and adv.grad_fn is None
    # one clean forward, then per run the start point and at most n_queries - 1 proposals
    assert 2 <= wrapped.calls <= 1 + 40


def test_square_on_vectors_searches_strips_and_rejects_5d_inputs():
    model = nn.Sequential(nn.Linear(5, 3))
    x, y = torch.rand(4, 5), torch.zeros(4, dtype=torch.long)
    adv = build_attack("square", model, 0.2, n_queries=20, seed=0)(x, y)
    assert adv.shape == x.shape and (adv - x).abs().max() <= 0.2 + 1e-6
    with pytest.raises(GradlabError, match="square needs inputs"):
        build_attack("square", model, 0.1)(torch.rand(2, 1, 1, 1, 5), torch.zeros(2, dtype=torch.long))


def test_square_with_eot_scores_by_the_mean_margin_over_dropout_draws():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 20), nn.ReLU(), nn.Dropout(0.5), nn.Linear(20, 10)).eval()
    modes = []
    model[3].register_forward_hook(lambda m, i, o: modes.append(m.training))
    with torch.no_grad():
        model[4].bias[0] += 50.0  # class 0 wins by far under every dropout draw: no example is fooled
    x, y = torch.rand(6, 1, 4, 4), torch.zeros(6, dtype=torch.long)
    build_attack("square", model, 0.01, n_queries=5, eot=3, seed=0)(x, y)
    # three draws for each of: the clean batch, the start point, four proposals
    assert modes == [True] * (3 * 6) and not model.training


def test_p_schedule_is_the_papers_halving_rescaled_to_the_budget():
    assert p_at(0, 10000, 0.8) == 0.8 and p_at(10, 10000, 0.8) == 0.8 and p_at(11, 10000, 0.8) == 0.4
    for k, it in enumerate(SCHEDULE, start=1):
        assert p_at(it + 1, 10000, 0.8) == pytest.approx(0.8 / 2 ** k)
    assert p_at(9999, 10000, 0.8) == pytest.approx(0.8 / 512)
    assert p_at(26, 1000, 0.5) == p_at(260, 10000, 0.5) == pytest.approx(0.5 / 8)  # rescaled


@pytest.mark.parametrize("s", [1, 3, 5, 6])
def test_eta_pattern_has_unit_norm_and_opposite_halves(s):
    e = eta_pattern(s, dtype=torch.float64)
    assert e.shape == (s, s) and e.norm().item() == pytest.approx(1.0)
    assert (e[s // 2:] < 0).all() and (e[: s // 2] >= 0).all()
    if s >= 2:
        assert (e[: s // 2] > 0).all()


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), norm=st.sampled_from(["linf", "l2"]), targeted=st.booleans(),
       eps=st.sampled_from([0.05, 0.3, 1.0]), side=st.sampled_from([4, 8]))
def test_square_stays_in_the_eps_ball_and_the_unit_box(seed, norm, targeted, eps, side):
    model = tiny_model(seed, d_in=side * side)
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(12, 1, side, side, generator=g)
    x[:3] = x[:3].round()
    y = torch.randint(0, 10, (12,), generator=g)
    adv = build_attack("square", model, eps, norm=norm, n_queries=30, restarts=2, targeted=targeted, seed=seed)(x, y)
    assert adv.shape == x.shape and adv.min() >= 0 and adv.max() <= 1
    assert (flat_norm(adv - x, norm) <= eps * (1 + 1e-5) + 1e-6).all()


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 1.0)])
def test_square_breaks_the_trained_model_at_least_as_often_as_torchattacks_square(norm, eps):
    torchattacks = pytest.importorskip("torchattacks")
    model, x, y = trained_mlp()
    x, y = x[:120], y[:120]
    ours = accuracy(model, build_attack("square", model, eps, norm=norm, n_queries=150, seed=0)(x, y), y)
    ref = torchattacks.Square(model, norm={"linf": "Linf", "l2": "L2"}[norm], eps=eps, n_queries=150, seed=0)(x, y)
    assert ours < accuracy(model, x, y) - 0.2
    # per-example squares (the paper's) over all positions: no weaker than the shared square
    assert ours <= accuracy(model, ref, y) + 0.025


def test_square_targeted_reaches_the_target_class():
    model, x, y = trained_mlp()
    adv = build_attack("square", model, 1.0, norm="linf", n_queries=200, target_class=4, seed=0)(x[:30], y[:30])
    with torch.no_grad():
        pred = model(adv).argmax(dim=1)
    assert ((pred == 4) | (y[:30] == 4)).float().mean() > 0.9  # eps = 1 linf: any image is allowed
