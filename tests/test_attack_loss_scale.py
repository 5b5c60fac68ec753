"""fp16 attack gradients use dynamic loss scaling (gradlab.attacks.loss_scale): on a confident
model the unscaled fp16 input gradient underflows to zero, the scaled one points where the
float32 gradient does."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from clihelp import fp16_autocast_on_cpu
from gradlab.attacks.loss_scale import InputGradScaler
from gradlab.core.autocast import with_precision


def _confident_model():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 10))
    with torch.no_grad():
        net[3].weight.mul_(0.1)
        net[3].bias[0] += 20.0  # class 0 by a margin of ~20: softmax - onehot ~ 1e-9, below fp16's 6e-8
    x = torch.rand(8, 1, 4, 4)
    y = torch.zeros(8, dtype=torch.long)  # the model's own, confident, prediction
    assert torch.all(net(x).argmax(1) == y)
    return net.eval(), x, y


pytestmark = pytest.mark.skipif(not fp16_autocast_on_cpu(), reason="this torch has no fp16 autocast on CPU")


def _cos(a, b):
    """Per-example cosine of two gradients (in float64, normalised first: these are ~1e-11)."""
    a, b = a.double().flatten(1), b.double().flatten(1)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


def _input_grad(model, x, y, scaler=None):
    xr = x.clone().requires_grad_(True)
    loss = nn.functional.cross_entropy(model(xr), y, reduction="none").sum()
    return scaler.grad(loss, xr) if scaler is not None else torch.autograd.grad(loss, xr)[0]


def test_the_unscaled_fp16_gradient_underflows_and_the_scaled_one_matches_fp32():
    net, x, y = _confident_model()
    ref = _input_grad(net, x, y)  # float32, the loss computed as the fp16 path computes it (from fp32 logits)
    assert ref.abs().max() > 0  # float32 sees a gradient
    assert ref.abs().max() < 1e-6  # ... a tiny one: the model is confident
    half = with_precision(net, "fp16")
    plain = _input_grad(half, x, y)
    assert plain.dtype == torch.float32 and torch.count_nonzero(plain) == 0  # underflowed in fp16
    scaled = _input_grad(half, x, y, InputGradScaler())
    cos = _cos(scaled, ref)
    assert torch.all(cos > 0.99), cos
    assert torch.allclose(scaled, ref, rtol=0.05, atol=0.02 * float(ref.abs().max()))


def test_the_scale_backs_off_on_overflow_and_grows_after_clean_steps():
    net, x, y = _confident_model()
    half = with_precision(net, "fp16")
    xr = x.clone().requires_grad_(True)
    big = (half(xr) * 1e3).sum()  # d big / d logits = 1e3: times 2**16 overflows float16
    ref = torch.autograd.grad((net(xr) * 1e3).sum(), xr)[0]
    s = InputGradScaler(growth_interval=2)
    g = s.grad(big, xr)
    assert s.backoffs > 0 and s.scale < 2.0**16 and torch.isfinite(g).all()
    assert torch.allclose(g, ref, rtol=1e-2, atol=1e-2 * float(ref.abs().max()))
    before, backoffs = s.scale, s.backoffs  # the largest power of two that does not overflow
    s.grad((half(xr) * 1e3).sum(), xr)  # the second clean pass in a row: the scale doubles
    assert s.scale == 2 * before and s.backoffs == backoffs
    g = s.grad((half(xr) * 1e3).sum(), xr)  # which overflows: back to the largest that fits, same result
    assert s.scale == before and s.backoffs == backoffs + 1 and torch.isfinite(g).all()


def test_the_attack_base_scales_fp16_gradients_and_leaves_other_precisions_alone():
    from gradlab.attacks.fgsm import FGSM

    net, x, y = _confident_model()
    ref = _input_grad(net, x, y)
    for precision in ("fp16", "fp32"):
        attack = FGSM(net, 0.1, precision=precision)
        with attack.session(x, y) as (x0, _), torch.enable_grad():
            g, _ = attack.grad(x0)
        assert torch.count_nonzero(g) > 0, precision
        cos = _cos(g, ref)
        assert torch.all(cos > 0.99), (precision, cos)
        assert (attack.__dict__.get("_scaler") is not None) == (precision == "fp16")
    adv = FGSM(net, 0.1, precision="fp16")(x, y)  # the step moves every example (sign of a non-zero g)
    assert torch.all((adv - x).abs().flatten(1).amax(1) > 0)
