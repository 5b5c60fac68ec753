"""Issue 18: every command family on ``--device cuda`` equals the CPU within float tolerance;
the inner loops issue no host synchronisation; low precision stays finite on the GPU.

Marked ``cuda``: skipped (tests/conftest.py) where ``torch.cuda.is_available()`` is False, so CI
never needs a GPU. Tiny runs: a few seconds each on a GPU.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from clihelp import cli, train_in_process

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    runs = tmp_path_factory.mktemp("cuda")
    run = train_in_process("--runs-dir", runs, "--epochs", "3", "--width", "16", "--set", "max_train=512", "--opt",
                           "adam", "--lr", "0.01", "--seed", "1", "--device", "cpu")
    return runs, run


def _both(capsys, tmp_path, *args) -> tuple[Path, Path]:
    """The run folders of ``gradlab ARGS`` on the CPU and on the GPU."""
    out = []
    for dev in ("cpu", "cuda"):
        r = cli(capsys, *args, "--runs-dir", tmp_path / dev, "--quiet", "--device", dev)
        assert r.code == 0, r.err
        out.append(r.run_path)
    return out[0], out[1]


def test_train_on_cuda_matches_the_cpu(capsys, tmp_path):
    cpu, gpu = _both(capsys, tmp_path, "train", "--epochs", "2", "--set", "max_train=256", "--seed", "0")
    a, b = (pd.read_csv(d / "metrics.csv") for d in (cpu, gpu))
    la, lb = (m[(m["metric"] == "loss") & (m["split"] == "train")]["value"].to_numpy() for m in (a, b))
    assert len(la) == len(lb) > 0
    np.testing.assert_allclose(lb, la, rtol=1e-3, atol=1e-5)
    sa, sb = (pd.read_csv(d / "summary.csv").iloc[0] for d in (cpu, gpu))
    assert sb["test_loss"] == pytest.approx(sa["test_loss"], rel=1e-3)
    assert sb["test_acc"] == pytest.approx(sa["test_acc"], abs=0.02)


def test_probe_hessian_on_cuda_matches_the_cpu(capsys, tmp_path, trained):
    runs, run = trained
    cpu, gpu = _both(capsys, tmp_path, "probe", "hessian", "--run", run, "--top-k", "3", "--batches", "2",
                     "--batch-size", "64", "--tol", "1e-6")
    sa, sb = (pd.read_csv(d / "summary.csv").iloc[0] for d in (cpu, gpu))
    for k in ("loss", "grad_norm", "lambda_max"):
        assert sb[k] == pytest.approx(sa[k], rel=1e-4), k


def test_attack_pgd_on_cuda_matches_the_cpu(capsys, tmp_path, trained):
    runs, run = trained
    cpu, gpu = _both(capsys, tmp_path, "attack", "pgd", "--run", run, "--eps", "0,0.05", "--steps", "3",
                     "--n-examples", "96", "--batch-size", "32", "--seed", "0", "--no-random-start", "--grid", "0")
    a, b = (pd.read_csv(d / "attack.csv") for d in (cpu, gpu))
    assert a["clean_acc"].tolist() == pytest.approx(b["clean_acc"].tolist(), abs=1 / 96)
    assert a["robust_acc"].tolist() == pytest.approx(b["robust_acc"].tolist(), abs=3 / 96)  # sign() ties may flip
    assert a["mean_linf"].tolist() == pytest.approx(b["mean_linf"].tolist(), abs=1e-6)


def test_probe_landscape_on_cuda_matches_the_cpu(capsys, tmp_path, trained):
    runs, run = trained
    for ppc in ("1", "5"):
        cpu, gpu = _both(capsys, tmp_path / ppc, "probe", "landscape", "--run", run, "--steps", "5", "--batches", "1",
                         "--batch-size", "128", "--points-per-call", ppc)
        a, b = (pd.read_csv(d / "landscape.csv") for d in (cpu, gpu))
        np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-4)
        np.testing.assert_allclose(b["acc"], a["acc"], atol=1 / 128 + 1e-9)


def _net(device):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(8 * 64, 10)).to(device)
    x = torch.rand(64, 1, 8, 8, device=device)
    with torch.no_grad():
        y = net(x).argmax(1)
    return net, x, y


def test_the_inner_loops_never_synchronise_the_device():
    """``torch.cuda.set_sync_debug_mode('error')`` raises on any synchronising call (item,
    nonzero, boolean indexing, copies to the host) inside Lanczos steps, PGD and APGD steps."""
    from gradlab.attacks import build_attack
    from gradlab.curvature.hessian_op import HessianOperator
    from gradlab.curvature.lanczos import Lanczos

    net, x, y = _net("cuda")
    op = HessianOperator(net, F.cross_entropy, data=[(x, y)])
    lz = Lanczos(op, torch.randn(1, op.n, dtype=torch.float64, device="cuda"),
                 generator=torch.Generator(device="cuda").manual_seed(0))
    assert lz.sync_free
    pgd = build_attack("pgd", net, 0.05, seed=0, steps=5)
    apgd = build_attack("apgd", net, 0.05, seed=0, steps=5)
    torch.cuda.synchronize()
    for attack in (pgd, apgd):
        with attack.session(x, y) as (x0, y0):
            _ = attack.generator  # made (and seeded) before the loop
            torch.cuda.set_sync_debug_mode("error")
            try:
                with torch.enable_grad():
                    attack.run_once(x0, True) if attack is pgd else attack.run_once(x0, y0, None)
            finally:
                torch.cuda.set_sync_debug_mode("default")
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(10):
            lz.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    theta = lz.ritz()[0]  # (eigh of T checks its info flag on the host: after the loop, as eigsh's test)
    assert torch.isfinite(theta).all()


SECOND_ORDER = ["adahessian", "curvature-gd", "newton", "saddle-free-newton", "sr1", "lbfgs", "natural-gd", "kfac",
                "sam"]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_second_order_optimizers_stay_finite_in_low_precision_on_cuda(tmp_path, precision):
    from gradlab.training.loop import Trainer
    from gradlab.training.options import train_defaults, validate_train_config

    for opt in SECOND_ORDER:
        cfg = validate_train_config({**train_defaults(), "runs_dir": str(tmp_path), "name": None, "seed": 0,
                                     "device": "cuda", "max_train": 256, "epochs": 1, "batch_size": 64,
                                     "precision": precision, "opt": opt})
        trainer = Trainer(cfg)
        x, y = trainer.x_train, trainer.y_train
        for i in range(0, 192, 64):
            value, _ = trainer.train_step(x[i:i + 64], y[i:i + 64], 64)
            assert math.isfinite(value), (opt, precision)
        assert all(torch.isfinite(p).all() for p in trainer.model.parameters()), opt


def test_bf16_attack_and_grid_on_cuda_are_close_to_fp32():
    from gradlab.attacks import build_attack
    from gradlab.landscape.grid import evaluate_grid, grid_coords, make_axes

    net, x, y = _net("cuda")
    out = {}
    for p in ("fp32", "bf16", "fp16"):
        adv = build_attack("pgd", net, 0.05, seed=0, steps=5, precision=p)(x, y)
        with torch.no_grad():
            out[p] = F.cross_entropy(net(adv), y).item()
        assert adv.dtype == torch.float32 and torch.isfinite(adv).all()
    assert out["bf16"] == pytest.approx(out["fp32"], rel=0.05) and out["fp16"] == pytest.approx(out["fp32"], rel=0.05)
    gen = torch.Generator(device="cuda").manual_seed(1)
    d = [{n: 0.2 * torch.randn(q.shape, generator=gen, device="cuda") for n, q in net.named_parameters()}
         for _ in range(2)]
    coords = grid_coords(make_axes(-1.0, 1.0, 5, 2))
    ref = evaluate_grid(net, d, coords, [(x, y)]).loss
    for p in ("bf16", "fp16"):
        for ppc in (1, 5):
            lo = evaluate_grid(net, d, coords, [(x, y)], points_per_call=ppc, precision=p).loss
            assert torch.isfinite(lo).all() and torch.allclose(lo, ref, rtol=3e-2), (p, ppc)


def test_eigsh_on_cuda_restarts_without_host_checks_and_matches_the_cpu():
    from gradlab.curvature.eigen import eigsh

    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(40, 40, dtype=torch.float64))
    vals = torch.tensor([3.0, 3.0, 2.0, 2.0] + [1.0] * 36, dtype=torch.float64)
    A = q @ torch.diag(vals) @ q.T  # repeated eigenvalues: the restart path
    cpu = eigsh(A, k=4, tol=1e-10, seed=0)
    gpu = eigsh(A.cuda(), k=4, tol=1e-10, seed=0)
    assert torch.allclose(gpu.values.cpu(), cpu.values, atol=1e-9)
