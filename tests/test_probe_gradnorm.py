"""gradnorm_probe against hand computations (float64) and on clear vanishing/exploding cases."""

import math

import pytest
import torch
from torch import nn

from gradlab.core.errors import GradlabError
from gradlab.models.base import GradlabNet, Normalize
from gradlab.probes.gradnorm import fit_rate, gradnorm_probe, verdict_from_rate


def mlp(depth, width, act, sigma_w=1.0, orthogonal=False, d_in=6, n_out=3, seed=0, dtype=torch.float64):
    """GradlabNet of ``depth`` blocks Linear(+act); weights N(0, sigma_w^2 / fan_in) or orthogonal."""
    torch.manual_seed(seed)
    blocks, prev = [], d_in
    for _ in range(depth):
        lin = nn.Linear(prev, width)
        if orthogonal:
            nn.init.orthogonal_(lin.weight, gain=sigma_w)
        else:
            nn.init.normal_(lin.weight, std=sigma_w / math.sqrt(prev))
        nn.init.zeros_(lin.bias)
        blocks.append(nn.Sequential(lin, act()) if act is not None else lin)
        prev = width
    head = nn.Linear(prev, n_out)
    return GradlabNet(Normalize([0.5], [0.25]), blocks, head).to(dtype)


def data(n=8, d_in=6, n_out=3, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, d_in, generator=g, dtype=dtype), torch.randint(0, n_out, (n,), generator=g)


def test_grad_weight_norms_match_hand_computation():
    model = mlp(3, 5, nn.Tanh)
    batches = [data(seed=1), data(seed=2)]
    loss_fn = nn.CrossEntropyLoss()
    rep = gradnorm_probe(model, loss_fn, batches)
    layer_mods = list(model.blocks) + [model.head]
    assert [lg.name for lg in rep.layers] == ["blocks.0", "blocks.1", "blocks.2", "head"]
    assert [lg.layer for lg in rep.layers] == [0, 1, 2, 3]
    per_batch = []
    for x, y in batches:
        model.zero_grad()
        loss_fn(model(x), y).backward()
        per_batch.append([math.sqrt(sum((p.grad**2).sum().item() for p in m.parameters())) for m in layer_mods])
    norms = torch.tensor(per_batch, dtype=torch.float64)  # (batches, layers)
    for j, lg in enumerate(rep.layers):
        w = math.sqrt(sum((p**2).sum().item() for p in layer_mods[j].parameters()))
        assert lg.grad_norm == pytest.approx(norms[:, j].mean().item(), rel=1e-12)
        assert lg.grad_norm_std == pytest.approx(norms[:, j].std(unbiased=False).item(), rel=1e-9)
        assert lg.weight_norm == pytest.approx(w, rel=1e-12)
        assert lg.ratio == pytest.approx(lg.grad_norm / w, rel=1e-12)
    df = rep.to_frame()
    assert list(df.columns) == ["layer", "name", "grad_norm", "grad_norm_std", "weight_norm", "ratio", "signal_norm"]
    assert len(df) == 4


def test_signal_norm_is_per_example_gradient_of_own_loss():
    model = mlp(2, 4, nn.Tanh)
    x, y = data(n=5)
    rep = gradnorm_probe(model, nn.CrossEntropyLoss(), [(x, y)])
    expected = torch.zeros(3, 5, dtype=torch.float64)
    for n in range(5):  # one example at a time: the gradient of its own loss w.r.t. each layer output
        h = model.normalize(x[n : n + 1])
        outs = []
        for b in model.blocks:
            h = b(h)
            outs.append(h)
        logits = model.head(h)
        outs.append(logits)
        grads = torch.autograd.grad(nn.functional.cross_entropy(logits, y[n : n + 1]), outs)
        expected[:, n] = torch.stack([g.norm() for g in grads])
    for j, lg in enumerate(rep.layers):
        torch.testing.assert_close(lg.signal_norm_per_example, expected[j], rtol=1e-12, atol=0)
        assert lg.signal_norm == pytest.approx(expected[j].mean().item(), rel=1e-12)


def test_sum_reduction_is_not_rescaled():
    model = mlp(2, 4, nn.Tanh)
    x, y = data(n=4)
    mean_rep = gradnorm_probe(model, nn.CrossEntropyLoss(), [(x, y)])
    sum_rep = gradnorm_probe(model, nn.CrossEntropyLoss(reduction="sum"), [(x, y)])
    for a, b in zip(mean_rep.layers, sum_rep.layers):
        assert a.signal_norm == pytest.approx(b.signal_norm, rel=1e-12)
        assert b.grad_norm == pytest.approx(4 * a.grad_norm, rel=1e-12)


def _batches(d_in=16, n_out=4, n=32):
    return [data(n=n, d_in=d_in, n_out=n_out, seed=s) for s in (3, 4)]


def test_deep_sigmoid_mlp_vanishes():
    model = mlp(20, 32, nn.Sigmoid, d_in=16, n_out=4)
    rep = gradnorm_probe(model, nn.CrossEntropyLoss(), _batches())
    assert rep.verdict == "vanishing"
    assert rep.rate < 0.5
    assert rep.layers[0].signal_norm < 1e-6 * rep.layers[-1].signal_norm


def test_deep_tanh_mlp_with_large_gaussian_weights_explodes():
    model = mlp(20, 64, nn.Tanh, sigma_w=4.0, d_in=16, n_out=4)
    rep = gradnorm_probe(model, nn.CrossEntropyLoss(), _batches())
    assert rep.verdict == "exploding"
    assert rep.rate > 1.3


def test_deep_orthogonal_linear_mlp_is_stable():
    model = mlp(30, 16, None, orthogonal=True, d_in=16, n_out=16)
    rep = gradnorm_probe(model, nn.CrossEntropyLoss(), _batches(n_out=16))
    assert rep.verdict == "stable"
    # an orthogonal map preserves norms: every block carries the same signal
    sig = torch.tensor([lg.signal_norm for lg in rep.layers[:-1]], dtype=torch.float64)
    torch.testing.assert_close(sig, sig[-1].expand_as(sig), rtol=1e-5, atol=0)  # float32-made Q


def test_fit_rate_and_verdict_rule():
    depths = [0, 1, 2, 3]
    assert math.exp(fit_rate(depths, [8.0, 4.0, 2.0, 1.0])) == pytest.approx(2.0)  # grows towards input
    assert math.isnan(fit_rate([2], [1.0]))
    assert verdict_from_rate(math.log(2.0), 0.1) == "exploding"
    assert verdict_from_rate(math.log(0.5), 0.1) == "vanishing"
    assert verdict_from_rate(math.log(1.05), 0.1) == "stable"
    assert verdict_from_rate(float("nan"), 0.1) == "undetermined"


def test_model_state_is_restored():
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU()), nn.Sequential(nn.Linear(5, 5), nn.Dropout(0.5))]
    model = GradlabNet(Normalize([0.5], [0.25]), blocks, nn.Linear(5, 3)).double().eval()
    model.blocks[0][0].weight.requires_grad_(False)
    bn = model.blocks[0][1]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rep = gradnorm_probe(model, nn.CrossEntropyLoss(), [data()], train_mode=True)
    assert rep.layers[0].grad_norm > 0  # the frozen weight's layer is still measured
    assert not any(m.training for m in model.modules())
    assert not model.blocks[0][0].weight.requires_grad and model.blocks[0][0].bias.requires_grad
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert bn.num_batches_tracked.item() == 0
    model.train()
    gradnorm_probe(model, nn.CrossEntropyLoss(), [data()], train_mode=False)
    assert all(m.training for m in model.modules())


def _state(model):
    return ({n: m.training for n, m in model.named_modules()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            {n: b.clone() for n, b in model.named_buffers()})


def test_trained_norm_statistics_and_mixed_modes_survive_the_probe():
    """Running statistics off their defaults (momentum 0.1 and cumulative), an InstanceNorm that
    tracks too, modes mixed per module: all identical afterwards, also when the probe fails."""
    import copy

    torch.manual_seed(0)
    bn, cum = nn.BatchNorm1d(5), nn.BatchNorm1d(5, momentum=None)
    inorm = nn.InstanceNorm1d(1, track_running_stats=True)
    blocks = [nn.Sequential(nn.Linear(6, 5), bn, nn.ReLU()), nn.Sequential(nn.Linear(5, 5), cum, nn.Tanh()),
              nn.Sequential(nn.Unflatten(1, (1, 5)), inorm, nn.Flatten())]
    model = GradlabNet(Normalize([0.5], [0.25]), blocks, nn.Linear(5, 3)).double().train()
    for seed in range(3):  # move every running buffer off its initial value
        model(data(seed=10 + seed)[0])
    model.eval()
    bn.train()  # a mode mix the probe must give back as it was
    model.head.weight.requires_grad_(False)
    before = _state(model)
    assert int(bn.num_batches_tracked) == 3 and int(cum.num_batches_tracked) == 3

    rep = gradnorm_probe(model, nn.CrossEntropyLoss(), [data(), data(seed=2)], train_mode=True)
    modes, flags, bufs = _state(model)
    assert modes == before[0] and flags == before[1]
    assert bufs.keys() == before[2].keys()
    for k, v in bufs.items():
        assert torch.equal(v, before[2][k]), k
    assert all(p.grad is None for p in model.parameters())
    assert bn.track_running_stats and cum.track_running_stats and inorm.track_running_stats

    # the probe saw what training sees: batch statistics in train mode (same gradient as a copy
    # that is free to update its statistics)
    ref = copy.deepcopy(model).train()
    ref.head.weight.requires_grad_(True)
    x, y = data()
    g = torch.autograd.grad(nn.CrossEntropyLoss()(ref(x), y), list(ref.blocks[0].parameters()))
    first = gradnorm_probe(model, nn.CrossEntropyLoss(), [(x, y)], train_mode=True).layers[0].grad_norm
    assert first == pytest.approx(math.sqrt(sum(float(t.pow(2).sum()) for t in g)), rel=1e-12)
    assert rep.layers[-1].grad_norm > 0  # the frozen head is measured

    with pytest.raises(GradlabError):
        gradnorm_probe(model, lambda logits, y: logits.sum(0), [data()], train_mode=True)
    modes, flags, bufs = _state(model)
    assert modes == before[0] and flags == before[1]
    assert all(torch.equal(v, before[2][k]) for k, v in bufs.items())


def test_works_under_no_grad_and_on_plain_modules():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    with torch.no_grad():
        rep = gradnorm_probe(model, nn.CrossEntropyLoss(), [data()])
    assert [lg.name for lg in rep.layers] == ["0", "2"]
    assert all(lg.grad_norm > 0 and lg.signal_norm > 0 for lg in rep.layers)
    sub = gradnorm_probe(model, nn.CrossEntropyLoss(), [data()], layers=["2"])
    assert [lg.name for lg in sub.layers] == ["2"] and sub.verdict == "undetermined"


class _TupleOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 3)

    def forward(self, x):
        return self.lin(x), x


def test_bad_input_raises_gradlab_error():
    model = mlp(2, 4, nn.Tanh)
    with pytest.raises(GradlabError, match="unknown layer 'blocks.9'.*blocks.0, blocks.1, head"):
        gradnorm_probe(model, nn.CrossEntropyLoss(), [data()], layers=["blocks.9"])
    with pytest.raises(GradlabError, match="batches must be >= 1"):
        gradnorm_probe(model, nn.CrossEntropyLoss(), [])
    with pytest.raises(GradlabError, match="not a tensor"):
        gradnorm_probe(_TupleOut().double(), nn.CrossEntropyLoss(), [data()])
    with pytest.raises(GradlabError, match="threshold"):
        gradnorm_probe(model, nn.CrossEntropyLoss(), [data()], threshold=0)


# --- CLI: `gradlab probe gradnorm` through the real entry point ------------------------------

TINY = ["--depth", "3", "--width", "8", "--batches", "2", "--batch-size", "16", "--quiet"]


def test_cli_gradnorm_writes_csv_plot_summary(tmp_path, capsys):
    import pandas as pd

    from clihelp import cli

    r = cli(capsys, "probe", "gradnorm", "--runs-dir", tmp_path, "--act", "sigmoid", "--init", "gaussian", *TINY)
    assert r.code == 0, r.err
    path = r.run_path
    df = pd.read_csv(path / "gradnorm.csv")
    assert list(df.columns) == ["layer", "name", "grad_norm", "grad_norm_std", "weight_norm", "ratio", "signal_norm"]
    assert list(df["name"]) == ["blocks.0", "blocks.1", "blocks.2", "head"]
    assert (path / "plots" / "gradnorm.png").stat().st_size > 0
    assert any(p.name.startswith("events.out.tfevents") for p in path.iterdir())
    s = pd.read_csv(path / "summary.csv")
    assert s.loc[0, "status"] == "completed" and s.loc[0, "verdict"] in ("vanishing", "exploding", "stable")
    assert s.loc[0, "act"] == "sigmoid" and s.loc[0, "depth"] == 3
    assert "verdict: " in r.out


def test_cli_gradnorm_bad_input_is_one_line(tmp_path, capsys):
    from clihelp import cli

    for extra, expect in [(["--batches", "0"], "invalid batches: 0"),
                          (["--layers", "blocks.0,blocks.9"], "unknown layer 'blocks.9'")]:
        r = cli(capsys, "probe", "gradnorm", "--runs-dir", tmp_path, *TINY, *extra)
        assert r.code == 2 and expect in r.err and len(r.err.strip().splitlines()) == 1, r.err
    assert not list(tmp_path.iterdir())  # no run folder for a mistake caught up front
    r = cli(capsys, "probe", "gradnorm", "--runs-dir", tmp_path, "--run", "last", "--depth", "3")
    assert r.code == 2 and len(r.err.strip().splitlines()) == 1, r.err
