"""Simplex volume and sampling, simplex training, mode-connecting curves, BN recomputation."""

import math

import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn

from gradlab.core.errors import GradlabError
from gradlab.landscape.connect import barrier, curve_point, evaluate_paths, train_curve
from gradlab.landscape.directions import weights_of
from gradlab.landscape.functional import evaluate_at, recompute_bn
from gradlab.landscape.simplex import (
    cayley_menger_log_volume,
    evaluate_simplex,
    sample_dirichlet,
    simplex_volume,
    train_simplex,
)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_cayley_menger_volume_of_regular_simplex(k):
    side = 1.7
    # e_i * side / sqrt(2) in R^{k+1}: all pairwise distances equal `side`; then rotate into R^9
    pts = torch.eye(k + 1, dtype=torch.float64) * side / math.sqrt(2)
    q, _ = torch.linalg.qr(torch.randn(9, 9, generator=torch.Generator().manual_seed(k), dtype=torch.float64))
    pts = torch.cat([pts, torch.zeros(k + 1, 9 - (k + 1), dtype=torch.float64)], dim=1) @ q + 3.0
    exact = side**k / math.factorial(k) * math.sqrt((k + 1) / 2**k)
    assert simplex_volume(pts) == pytest.approx(exact, rel=1e-10)


def test_cayley_menger_right_triangle_gradient_and_degenerate():
    a, b = 2.0, 0.5
    pts = torch.tensor([[0.0, 0.0, 1.0], [a, 0.0, 1.0], [0.0, b, 1.0]], dtype=torch.float64, requires_grad=True)
    assert simplex_volume(pts.detach()) == pytest.approx(a * b / 2, rel=1e-12)
    assert torch.autograd.gradcheck(cayley_menger_log_volume, (pts,))
    flat = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]], dtype=torch.float64)
    assert cayley_menger_log_volume(flat).item() == float("-inf")


def test_dirichlet_samples_uniform_on_the_simplex():
    w = sample_dirichlet(3, 20000, torch.Generator().manual_seed(0))
    torch.testing.assert_close(w.sum(1), torch.ones(20000, dtype=torch.float64))
    assert (w >= 0).all()
    # uniform on the 2-simplex: each coordinate's marginal is Beta(1, 2), CDF 1 - (1 - x)^2
    for i in range(3):
        assert stats.kstest(w[:, i].numpy(), lambda x: 1 - (1 - x) ** 2).pvalue > 0.01
    # the midpoint subdivision gives 4 congruent triangles of equal probability 1/4
    corner = (w > 0.5).to(torch.int64)  # at most one coordinate exceeds 1/2
    cell = torch.where(corner.any(1), corner.argmax(1), torch.full((20000,), 3))
    counts = torch.bincount(cell, minlength=4).numpy()
    assert stats.chisquare(counts).pvalue > 0.01
    # a non-uniform sampler is rejected by the same test (the test can fail)
    skew = torch.softmax(torch.randn(20000, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64), 1)
    assert stats.kstest(skew[:, 0].numpy(), lambda x: 1 - (1 - x) ** 2).pvalue < 1e-6


def blobs(n=240, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[2.0, 0.0], [-1.0, 1.7], [-1.0, -1.7]])
    y = torch.randint(0, 3, (n,), generator=g)
    x = centres[y] + 0.6 * torch.randn(n, 2, generator=g)
    return x, y


def tiny_net(seed, bn=False):
    torch.manual_seed(seed)
    layers = [nn.Linear(2, 16)] + ([nn.BatchNorm1d(16)] if bn else []) + [nn.ReLU(), nn.Linear(16, 3)]
    return nn.Sequential(*layers)


def fit(model, x, y, steps=150, lr=0.1):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    return model


def test_trained_simplex_interior_loss_close_to_vertices():
    x, y = blobs()
    model = fit(tiny_net(0), x, y)
    before = {n: t.clone() for n, t in weights_of(model).items()}
    res = train_simplex(model, x, y, vertices=3, epochs=8, volume_reg=0.05, lr=0.05, batch_size=60, seed=0)
    assert len(res.vertices) == 3 and len(res.history) == 2 * 8
    for n, t in weights_of(model).items():
        assert torch.equal(t, before[n])  # vertex 0 is the model, which stays untouched
    batches = [(x, y)]
    table, m = evaluate_simplex(model, res.vertices, batches, batches, samples=10, seed=1)
    assert m["volume"] > 0 and math.isfinite(m["log_volume"])
    # the whole simplex is low-loss: interior samples about as good as the vertices
    assert m["sample_loss_mean"] <= 1.5 * m["vertex_loss_mean"] + 0.05
    assert m["sample_acc_mean"] >= m["vertex_acc_mean"] - 0.03
    assert set(table["kind"]) == {"vertex", "centre", "sample", "ensemble"}
    # and not trivially so: the vertices are apart (distance comparable to the weights' scale)
    d01 = sum(float((res.vertices[1][n] - res.vertices[0][n]).norm() ** 2) for n in before) ** 0.5
    assert d01 > 0.05 * sum(float(t.norm() ** 2) for t in before.values()) ** 0.5
    with pytest.raises(GradlabError, match="vertices"):
        train_simplex(model, x, y, vertices=1)


def test_curve_points_and_barrier():
    a = {"w": torch.tensor([0.0, 0.0])}
    b = {"w": torch.tensor([2.0, 0.0])}
    th = {"w": torch.tensor([1.0, 2.0])}
    for kind in ("bezier", "polychain"):
        torch.testing.assert_close(curve_point(kind, 0.0, a, b, th)["w"], a["w"])
        torch.testing.assert_close(curve_point(kind, 1.0, a, b, th)["w"], b["w"])
    torch.testing.assert_close(curve_point("bezier", 0.5, a, b, th)["w"], torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(curve_point("polychain", 0.5, a, b, th)["w"], th["w"])
    torch.testing.assert_close(curve_point("polychain", 0.25, a, b, th)["w"], torch.tensor([0.5, 1.0]))
    assert barrier([0, 0.5, 1], [1.0, 3.0, 2.0]) == pytest.approx(1.5)
    with pytest.raises(GradlabError, match="bezier"):
        curve_point("spline", 0.5, a, b, th)


def test_recompute_bn_is_the_exact_batch_statistics():
    x, y = blobs(64)
    model = tiny_net(0, bn=True).double().eval()
    params = {n: t.double() for n, t in weights_of(model).items()}
    bufs = recompute_bn(model, params, [(x.double(), y)])
    h = model[0](x.double()).detach()
    torch.testing.assert_close(bufs["1.running_mean"], h.mean(0))
    torch.testing.assert_close(bufs["1.running_var"], h.var(0, unbiased=True))
    # the model's own statistics are untouched
    assert torch.equal(model[1].running_mean, torch.zeros(16, dtype=torch.float64))
    assert model[1].momentum == 0.1


def test_connect_curve_lowers_the_barrier():
    x, y = blobs(seed=3)
    a = fit(tiny_net(1, bn=True), x, y)
    b = fit(tiny_net(2, bn=True), x, y)
    wa, wb = weights_of(a), weights_of(b)
    bend, hist = train_curve(a, wa, wb, x, y, kind="bezier", epochs=20, lr=0.05, batch_size=60, seed=0)
    assert len(hist) == 20
    table, m = evaluate_paths(a, wa, wb, bend, [(x, y)], [(x, y)], kind="bezier", points=11)
    assert list(table.columns)[:5] == ["t", "loss", "acc", "line_loss", "line_acc"]
    # the endpoints of both paths are the two networks (with their BN statistics recomputed)
    assert table["loss"].iloc[0] == pytest.approx(table["line_loss"].iloc[0], rel=1e-9)
    assert table["loss"].iloc[-1] == pytest.approx(evaluate_at(a, wb, [(x, y)])[0], rel=1e-9)
    assert m["barrier"] < m["line_barrier"]
    assert m["barrier"] < 0.25


# --- the commands, through the real entry point ------------------------------------------------
import pandas as pd  # noqa: E402

from clihelp import cli  # noqa: E402


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two tiny MLPs on 400 digits (seeds 0 and 1)."""
    from gradlab_cli.main import main

    runs = tmp_path_factory.mktemp("runs")
    for seed in (0, 1):
        try:
            main(["train", "--runs-dir", str(runs), "--model", "mlp", "--width", "32", "--epochs", "2",
                  "--seed", str(seed), "--name", f"s{seed}", "--set", "max_train=400", "--quiet"])
        except SystemExit as e:
            assert e.code in (0, None)
    return runs, sorted(p for p in runs.iterdir() if p.is_dir())


def test_simplex_command_and_plane(two_runs, capsys):
    runs, (a, _) = two_runs
    r = cli(capsys, "simplex", "--runs-dir", runs, "--run", a, "--vertices", 3, "--epochs", 1, "--samples", 3,
            "--quiet")
    assert r.code == 0, r.err
    df = pd.read_csv(r.run_path / "simplex.csv")
    assert list(df["kind"]) == ["vertex"] * 3 + ["centre"] + ["sample"] * 3 + ["ensemble"]
    summ = pd.read_csv(r.run_path / "summary.csv")
    assert summ["volume"].iloc[0] > 0
    saved = torch.load(r.run_path / "simplex.pt", weights_only=True)
    assert len(saved["vertices"]) == 3
    plane = cli(capsys, "probe", "landscape", "--runs-dir", runs, "--run", r.run_path, "--plane-vertices", "0,1,2",
                "--steps", 3, "--batches", 1, "--quiet")
    assert plane.code == 0, plane.err
    bad = cli(capsys, "probe", "landscape", "--runs-dir", runs, "--run", r.run_path, "--plane-vertices", "0,1,5")
    assert bad.code == 2 and "out of range" in bad.err
    bad = cli(capsys, "simplex", "--runs-dir", runs, "--run", a, "--vertices", 1)
    assert bad.code == 2 and "vertices" in bad.err


def test_connect_command(two_runs, capsys):
    runs, (a, b) = two_runs
    r = cli(capsys, "connect", a, b, "--runs-dir", runs, "--curve", "polychain", "--epochs", 1, "--points", 5,
            "--quiet")
    assert r.code == 0, r.err
    df = pd.read_csv(r.run_path / "connect.csv")
    assert list(df.columns[:5]) == ["t", "loss", "acc", "line_loss", "line_acc"] and len(df) == 5
    summ = pd.read_csv(r.run_path / "summary.csv")
    assert {"barrier", "line_barrier"} <= set(summ.columns)
    bad = cli(capsys, "connect", a, b, "--runs-dir", runs, "--curve", "spline")
    assert bad.code == 2 and "bezier, polychain" in bad.err
