"""K-FAC's output factor G under fp16 autocast (CPU): the columns are loss-scaled per column
(gradlab.curvature.kfac_backward), so a model whose float16 output gradients all underflow still
gets the float32 G, and one whose scaled gradients overflow float16 retries at smaller scales."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clihelp import fp16_autocast_on_cpu
from gradlab.curvature import KFACOperator, kfac_backward

pytestmark = pytest.mark.skipif(not fp16_autocast_on_cpu(), reason="this torch has no fp16 autocast on CPU")


def _confident(overflow: bool = False):
    """Logits ``35 e_0`` plus at most ~1e-2 (other classes at p ~ 6e-16): every column of the
    type-2 factor is at most sqrt(p_k) / sqrt(N) ~ 9e-9, rounding to 0 in float16 (whose smallest
    subnormal is 6e-8), while float32 keeps G normal. ``overflow``: a middle layer with weights
    ~1e-3 before a head whose rows are equal (the softmax ignores them) with entries ~3e3, so that
    the middle layer's output gradient is ~1e4 x the logits' (float16 overflows at the first scale)."""
    torch.manual_seed(0)
    mid = [nn.Linear(6, 6)] if overflow else []
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), *mid, nn.Linear(6, 3))
    with torch.no_grad():
        if overflow:
            model[-1].weight.copy_(3e3 * torch.rand(6).add(0.5).expand(3, 6))
            model[2].weight.mul_(1e-3)
            model[2].bias.zero_()
        else:
            model[-1].weight.mul_(1e-3)
        model[-1].bias.copy_(torch.tensor([35.0, 0.0, 0.0]))
    return model, (torch.randn(8, 4), torch.zeros(8, dtype=torch.long))


def _factors(model, data, fp16: bool, **kw):
    if not fp16:
        return [b.G for b in KFACOperator(model, None, data, **kw).blocks]
    with torch.autocast("cpu", dtype=torch.float16):
        return [b.G for b in KFACOperator(model, None, data, **kw).blocks]


def _no_scaling(S):
    return torch.ones(S.shape[0], dtype=S.dtype)


@pytest.mark.parametrize("fisher_type", ["type-2", "mc"])
def test_scaled_fp16_G_matches_float32_where_unscaled_fp16_is_zero(fisher_type, monkeypatch):
    model, data = _confident()
    ref = _factors(model, data, False, fisher_type=fisher_type, mc_samples=4)
    assert all(g.dtype == torch.float32 and 0 < g.abs().max() < 1e-12 for g in ref)
    G = _factors(model, data, True, fisher_type=fisher_type, mc_samples=4)
    for g, r in zip(G, ref):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, r, rtol=1e-2, atol=2e-3 * float(r.abs().max()))
    monkeypatch.setattr(kfac_backward, "_column_scales", _no_scaling)  # the scaling off: G underflows to 0
    assert all(bool((g == 0).all()) for g in _factors(model, data, True, fisher_type=fisher_type, mc_samples=4))


def test_overflow_in_float16_is_retried_with_halved_scales(monkeypatch):
    model, data = _confident(overflow=True)
    ref = _factors(model, data, False, fisher_type="type-2")
    seen = []
    inner = kfac_backward._grads

    def spy(z, outs, cols, retain):
        grads = inner(z, outs, cols, retain)
        seen.append(all(g is None or bool(torch.isfinite(g).all()) for g in grads))
        return grads

    monkeypatch.setattr(kfac_backward, "_grads", spy)
    G = _factors(model, data, True, fisher_type="type-2")
    assert seen[0] is False and seen[-1] is True  # overflowed at the first scales, then fitted
    del seen[:]
    monkeypatch.setattr(kfac_backward, "FP16_TARGET", 2.0**-4)  # small enough from the start
    safe = _factors(model, data, True, fisher_type="type-2")
    assert all(seen)
    for g, r, q in zip(G, ref, safe):
        assert bool(torch.isfinite(g).all())
        torch.testing.assert_close(g, q, rtol=1e-6, atol=0)  # scales differ by powers of two only
        torch.testing.assert_close(g, r, rtol=5e-2, atol=2e-2 * float(r.abs().max()))


def test_optimizer_factors_under_fp16_autocast_match_float32(monkeypatch):
    from gradlab.optim.kfac import KFAC

    def first_G(fp16: bool):
        model, (x, y) = _confident()
        opt = KFAC(model.parameters(), fisher_type="type-2", lr=1e-3)
        opt.bind(model, F.cross_entropy)

        def closure():
            with torch.autocast("cpu", dtype=torch.float16, enabled=fp16):
                return F.cross_entropy(model(x), y)

        opt.step(closure)
        return [blk.G.clone() for blk in opt.blocks]

    ref, G = first_G(False), first_G(True)
    for g, r in zip(G, ref):
        assert 0 < r.abs().max() < 1e-12
        torch.testing.assert_close(g, r, rtol=1e-2, atol=2e-3 * float(r.abs().max()))
    monkeypatch.setattr(kfac_backward, "_column_scales", _no_scaling)
    assert all(bool((g == 0).all()) for g in first_G(True))
