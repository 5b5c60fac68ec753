"""CW's and DeepFool's final refinement and box handling: the exact minimum norm of a linear
model (closed form), refinement never lengthening, and like-for-like medians against
torchattacks' CW (one c) and DeepFool on the digits MLP."""

from __future__ import annotations

import pytest
import torch
from attack_models import trained_mlp
from torch import nn

from gradlab.attacks import build_attack
from gradlab.attacks.base import flat_norm

# Relative slack on medians against torchattacks: float32 noise only. The two libraries follow the
# same iterates but reduce in different orders (batched, vmapped Jacobians and per-example Adam
# here; per-example backward passes and a batch-summed loss there), so equal norms come out a few
# float32 ulps (~1e-7 relative) apart; the refinement's 2**-20 bisection tolerance is 1e-6.
# 1e-4 is that noise with a wide margin, and far below any algorithmic difference (the gaps this
# guards against were 6e-4 for CW and 2e-2 for DeepFool).
FLOAT_NOISE = 1e-4


def _linear(seed: int):
    """A float64 linear 2-class model on (1, 4, 4) inputs and one input at 0.5 with its exact
    minimum L2 and Linf distances to the boundary (the box [0, 1] is not reached)."""
    torch.manual_seed(seed)
    lin = nn.Linear(16, 2).double()
    model = nn.Sequential(nn.Flatten(), lin).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.full((1, 1, 4, 4), 0.5, dtype=torch.float64)
    w = lin.weight[1] - lin.weight[0]
    with torch.no_grad():  # class 1 by an L2 margin of 0.2: every coordinate moves by at most 0.2
        lin.bias.copy_(torch.stack([torch.zeros((), dtype=torch.float64), 0.2 * w.norm() - w @ x.flatten()]))
    f = (model(x)[0, 1] - model(x)[0, 0]).item()
    y = torch.tensor([0 if f < 0 else 1])
    l2, linf = abs(f) / w.norm().item(), abs(f) / w.abs().sum().item()
    assert l2 == pytest.approx(0.2) and linf < 0.2
    return model, x, y, l2, linf


def _fooled(model, adv, y):
    with torch.no_grad():
        return model(adv).argmax(dim=1) != y


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_deepfool_reaches_the_exact_distance_of_a_linear_model(seed, norm):
    model, x, y, l2, linf = _linear(seed)
    exact = l2 if norm == "l2" else linf
    adv, n = build_attack("deepfool", model, 1.0, norm=norm).minimum_norm(x, y)
    assert _fooled(model, adv, y).all() and 0 <= adv.min() and adv.max() <= 1
    assert exact <= n.item() <= exact * (1 + 1.02 * 2**-20) + 1e-12
    _, raw = build_attack("deepfool", model, 1.0, norm=norm, refine=0).minimum_norm(x, y)
    assert raw.item() == pytest.approx(exact * 1.02, rel=1e-3)  # unrefined: the overshoot is kept


@pytest.mark.parametrize("seed", range(2))
def test_cw_reaches_the_exact_distance_of_a_linear_model(seed):
    model, x, y, l2, _ = _linear(seed)
    adv, n = build_attack("cw", model, 1.0, steps=200, binary_search_steps=6, initial_const=1.0,
                          lr=0.01).minimum_norm(x, y)
    assert _fooled(model, adv, y).all() and 0 <= adv.min() and adv.max() <= 1
    assert l2 <= n.item() <= l2 * 1.01


@pytest.mark.parametrize("attack,opts", [("deepfool", {"norm": "l2"}), ("deepfool", {"norm": "linf"}),
                                         ("cw", {"steps": 50, "binary_search_steps": 2, "initial_const": 1.0})])
def test_refinement_never_lengthens_and_keeps_every_example_adversarial(attack, opts):
    model, x, y = trained_mlp()
    x, y = x[:40], y[:40]
    adv, n = build_attack(attack, model, 1.0, **opts).minimum_norm(x, y)
    _, raw = build_attack(attack, model, 1.0, refine=0, **opts).minimum_norm(x, y)
    found = torch.isfinite(n) & (n > 0)
    assert torch.equal(torch.isfinite(n), torch.isfinite(raw))  # the same search, then the refinement
    assert (n[found] <= raw[found]).all() and (n[found] < raw[found]).float().mean() > 0.5
    assert _fooled(model, adv[found], y[found]).all() and 0 <= adv.min() and adv.max() <= 1


def test_cw_one_c_median_not_above_torchattacks_cw():
    torchattacks = pytest.importorskip("torchattacks")
    model, x, y = trained_mlp()
    x, y = x[:100], y[:100]
    adv, norms = build_attack("cw", model, 1.0, steps=50, binary_search_steps=1, initial_const=1.0,
                              lr=0.01).minimum_norm(x, y)
    theirs = torchattacks.CW(model, c=1, kappa=0, steps=50, lr=0.01)(x, y)
    both = _fooled(model, theirs, y) & torch.isfinite(norms) & (norms > 0)
    assert both.sum() >= 30
    assert _fooled(model, adv[both], y[both]).all() and 0 <= adv.min() and adv.max() <= 1
    assert norms[both].median() <= flat_norm(theirs - x, "l2")[both].median() * (1 + FLOAT_NOISE)
