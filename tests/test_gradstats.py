"""Per-example gradients and the gradient statistics built on them, against plain loops and
explicit float64 formulas; the `gradstats` probe through the CLI and during training."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradlab.curvature.per_example import per_example_grads
from gradlab.probes.gradstats import batch_statistics, gradient_statistics, grouped, layer_of


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4)).double()


class _NeedsItem(nn.Module):
    """A data-dependent branch (``.item()``): vmap cannot batch it, the loop can."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 3)

    def forward(self, x):
        return self.lin(x) * (2.0 if x.sum().item() > 0 else 1.0)


def _reference(model, x, y):
    """One backward pass per example, through .grad."""
    rows = {n: [] for n, _ in model.named_parameters()}
    for i in range(len(x)):
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        for n, p in model.named_parameters():
            rows[n].append(p.grad.clone())
    model.zero_grad()
    return {n: torch.stack(r) for n, r in rows.items()}


@pytest.mark.parametrize("make, shape", [(_mlp, (6, 5)), (_cnn, (6, 1, 6, 6))])
@pytest.mark.parametrize("method, chunk", [("vmap", None), ("vmap", 4), ("loop", None)])
def test_per_example_grads_match_a_backward_per_example(make, shape, method, chunk):
    model = make()
    torch.manual_seed(1)
    x, y = torch.randn(*shape, dtype=torch.float64), torch.randint(0, 3, (shape[0],))
    got = per_example_grads(model, F.cross_entropy, x, y, chunk_size=chunk, method=method)
    want = _reference(model, x, y)
    assert list(got) == list(want)
    for n in want:
        assert got[n].shape == want[n].shape
        torch.testing.assert_close(got[n], want[n], rtol=1e-10, atol=1e-12)
    # their mean is the mini-batch gradient
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n].mean(0), p.grad, rtol=1e-10, atol=1e-12)
        assert p.grad is not None
    model.zero_grad()


def test_per_example_grads_fall_back_to_the_loop_where_vmap_cannot_go():
    torch.manual_seed(0)
    model = _NeedsItem().double()
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 3, (4,))
    with pytest.raises(RuntimeError):
        per_example_grads(model, F.cross_entropy, x, y, method="vmap")
    got = per_example_grads(model, F.cross_entropy, x, y)  # auto
    want = _reference(model, x, y)
    for n in want:
        torch.testing.assert_close(got[n], want[n])
    with pytest.raises(ValueError, match="method"):
        per_example_grads(model, F.cross_entropy, x, y, method="fast")


def test_a_parameter_subset_leaves_the_others_out():
    model = _mlp()
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 3, (4,))
    last = list(model[2].parameters())
    got = per_example_grads(model, F.cross_entropy, x, y, params=last)
    assert list(got) == ["2.weight", "2.bias"]
    want = _reference(model, x, y)
    torch.testing.assert_close(got["2.weight"], want["2.weight"])


def test_statistics_match_their_formulas_in_float64():
    rng = np.random.default_rng(0)
    g_i = rng.normal(0.3, 1.0, size=(9, 11))
    b = len(g_i)
    g = g_i.mean(0)
    g2 = g @ g
    cov = np.cov(g_i, rowvar=False, ddof=1)  # the sample covariance, explicitly
    v = g_i @ g
    got = gradient_statistics(torch.tensor(g_i), theta=0.5)
    assert got["grad_sq_norm"] == pytest.approx(g2, rel=1e-12)
    assert got["variance"] == pytest.approx(np.trace(cov), rel=1e-12)
    assert got["snr"] == pytest.approx(g2 / (np.trace(cov) / b), rel=1e-12)
    assert got["b_simple"] == pytest.approx(np.trace(cov) / (g2 - np.trace(cov) / b), rel=1e-12)
    assert got["norm_test"] == pytest.approx(math.sqrt(np.trace(cov) / (b * g2)), rel=1e-12)
    assert got["norm_test_batch"] == pytest.approx(np.trace(cov) / (0.25 * g2), rel=1e-12)
    assert got["inner_product_test"] == pytest.approx(math.sqrt(np.var(v, ddof=1) / (b * g2 ** 2)), rel=1e-12)
    resid = g_i - np.outer(v / g2, g)
    assert got["orthogonality_test"] == pytest.approx(
        math.sqrt(np.sum(resid ** 2) / (b - 1) / (b * g2)), rel=1e-12)
    # the norm test's suggested batch size at theta = its own statistic is this batch size
    at_own = gradient_statistics(torch.tensor(g_i), theta=got["norm_test"])
    assert at_own["norm_test_batch"] == pytest.approx(b, rel=1e-12)


def test_b_simple_estimates_the_noise_scale_of_a_known_distribution():
    """g_i = G + N(0, s^2 I): tr(Sigma) / |G|^2 = n s^2 / |G|^2 (McCandlish et al. 2018)."""
    torch.manual_seed(0)
    n, s = 20, 0.5
    G = torch.full((n,), 0.1, dtype=torch.float64)
    true = n * s ** 2 / float(G @ G)  # 25
    got = gradient_statistics(G + s * torch.randn(40000, n, dtype=torch.float64))
    assert got["b_simple"] == pytest.approx(true, rel=0.1)
    # pure noise: |G|^2 cannot be told from zero, the noise scale is not finite
    noise = gradient_statistics(s * torch.randn(50, n, dtype=torch.float64))
    assert noise["b_simple"] == math.inf or noise["b_simple"] > 50


def test_layers_group_a_modules_parameters():
    assert layer_of("blocks.0.weight") == "blocks.0" and layer_of("scale") == "scale"
    grads = {"a.weight": torch.ones(3, 2, 2), "a.bias": torch.ones(3, 2), "b.weight": torch.ones(3, 5)}
    groups = grouped(grads)
    assert {k: tuple(v.shape) for k, v in groups.items()} == {"a": (3, 6), "b": (3, 5)}
    model = _mlp()
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 3, (8,))
    stats = batch_statistics(model, F.cross_entropy, x, y)
    assert list(stats) == ["all", "0", "2"]
    # the whole model's statistics (from the layers' moments) are those of all gradients side by side
    whole = gradient_statistics(torch.cat([g.reshape(8, -1) for g in per_example_grads(
        model, F.cross_entropy, x, y).values()], 1))
    assert stats["all"] == pytest.approx(whole, rel=1e-10)
    # the whole-model variance is the sum of the layers' (a trace adds up over blocks)
    assert stats["all"]["variance"] == pytest.approx(stats["0"]["variance"] + stats["2"]["variance"], rel=1e-12)


TINY = ["--depth", "2", "--width", "8", "--batches", "2", "--batch-size", "32", "--quiet"]


def test_cli_gradstats_writes_a_row_per_layer(tmp_path, capsys):
    import pandas as pd

    from clihelp import cli

    r = cli(capsys, "probe", "gradstats", "--runs-dir", tmp_path, *TINY)
    assert r.code == 0, r.err
    table = pd.read_csv(r.run_path / "gradstats.csv")
    assert table["layer"].iloc[0] == "all" and len(table) >= 3
    assert {"variance", "snr", "b_simple", "norm_test", "inner_product_test", "orthogonality_test",
            "variance_std"} <= set(table.columns)
    assert (table["variance"] > 0).all()
    summary = pd.read_csv(r.run_path / "summary.csv")
    assert summary["gradstats_b_simple"].iloc[0] == pytest.approx(table["b_simple"].iloc[0])
    r = cli(capsys, "probe", "gradstats", "--runs-dir", tmp_path, *TINY, "--theta", "0")
    assert r.code == 2 and "theta" in r.err


def test_gradstats_runs_during_training(tmp_path, capsys):
    import pandas as pd

    from clihelp import cli

    r = cli(capsys, "train", "--runs-dir", tmp_path, "--epochs", "1", "--width", "8", "--set", "max_train=256",
            "--probe", "gradstats:every=2", "--quiet")
    assert r.code == 0, r.err
    m = pd.read_csv(r.run_path / "metrics.csv")
    rows = m[m["metric"] == "b_simple"]
    assert len(rows) >= 2 and rows["step"].is_monotonic_increasing
    assert set(m["metric"]) >= {"snr", "norm_test", "inner_product_test", "orthogonality_test"}

