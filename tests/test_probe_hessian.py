"""The Hessian probe and the critical-point classification, against dense float64 references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradlab.curvature import dense_hessian
from gradlab.core.errors import GradlabError
from gradlab.probes import PROBES
from gradlab.probes.critical import classify_function, classify_point
from gradlab.probes.hessian import FRAME_COLUMNS, as_batches, hessian_probe, quick_curvature


def tiny_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def tiny_data(n: int = 30, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 5, dtype=torch.float64, generator=g), torch.randint(0, 3, (n,), generator=g)


# ------------------------------------------------------------------ classification
ORIGIN = torch.zeros(2, dtype=torch.float64)


@pytest.mark.parametrize(
    "fn, point, kind",
    [
        (lambda v: v[0] ** 2 + v[1] ** 2, ORIGIN, "minimum"),
        (lambda v: v[0] ** 2 - v[1] ** 2, ORIGIN, "saddle"),
        (lambda v: -v[0] ** 2 - v[1] ** 2, ORIGIN, "maximum"),
        (lambda v: v[0] ** 4, ORIGIN[:1], "degenerate"),
        (lambda v: v[0] ** 4 + v[1] ** 2, ORIGIN, "degenerate"),
        (lambda v: v[0] ** 2 + v[1] ** 2, torch.tensor([1.0, 0.5], dtype=torch.float64), "not-critical"),
    ],
)
def test_classification_of_known_functions(fn, point, kind):
    assert classify_function(fn, point).kind == kind


def test_saddle_reports_negative_count_and_ratio():
    c = classify_function(lambda v: v[0] ** 2 - 3 * v[1] ** 2 - 0.5 * v[2] ** 2, torch.zeros(3, dtype=torch.float64))
    assert c.kind == "saddle" and c.num_negative == 2 and c.num_positive == 1
    assert c.neg_pos_ratio == pytest.approx(3.0)  # |lambda_min| / lambda_max = 6 / 2


def test_not_critical_still_describes_curvature():
    c = classify_function(lambda v: v[0] ** 2 - v[1] ** 2, torch.tensor([0.3, 0.0], dtype=torch.float64))
    assert c.kind == "not-critical" and c.curvature == "saddle" and c.grad_norm == pytest.approx(0.6)


def test_thresholds_are_arguments():
    assert classify_point(5e-3, [2.0], [1.0]).kind == "not-critical"
    assert classify_point(5e-3, [2.0], [1.0], grad_tol=1e-2).kind == "minimum"
    # an eigenvalue's sign counts only beyond its error bound
    assert classify_point(0.0, [2.0], [-1e-4], bottom_errors=[2e-4]).kind == "degenerate"
    assert classify_point(0.0, [2.0], [-1e-4], bottom_errors=[1e-6]).kind == "saddle"
    assert classify_point(0.0, [2.0]).kind == "unknown"  # lambda_min not computed


# ------------------------------------------------------------------ the probe
def test_probe_matches_dense_reference():
    model = tiny_net()
    x, y = tiny_data()
    batches = as_batches(x, y, batch_size=8, num_batches=None)  # 8+8+8+6: size-weighted mean
    H = dense_hessian(model, None, (x, y))
    ev = torch.linalg.eigvalsh(H)
    rep = hessian_probe(model, batches, top_k=3, bottom_k=2, trace=True, density=True, tol=1e-3, lr=0.1,
                        trace_method="xtrace", trace_matvecs=40)
    assert rep.top_converged and rep.bottom_converged
    assert torch.allclose(torch.tensor(rep.top, dtype=torch.float64), ev.flip(0)[:3], rtol=1e-4)
    assert torch.allclose(torch.tensor(rep.bottom, dtype=torch.float64), ev[:2], rtol=1e-4)
    assert abs(rep.trace - float(ev.sum())) <= 4 * rep.trace_stderr + 1e-9
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))])
    assert rep.grad_norm == pytest.approx(float(g.norm()), rel=1e-10)
    assert rep.loss == pytest.approx(float(F.cross_entropy(model(x), y)), rel=1e-12)
    assert rep.stability_bound == pytest.approx(2 / float(ev[-1]), rel=1e-4)
    assert rep.num_params == H.shape[0] and rep.num_samples == 30 and rep.mode == "eval"
    assert rep.classification.kind == "not-critical"  # an untrained net: the gradient is large
    assert all(p.grad is None for p in model.parameters())


def test_lr_above_bound_is_flagged():
    model = tiny_net()
    batch = tiny_data()
    rep = hessian_probe(model, batch, top_k=1, bottom_k=0, trace=False)
    assert not hessian_probe(model, batch, top_k=1, bottom_k=0, trace=False, lr=0.5 * rep.stability_bound).lr_above_bound
    assert hessian_probe(model, batch, top_k=1, bottom_k=0, trace=False, lr=2 * rep.stability_bound).lr_above_bound


def test_probe_classifies_a_trained_minimum():
    # full-batch training to a tiny gradient on separable data: a minimum (or degenerate one)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 3)).double()
    x = torch.randn(20, 2, dtype=torch.float64)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 1).long()
    loss_fn = lambda out, t: F.cross_entropy(out, t) + 0.05 * sum((p**2).sum() for p in model.parameters())  # noqa: E731
    opt = torch.optim.LBFGS(model.parameters(), max_iter=200, tolerance_grad=1e-12, tolerance_change=0)
    opt.step(lambda: _closure(opt, model, loss_fn, x, y))
    for p in model.parameters():
        p.grad = None
    rep = hessian_probe(model, (x, y), top_k=2, bottom_k=2, trace=False, loss_fn=loss_fn, tol=1e-6)
    assert rep.grad_norm < 1e-6
    assert rep.classification.kind == "minimum"  # weight decay makes the Hessian positive definite


def _closure(opt, model, loss_fn, x, y):
    opt.zero_grad()
    loss = loss_fn(model(x), y)
    loss.backward()
    return loss


def test_to_frame_columns_and_rows():
    rep = hessian_probe(tiny_net(), tiny_data(), top_k=2, bottom_k=1, trace=True, density=True,
                        density_starts=2, density_steps=10, trace_matvecs=10)
    df = rep.to_frame()
    assert list(df.columns) == FRAME_COLUMNS
    assert set(df["kind"]) == {"eigenvalue", "trace", "density", "morse_index", "morse_index_low", "morse_index_high",
                               "morse_index_error"}
    eig = df[df.kind == "eigenvalue"]
    assert list(eig["index"]) == [1, 2, -1] and list(eig["value"]) == rep.top + rep.bottom
    assert df[df.kind == "trace"]["stderr"].iloc[0] == pytest.approx(rep.trace_stderr)
    assert (df[df.kind == "density"]["value"] >= 0).all() and len(rep.density_frame()) == len(rep.density.grid)


def test_default_trace_is_gauss_newton():
    """``auto``: exact on a ReLU net, an estimate within its stderr on a tanh net (one hidden layer:
    its residual is diagonal in feature space, so the estimate is exact there too)."""
    x, y = tiny_data()
    relu = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 7), nn.ReLU(), nn.Linear(7, 3)).double()
    tanh = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    for model, method in ((relu, "gauss-newton (exact)"), (tanh, "gauss-newton"), (tiny_net(), "gauss-newton")):
        exact = float(torch.trace(dense_hessian(model, None, (x, y))))
        rep = hessian_probe(model, (x, y), top_k=1, bottom_k=0, trace=True, trace_matvecs=30)
        assert rep.trace_method == method
        assert abs(rep.trace - exact) <= 4 * rep.trace_stderr + 1e-9 * abs(exact)


def test_quick_curvature_matches_dense():
    model = tiny_net()
    model.train()
    batch = tiny_data()
    ev = torch.linalg.eigvalsh(dense_hessian(model, F.cross_entropy, batch))
    lam, tr = quick_curvature(model, F.cross_entropy, batch, trace_matvecs=60)
    assert lam == pytest.approx(float(ev[-1]), rel=1e-4)
    assert abs(tr - float(ev.sum())) < 0.5 * float(ev.abs().sum())
    assert model.training and all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize(
    "kwargs, match",
    [({"top_k": 0}, "invalid top_k"), ({"bottom_k": -1}, "invalid bottom_k"), ({"tol": 0}, "invalid tol"),
     ({"trace_method": "exact"}, "unknown trace method"), ({"lr": -1.0}, "invalid lr"),
     ({"top_k": 1000}, "only"), ({"mode": "infer"}, "unknown mode")],
)
def test_bad_values_raise_gradlab_error(kwargs, match):
    with pytest.raises(GradlabError, match=match):
        hessian_probe(tiny_net(), tiny_data(), **{"trace": False, **kwargs})


def test_registered():
    from gradlab.probes.hessian import HessianProbe

    assert PROBES.get("hessian") is HessianProbe
    assert PROBES.entry("hessian").options["top_k"].default == 5


# ------------------------------------------------------------------ CLI
TINY = ["--width", "12", "--depth", "1", "--batches", "1", "--batch-size", "64", "--top-k", "2",
        "--trace-matvecs", "8", "--quiet"]


def test_cli_fresh_model_writes_outputs(capsys, tmp_path):
    import pandas as pd
    from clihelp import cli

    r = cli(capsys, "probe", "hessian", "--runs-dir", tmp_path, "--density", "--lr", "1000", *TINY)
    assert r.code == 0, r.err
    out = r.run_path
    df = pd.read_csv(out / "hessian.csv")
    assert list(df.columns) == FRAME_COLUMNS and set(df["kind"]) == {
        "eigenvalue", "trace", "density", "morse_index", "morse_index_low", "morse_index_high", "morse_index_error"}
    assert (out / "plots" / "hessian_density.png").is_file() and (out / "hessian_density.csv").is_file()
    assert "ABOVE the gradient-descent stability bound" in r.out
    assert "point: not-critical" in r.out
    summary = pd.read_csv(out / "summary.csv")
    assert summary["lambda_max"].iloc[0] == pytest.approx(df[(df.kind == "eigenvalue") & (df["index"] == 1)]["value"].iloc[0])


def test_cli_trained_run_uses_its_lr(capsys, tmp_path):
    from clihelp import cli

    r = cli(capsys, "train", "--runs-dir", tmp_path, "--epochs", "1", "--width", "12", "--depth", "1",
            "--opt", "sgd", "--lr", "0.05", "--set", "max_train=200", "--quiet")
    assert r.code == 0, r.err
    r = cli(capsys, "probe", "hessian", "--runs-dir", tmp_path, "--run", "last", "--batches", "1",
            "--batch-size", "64", "--top-k", "1", "--no-trace", "--quiet")
    assert r.code == 0, r.err
    assert "lr 0.05 is below the bound" in r.out


@pytest.mark.parametrize(
    "args, match",
    [(["--top-k", "0"], "invalid top_k: 0"), (["--tol", "0"], "invalid tol"), (["--batches", "-1"], "invalid batches"),
     (["--batches", "x"], "Invalid value for '--batches'"), (["--backend", "magic"], "invalid backend: 'magic'"),
     (["--mode", "test"], "invalid mode: 'test'")],
)
def test_cli_bad_values_exit_2_with_one_line(capsys, tmp_path, args, match):
    from clihelp import cli

    r = cli(capsys, "probe", "hessian", "--runs-dir", tmp_path, *args)
    assert r.code == 2 and match in r.err and len(r.err.strip().splitlines()) == 1


def test_cli_run_without_checkpoint_is_an_error(capsys, tmp_path):
    from clihelp import cli

    bad = tmp_path / "20260101-000000-train"
    bad.mkdir()
    (bad / "config.yaml").write_text("model: mlp\n")
    r = cli(capsys, "probe", "hessian", "--runs-dir", tmp_path, "--run", bad)
    assert r.code == 2 and "checkpoint" in r.err


def test_exact_mode_equals_dense_and_refuses_large_models():
    model, (x, y) = tiny_net(), tiny_data()
    ev = torch.linalg.eigvalsh(dense_hessian(model, None, (x, y)))
    rep = hessian_probe(model, [(x[:10], y[:10]), (x[10:], y[10:])], top_k=2, bottom_k=1, exact=True)
    assert rep.top == pytest.approx(ev.flip(0)[:2].tolist(), rel=1e-10) and rep.bottom[0] == pytest.approx(float(ev[0]))
    assert rep.trace == pytest.approx(float(ev.sum()), rel=1e-10) and rep.trace_stderr == 0.0
    with pytest.raises(GradlabError, match="too large"):
        hessian_probe(model, (x, y), exact=True, dense_max=10)


def test_cli_exact_too_large_is_an_error(capsys, tmp_path):
    from clihelp import cli

    r = cli(capsys, "probe", "hessian", "--runs-dir", tmp_path, "--exact", "--dense-max", "100", *TINY)
    assert r.code == 2 and "too large" in r.err and len(r.err.strip().splitlines()) == 1
