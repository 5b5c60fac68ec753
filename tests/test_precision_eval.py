"""Issue 18: ``--precision`` for attacks and landscape evaluation (CPU bf16 against fp32)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import yaml

from clihelp import cli

# small settings of the attacks whose defaults take seconds on this machine
FAST = {"autoattack": {"steps": 3, "n_queries": 10, "n_target_classes": 2}, "cw": {"steps": 10, "binary_search_steps": 2},
        "square": {"n_queries": 20}, "fab": {"steps": 5, "n_target_classes": 2}, "fmn": {"steps": 10},
        "apgd": {"steps": 5}, "curls": {"steps": 3, "whey_rounds": 2}, "deepfool": {"steps": 5},
        "curvature": {"lanczos_iters": 5}}


def _net():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    x = torch.rand(8, 1, 4, 4)
    with torch.no_grad():
        y = net(x).argmax(1)
    return net, x, y


def _attack_names():
    from gradlab.attacks import ATTACKS

    return ATTACKS.names()


@pytest.mark.parametrize("name", _attack_names())
def test_every_attack_runs_its_forward_passes_in_bf16_and_keeps_the_perturbation_float32(name):
    from gradlab.attacks import build_attack

    net, x, y = _net()
    seen = []
    hook = net[1].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    try:
        attack = build_attack(name, net, 0.1, seed=0, precision="bf16", **FAST.get(name, {}))
        adv = attack(x, y)
    finally:
        hook.remove()
    assert seen and set(seen) == {torch.bfloat16}
    assert adv.dtype == torch.float32 and torch.isfinite(adv).all()
    assert float((adv - x).abs().max()) <= 0.1 + 1e-6 and float(adv.min()) >= 0 and float(adv.max()) <= 1
    assert attack.model is net  # the autocast wrapper lives for the call only


@pytest.mark.parametrize("low", ["bf16", "fp16"])
def test_low_precision_pgd_is_close_to_fp32(low):
    from gradlab.attacks import build_attack

    net, x, y = _net()
    x = torch.rand(64, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        y = net(x).argmax(1)
    out = {}
    for p in ("fp32", low):
        attack = build_attack("pgd", net, 0.05, seed=0, steps=5, precision=p)
        with attack.session(x, y):
            g, obj = attack.grad(x)
        adv = attack(x, y)
        with torch.no_grad():
            out[p] = (g, obj, F.cross_entropy(net(adv), y).item(), (net(adv).argmax(1) == y).float().mean().item())
        assert g.dtype == torch.float32 and obj.dtype == torch.float32
    (g32, o32, l32, a32), (g16, o16, l16, a16) = out["fp32"], out[low]
    assert F.cosine_similarity(g32.flatten(), g16.flatten(), dim=0) > 0.99  # the same input gradient
    assert torch.allclose(o16, o32, rtol=2e-2, atol=2e-2)
    assert math.isfinite(l16) and abs(l16 - l32) <= 0.05 * abs(l32) and abs(a16 - a32) <= 0.05


def test_bf16_landscape_grid_curve_and_simplex_points_are_close_to_fp32():
    from gradlab.landscape.connect import evaluate_paths
    from gradlab.landscape.grid import evaluate_grid, grid_coords, make_axes
    from gradlab.landscape.simplex import evaluate_simplex

    net, _, _ = _net()
    x = torch.rand(64, 1, 4, 4, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        y = net(x).argmax(1)
    batches = [(x[:32], y[:32]), (x[32:], y[32:])]
    gen = torch.Generator().manual_seed(5)
    d = [{n: 0.3 * torch.randn(p.shape, generator=gen) for n, p in net.named_parameters()} for _ in range(2)]
    coords = grid_coords(make_axes(-1.0, 1.0, 3, 2))
    for ppc in (1, 3):
        seen = []
        hook = net[1].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
        lo = evaluate_grid(net, d, coords, batches, points_per_call=ppc, precision="bf16")
        hook.remove()
        hi = evaluate_grid(net, d, coords, batches, points_per_call=ppc)
        assert set(seen) == {torch.bfloat16}
        assert torch.isfinite(lo.loss).all() and torch.allclose(lo.loss, hi.loss, rtol=2e-2)
        assert (lo.acc - hi.acc).abs().max() <= 0.05
    w = {n: p.detach() for n, p in net.named_parameters()}
    wb = {n: t + d[0][n] for n, t in w.items()}
    bend = {n: t + d[1][n] for n, t in w.items()}
    t16, m16 = evaluate_paths(net, w, wb, bend, batches, batches, points=3, precision="bf16")
    t32, m32 = evaluate_paths(net, w, wb, bend, batches, batches, points=3)
    assert torch.allclose(torch.tensor(t16["loss"].values), torch.tensor(t32["loss"].values), rtol=2e-2)
    s16, _ = evaluate_simplex(net, [w, wb, bend], batches, batches, samples=3, precision="bf16")
    s32, _ = evaluate_simplex(net, [w, wb, bend], batches, batches, samples=3)
    assert torch.allclose(torch.tensor(s16["loss"].values), torch.tensor(s32["loss"].values), rtol=2e-2)
    assert all(p.dtype == torch.float32 for p in net.parameters())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from gradlab_cli.main import main

    runs = tmp_path_factory.mktemp("runs")
    with pytest.raises(SystemExit) as exc:
        main(["train", "--epochs", "1", "--set", "max_train=256", "--runs-dir", str(runs), "--quiet"])
    assert exc.value.code == 0
    return runs


def test_the_cli_takes_precision_for_attacks_and_landscapes_and_records_it(runs, capsys):
    r = cli(capsys, "attack", "pgd", "--precision", "bf16", "--steps", "2", "--n-examples", "32", "--grid", "0",
            "--runs-dir", runs, "--quiet")
    assert r.code == 0, r.err
    assert yaml.safe_load((r.run_path / "config.yaml").read_text())["config"]["precision"] == "bf16"
    r = cli(capsys, "probe", "landscape", "--run", "last", "--precision", "bf16", "--steps", "3", "--batches", "1",
            "--runs-dir", runs, "--quiet")
    assert r.code == 0, r.err
    assert yaml.safe_load((r.run_path / "config.yaml").read_text())["config"]["precision"] == "bf16"
    before = sorted(p.name for p in runs.iterdir())
    r = cli(capsys, "attack", "pgd", "--precision", "fp8", "--runs-dir", runs)
    assert r.code == 2 and "invalid precision: 'fp8'" in r.err and len(r.err.strip().splitlines()) == 1
    assert sorted(p.name for p in runs.iterdir()) == before
