"""smallest_scale (the refinement's search on a perturbation's scale) against a plain bisection
loop, the 20 bisections it replaced: the same smallest passing scale to the tolerance, every
returned scale passing, and fewer probes; then through shrink on a float64 model."""

from __future__ import annotations

import math

import torch
from attack_models import trained_mlp

from gradlab.attacks import build_attack
from gradlab.attacks.minnorm import SCALE_TOL, class_margin, smallest_scale

# Margins along the segment t in [0, 1], one row each, negative at 0 and positive at 1: linear,
# convex, concave, a kink, roots near either end, a steep sigmoid (ReLU networks give piecewise
# smooth margins; the secant has to cope with curvature and kinks).
ROOTS = torch.tensor([0.37, 0.5, 0.2, 0.6, 0.93, 0.03, 0.45], dtype=torch.float64)


def _margin(t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    r = ROOTS[rows]
    u = t - r
    fns = [
        3.0 * u,                                   # linear
        torch.exp(4 * t) - math.exp(4 * 0.5),      # convex
        torch.sqrt(t) - math.sqrt(0.2),            # concave, infinite slope at 0
        torch.where(u < 0, 0.2 * u, 5.0 * u),      # kink at the root
        u * (1 + 10 * u * u),                      # cubic, root near 1
        torch.log1p(50 * t) - math.log1p(50 * 0.03),  # root near 0
        torch.tanh(30 * u),                        # steep sigmoid
    ]
    return torch.stack([f for f in fns])[rows, torch.arange(rows.numel())]


def _bisection(n_rows: int, passes: int = 20) -> torch.Tensor:
    """The reference: ``passes`` bisections of [0, 1] on the pass/fail of each row."""
    lo = torch.zeros(n_rows, dtype=torch.float64)
    hi = torch.ones(n_rows, dtype=torch.float64)
    rows = torch.arange(n_rows)
    for _ in range(passes):
        mid = (lo + hi) / 2
        ok = _margin(mid, rows) > 0
        hi = torch.where(ok, mid, hi)
        lo = torch.where(ok, lo, mid)
    return hi


def test_smallest_scale_matches_bisection_with_fewer_probes():
    n = ROOTS.numel()
    calls, probed = [0], torch.zeros(n, dtype=torch.long)
    passed = []

    def probe(t, rows):
        calls[0] += 1
        probed[rows] += 1
        g = _margin(t, rows)
        passed.append((rows.clone(), t.clone(), g > 0))
        return g > 0, g

    every = torch.arange(n)
    hi = smallest_scale(probe, _margin(torch.zeros(n, dtype=torch.float64), every),
                        _margin(torch.ones(n, dtype=torch.float64), every), passes=20)
    ref = _bisection(n)
    assert (_margin(hi, every) > 0).all()  # every returned scale passes
    assert (hi >= ROOTS).all() and (hi - ROOTS <= 2 * SCALE_TOL * hi).all()  # within the tolerance
    assert torch.allclose(hi, ref, rtol=0, atol=2 * 2.0**-20)  # bisection's answer, to 2^-20
    # each returned scale is one that was probed and passed (or t = 1)
    for i in range(n):
        seen = [t[rows == i] for rows, t, ok in passed if ok[rows == i].any()]
        assert hi[i] == 1 or any(torch.equal(s, hi[i:i + 1]) for s in seen)
    assert probed[0] == 1  # a linear margin: the first secant estimate is the root
    assert probed.max() < 20 and probed.double().mean() <= 8, probed.tolist()
    assert calls[0] < 20


def test_shrink_on_a_float64_model_matches_bisection():
    """DeepFool's refinement on the digits MLP in float64: the scale it keeps is bisection's
    smallest misclassified scale to 2^-20 relative, with fewer forward passes."""
    model, x, y = trained_mlp()
    model = model.double()
    x = x[:24].double()
    y = y[:24]
    attack = build_attack("deepfool", model, 1.0, norm="l2", refine=0)
    adv, norms = attack.minimum_norm(x, y)
    with torch.no_grad():
        clean = model(x).argmax(1)
    found = torch.isfinite(norms) & (norms > 0)
    assert found.sum() >= 10
    xs, d, lab = x[found], (adv - x)[found], clean[found]

    def wrong(t):
        with torch.no_grad():
            return model((xs + t.view(-1, *[1] * (d.dim() - 1)) * d).clamp(0, 1)).argmax(1) != lab

    lo, hi = torch.zeros(len(xs), dtype=torch.float64), torch.ones(len(xs), dtype=torch.float64)
    for _ in range(20):
        mid = (lo + hi) / 2
        ok = wrong(mid)
        hi, lo = torch.where(ok, mid, hi), torch.where(ok, lo, mid)

    forwards = [0]
    refined = build_attack("deepfool", model, 1.0, norm="l2", refine=20)
    plain_logits = refined.logits

    def counted(v):
        forwards[0] += 1
        return plain_logits(v)

    refined.logits = counted
    with refined.session(x, y) as (x0, y0):
        z_x, z_adv = model(x0), model(adv)
        out = refined.shrink(x0, adv, found, lambda z, i: (z.argmax(1) != clean[i], class_margin(z, clean[i])),
                             20, z_x, z_adv)
    scale = (out - x)[found].flatten(1).norm(dim=1) / d.flatten(1).norm(dim=1)
    assert wrong(scale).all()
    assert torch.allclose(scale, hi, rtol=4 * 2.0**-20, atol=1e-12)
    assert forwards[0] < 20
