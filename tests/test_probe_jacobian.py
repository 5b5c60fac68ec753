"""jacobian_probe against dense float64 references (autograd.functional.jacobian, svdvals, eigvals)."""

import math

import pytest
import torch
from torch import nn
from torch.autograd.functional import jacobian as dense_jacobian

from gradlab.curvature.batched import batched_lanczos
from gradlab.core.errors import GradlabError
from gradlab.models.base import GradlabNet, Normalize
from gradlab.probes.jacobian import jacobian_probe


def mlp(widths, act=nn.Tanh, seed=0, residual=False):
    torch.manual_seed(seed)
    blocks = []
    for a, b in zip(widths[:-2], widths[1:-1]):
        lin = nn.Linear(a, b)
        blocks.append(_Res(nn.Sequential(lin, act())) if residual else nn.Sequential(lin, act()))
    head = nn.Linear(widths[-2], widths[-1])
    return GradlabNet(Normalize([0.3], [0.2]), blocks, head).double()


class _Res(nn.Module):
    def __init__(self, body):
        super().__init__()
        self.body = body

    def forward(self, h):
        return h + 0.1 * self.body(h)


class _Conv(nn.Module):
    """Tiny conv net in GradlabNet form: (B, 2, 5, 5) inputs, per-channel normalisation, BatchNorm."""

    @staticmethod
    def build():
        torch.manual_seed(0)
        blocks = [nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU()),
                  nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.Tanh())]
        head = nn.Sequential(nn.Flatten(), nn.Linear(75, 4))
        net = GradlabNet(Normalize([0.4, 0.5], [0.2, 0.3]), blocks, head).double()
        bn = blocks[0][1]
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        return net


def _x(shape, seed=1):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _reference(fn, x):
    """Per-example dense Jacobians by a plain loop over torch.autograd.functional.jacobian."""
    out = []
    for n in range(x.shape[0]):
        j = dense_jacobian(lambda xi: fn(xi.unsqueeze(0)).squeeze(0), x[n])
        out.append(j.reshape(j.shape[: fn(x[:1]).ndim - 1].numel(), -1))
    return torch.stack(out)


@pytest.mark.parametrize("pixel_space", [False, True])
def test_dense_per_example_jacobians_and_singular_values(pixel_space):
    model = mlp([6, 7, 5, 3])
    x = _x((4, 6))
    rep = jacobian_probe(model, x, pixel_space=pixel_space, method="dense", keep_jacobians=True)
    assert [ls.name for ls in rep.layers] == ["input-output", "blocks.0", "blocks.1", "head"]
    io_fn = model if pixel_space else (lambda h: model.forward_from(h, 0))
    io_in = x if pixel_space else model.normalize(x)
    ref = _reference(io_fn, io_in)
    torch.testing.assert_close(rep.layers[0].jacobian, ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(rep.layers[0].singular_values, torch.linalg.svdvals(ref), rtol=1e-10, atol=1e-13)
    acts = model.block_inputs(x)
    for ls, mod, h in zip(rep.layers[1:], list(model.blocks) + [model.head], acts):
        ref = _reference(mod, h)
        torch.testing.assert_close(ls.jacobian, ref, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(ls.singular_values, torch.linalg.svdvals(ref), rtol=1e-10, atol=1e-13)


def test_pixel_space_is_normalized_jacobian_scaled_by_inverse_std():
    model = mlp([6, 5, 3])
    x = _x((3, 6))
    norm = jacobian_probe(model, x, method="dense", per_layer=False, keep_jacobians=True).layers[0]
    pix = jacobian_probe(model, x, method="dense", per_layer=False, pixel_space=True, keep_jacobians=True).layers[0]
    torch.testing.assert_close(pix.jacobian, norm.jacobian / model.normalize.std, rtol=1e-12, atol=0)


def test_conv_blocks_with_batchnorm_in_eval_mode():
    model = _Conv.build().train()
    x = _x((3, 2, 5, 5))
    rep = jacobian_probe(model, x, method="dense", keep_jacobians=True)
    assert all(m.training for m in model.modules())  # flags restored
    model.eval()
    acts = model.block_inputs(x)
    ref_io = _reference(lambda h: model.forward_from(h, 0), acts[0])
    torch.testing.assert_close(rep.layers[0].jacobian, ref_io, rtol=1e-12, atol=1e-14)
    ref_b0 = _reference(model.blocks[0], acts[0])  # (3, 75, 50)
    torch.testing.assert_close(rep.layers[1].jacobian, ref_b0, rtol=1e-12, atol=1e-14)
    ref_b1 = _reference(model.blocks[1], acts[1])  # square (75, 75)
    radius = torch.linalg.eigvals(ref_b1).abs().amax(-1)
    torch.testing.assert_close(rep.layers[2].spectral_radius, radius, rtol=1e-10, atol=1e-13)
    assert rep.layers[1].spectral_radius is None


def test_summary_statistics_match_hand_computation():
    model = mlp([6, 6, 6, 4])
    x = _x((5, 6))
    rep = jacobian_probe(model, x, method="dense")
    spectra, summary = rep.to_frames()
    assert list(spectra.columns) == ["layer", "example", "index", "singular_value"]
    assert len(spectra) == 5 * (4 + 6 + 6 + 4)
    assert list(summary["layer"]) == ["input-output", "blocks.0", "blocks.1", "head"]
    s = rep.layers[0].singular_values  # (5, 4)
    row = summary.iloc[0]
    assert row["mean_sq_sv"] == pytest.approx((s**2).mean().item(), rel=1e-12)
    assert row["var_sq_sv"] == pytest.approx(torch.stack([(e**2).var(unbiased=False) for e in s]).mean().item(), rel=1e-12)
    assert row["max_sv"] == pytest.approx(s[:, 0].mean().item(), rel=1e-12)
    assert row["min_sv"] == pytest.approx(s[:, -1].mean().item(), rel=1e-12)
    assert row["condition_number"] == pytest.approx((s[:, 0] / s[:, -1]).mean().item(), rel=1e-12)
    assert row["frac_near_one"] == pytest.approx(((s - 1).abs() <= 0.1).double().mean().item())
    assert math.isnan(row["cum_spectral_norm"]) and math.isnan(row["spectral_radius"])
    # cumulative product of spectral norms, per example, bounds the end-to-end spectral norm
    tops = torch.stack([ls.singular_values[:, 0] for ls in rep.layers[1:]])  # (3, 5)
    cum = torch.cumprod(tops, 0).mean(1)
    torch.testing.assert_close(torch.tensor(summary["cum_spectral_norm"].iloc[1:].to_numpy()), cum, rtol=1e-12, atol=0)
    assert bool((torch.cumprod(tops, 0)[-1] >= s[:, 0] * (1 - 1e-12)).all())
    metrics = rep.metrics()
    assert metrics["io_mean_sq_sv"] == row["mean_sq_sv"]


def test_orthogonal_linear_network_is_isometric():
    torch.manual_seed(0)
    blocks = []
    for _ in range(6):
        lin = nn.Linear(8, 8, bias=False).double()
        nn.init.orthogonal_(lin.weight)
        blocks.append(lin)
    head = nn.Linear(8, 8, bias=False).double()
    nn.init.orthogonal_(head.weight)
    model = GradlabNet(Normalize([0.0], [1.0]), blocks, head).double()
    summary = jacobian_probe(model, _x((3, 8)), method="dense").summary()
    # input-output, hidden-to-hidden (blocks.1..5: a product of orthogonal maps), 6 blocks, head
    assert summary["layer"].tolist()[:2] == ["input-output", "hidden-to-hidden"]
    assert summary["frac_near_one"].tolist() == [1.0] * 9
    assert summary["var_sq_sv"].abs().max() < 1e-10
    assert summary["spectral_radius"].iloc[1:].sub(1).abs().max() < 1e-6


def test_residual_blocks_are_near_identity():
    summary = jacobian_probe(mlp([6, 6, 6, 6, 6, 3], residual=True), _x((4, 6)), method="dense").summary()
    blocks = summary[summary["layer"].str.startswith("blocks")]
    assert (blocks["max_sv"] < 1.15).all() and (blocks["min_sv"] > 0.85).all()


def test_lanczos_agrees_with_dense():
    model = mlp([12, 20, 20, 15, 3])
    x = _x((4, 12))
    dense = jacobian_probe(model, x, method="dense")
    lanc = jacobian_probe(model, x, method="lanczos", k=4, n_probes=64, seed=3)
    for d, l in zip(dense.layers, lanc.layers):
        assert l.method == "lanczos" and l.converged, l.name
        torch.testing.assert_close(l.singular_values, d.singular_values[:, :4], rtol=1e-7, atol=1e-10)
        # Hutchinson moments are estimates: loose but real agreement
        ds, ls_ = d.stats(), l.stats()
        assert ls_["mean_sq_sv"] == pytest.approx(ds["mean_sq_sv"], rel=0.3), l.name
        assert math.isnan(ls_["min_sv"]) and math.isnan(ls_["condition_number"])


def test_auto_switches_to_lanczos_on_large_maps():
    model = mlp([12, 20, 20, 3])
    rep = jacobian_probe(model, _x((2, 12)), method="auto", max_dense=2 * 20 * 12, k=3)
    assert [ls.method for ls in rep.layers] == ["dense", "dense", "lanczos", "dense"]


def test_lanczos_finds_repeated_and_known_eigenvalues():
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(2, 30, 30, dtype=torch.float64))
    eig = torch.tensor([[5.0, 5.0, 5.0, 2.0] + [1.0] * 26, [9.0, 4.0, 1.0, 0.5] + [0.0] * 26], dtype=torch.float64)
    mats = q @ torch.diag_embed(eig) @ q.transpose(1, 2)
    res = batched_lanczos(lambda v: (mats @ v.unsqueeze(-1)).squeeze(-1), torch.randn(2, 30, dtype=torch.float64), 4, tol=1e-12)
    top, ok, iters = res.eigenvalues, bool(res.converged.all()), res.products
    assert ok and iters <= 30
    torch.testing.assert_close(top, eig[:, :4], rtol=1e-9, atol=1e-9)


def test_model_state_untouched_and_bad_input():
    model = mlp([6, 5, 3]).train()
    x = _x((2, 6))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    jacobian_probe(model, x)
    assert all(m.training for m in model.modules()) and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(GradlabError, match="unknown layer 'blocks.7'.*blocks.0, head"):
        jacobian_probe(model, x, layers=["blocks.7"])
    with pytest.raises(GradlabError, match="unknown method 'svd'"):
        jacobian_probe(model, x, method="svd")
    with pytest.raises(GradlabError, match="invalid k"):
        jacobian_probe(model, x, k=0)

    class TupleOut(nn.Module):
        def forward(self, x):
            return x, x

    with pytest.raises(GradlabError, match="not a tensor"):
        jacobian_probe(TupleOut(), x)
    sub = jacobian_probe(model, x, layers=["head"])
    assert [ls.name for ls in sub.layers] == ["input-output", "head"]


def test_plain_module_gets_input_output_only_with_a_note():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x = _x((3, 6))
    rep = jacobian_probe(model, x, keep_jacobians=True)
    assert [ls.name for ls in rep.layers] == ["input-output"] and len(rep.notes) == 2
    torch.testing.assert_close(rep.layers[0].jacobian, _reference(model, x), rtol=1e-12, atol=1e-14)


def test_gain_rate_verdict():
    model = mlp([6, 6, 6, 6, 4])
    rep = jacobian_probe(model, _x((3, 6)), method="dense")
    # the verdict rests on the square hidden maps: blocks.0-2 (6x6), not the 6 -> 4 head
    chi = [ls.stats()["mean_sq_sv"] for ls in rep.layers if ls.depth is not None and ls.in_dim == ls.out_dim]
    assert len(chi) == 3
    rate, verdict = rep.gain_rate(0.1)
    assert rate == pytest.approx(math.prod(chi) ** (0.5 / len(chi)), rel=1e-12)
    assert verdict == ("vanishing" if rate < 1 / 1.1 else "exploding" if rate > 1.1 else "stable")
    big = mlp([6, 6, 6, 6, 4])
    with torch.no_grad():
        for b in big.blocks:
            b[0].weight.mul_(10.0)
    assert jacobian_probe(big, _x((3, 6)), method="dense").gain_rate()[1] == "exploding"


# --- CLI: `gradlab probe jacobian` through the real entry point ------------------------------


def test_cli_jacobian_on_a_trained_run(tmp_path, capsys):
    import pandas as pd

    from clihelp import cli

    r = cli(capsys, "train", "--runs-dir", tmp_path, "--depth", "2", "--width", "8", "--epochs", "1",
            "--set", "max_train=200", "--quiet")
    assert r.code == 0, r.err
    r = cli(capsys, "probe", "jacobian", "--runs-dir", tmp_path, "--run", "last", "--examples", "4", "--quiet")
    assert r.code == 0, r.err
    path = r.run_path
    spectra = pd.read_csv(path / "jacobian.csv")
    summary = pd.read_csv(path / "jacobian_summary.csv")
    assert list(spectra.columns) == ["layer", "example", "index", "singular_value"]
    assert list(summary["layer"]) == ["input-output", "blocks.0", "blocks.1", "head"]
    assert len(spectra) == 4 * (10 + 8 + 8 + 8)  # digits: 64 inputs, 10 classes, width 8
    for png in ("jacobian_spectra.png", "jacobian_depth.png"):
        assert (path / "plots" / png).stat().st_size > 0
    s = pd.read_csv(path / "summary.csv")
    assert s.loc[0, "status"] == "completed" and s.loc[0, "source_run"].endswith("-train")
    assert "input-output map (10x64: logits per normalized input)" in r.out


def test_cli_jacobian_bad_input_is_one_line(tmp_path, capsys):
    from clihelp import cli

    base = ["probe", "jacobian", "--runs-dir", tmp_path, "--depth", "2", "--width", "8", "--quiet"]
    for extra, expect in [(["--examples", "0"], "invalid examples: 0"), (["--layers", "blocks.5"], "unknown layer"),
                          (["--method", "svd"], "invalid method: 'svd'")]:
        r = cli(capsys, *base, *extra)
        assert r.code == 2 and expect in r.err and len(r.err.strip().splitlines()) == 1, r.err
    assert not list(tmp_path.iterdir())
