"""K-FAC's output factors from one batched backward pass (gradlab.curvature.kfac_backward) against
a plain loop of one ``torch.autograd.grad`` per column, float64, for every fisher type, Linear and
Conv2d layers, (N, T, I) inputs, an unused layer, a BatchNorm/ReLU residual block, chunking, and
a backward without a batching rule."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradlab.curvature import KFACOperator, kfac_backward
from gradlab.curvature.kfac import KroneckerBlock, output_factors
from gradlab.curvature.likelihood import Likelihood
from gradlab.curvature.sampling import make_generator

moment = KroneckerBlock.output_moment


class Block(nn.Module):
    """conv -> BN -> ReLU -> conv + skip, a linear head, and a layer whose output is discarded."""

    def __init__(self):
        super().__init__()
        self.c1, self.bn, self.c2 = nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 3, padding=1)
        self.head, self.unused = nn.Linear(2 * 5 * 5, 3), nn.Linear(3, 3)

    def forward(self, x):
        h = (x + self.c2(F.relu(self.bn(self.c1(x))))).flatten(1)
        self.unused(h[:, :3])  # runs, does not reach the outputs
        return self.head(h)


class Seq(nn.Module):
    """Inputs (N, T, I): a Linear on every position, then the mean over T."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x))).mean(1)


def _watched(model, x, layers):
    outs = {}
    hs = [m.register_forward_hook(lambda m, i, o: outs.setdefault(id(m), o)) for m in layers]
    z = model(x)
    for h in hs:
        h.remove()
    return z, [outs[id(m)] for m in layers]


def _loop(z, outs, S):
    """The reference: one backward pass per column, the moments summed."""
    G = [None] * len(outs)
    for k in range(S.shape[0]):
        for j, g in enumerate(torch.autograd.grad(z, outs, S[k], retain_graph=True, allow_unused=True)):
            if g is not None:
                G[j] = moment(g) if G[j] is None else G[j] + moment(g)
    return G


def _check(G, ref):
    for g, r in zip(G, ref):
        assert (g is None) == (r is None)
        if r is not None:
            torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-300)


CASES = [("type-2", 1), ("mc", 1), ("mc", 4), ("empirical", 1)]


@pytest.mark.parametrize("fisher_type,m", CASES)
@pytest.mark.parametrize("train", [False, True])
def test_batched_equals_loop_on_a_residual_bn_block(fisher_type, m, train):
    torch.manual_seed(0)
    model = Block().double().train(train)
    x, y = torch.randn(6, 2, 5, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    layers = [model.c1, model.c2, model.head, model.unused]
    z, outs = _watched(model, x, layers)
    S = output_factors(Likelihood("cross-entropy", "mean"), fisher_type, z.detach(), m, make_generator(0), y)
    ref = _loop(z, outs, S)
    assert ref[3] is None and all(r.abs().max() > 0 for r in ref[:3])
    for budget in (None, 1, 2 * sum(o.numel() for o in outs) * 8):  # one chunk, one column each, chunks of 2
        z, outs = _watched(model, x, layers)  # (the last backward pass frees the graph)
        _check(kfac_backward.output_moments(z, outs, S, moment, budget=budget, batched=True), ref)


@pytest.mark.parametrize("fisher_type,m", CASES)
def test_batched_equals_loop_on_sequence_inputs_with_mse(fisher_type, m):
    torch.manual_seed(1)
    model = Seq().double()
    x, y = torch.randn(5, 7, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    z, outs = _watched(model, x, [model.a, model.b])
    S = output_factors(Likelihood("mse", "sum"), fisher_type, z.detach(), m, make_generator(0), y)
    ref = _loop(z, outs, S)
    _check(kfac_backward.output_moments(z, outs, S, moment), ref)


@pytest.mark.parametrize("fisher_type,m", CASES)
def test_operator_factors_equal_the_per_column_loop(fisher_type, m, monkeypatch):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(12, 4), nn.Tanh(),
                          nn.Linear(4, 3)).double()
    data = (torch.randn(8, 1, 4, 4, dtype=torch.float64), torch.randint(0, 3, (8,)))
    inner = kfac_backward.output_moments
    calls = []

    def forced(*args, batched=None, **kw):
        calls.append(batched)
        return inner(*args, batched=forced.batched, **kw)

    import gradlab.curvature.kfac as kfac_module

    monkeypatch.setattr(kfac_module, "output_moments", forced)
    ops = {}
    for forced.batched in (False, True, None):
        ops[forced.batched] = KFACOperator(model, None, data, fisher_type=fisher_type, mc_samples=m)
    assert calls == [None] * 3
    for a, b, c in zip(*(op.blocks for op in ops.values())):
        torch.testing.assert_close(b.G, a.G, rtol=1e-12, atol=0)
        torch.testing.assert_close(c.G, a.G, rtol=1e-12, atol=0)
        torch.testing.assert_close(b.A, a.A, rtol=0, atol=0)


def test_cpu_convolutions_and_large_columns_keep_the_loop_small_linear_ones_batch():
    conv, lin = torch.zeros(2, 3, 4, 4), torch.zeros(2, 3)
    assert kfac_backward.batches_well([lin, torch.zeros(2, 5, 3)])
    assert not kfac_backward.batches_well([torch.zeros(kfac_backward.CPU_COLUMN_BYTES // 4 + 1)])
    assert not kfac_backward.batches_well([conv, lin])


class _NoBatching(torch.autograd.Function):
    """Identity whose backward reads a Python number: vmap cannot run it."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * (1.0 + 0.0 * float(g.abs().sum().item()))


def test_a_backward_without_batching_rule_falls_back_to_the_loop_silently():
    torch.manual_seed(3)
    lin1, lin2 = nn.Linear(4, 5).double(), nn.Linear(5, 3).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    h = lin1(x)
    z = lin2(_NoBatching.apply(torch.tanh(h)))
    S = torch.randn(3, 6, 3, dtype=torch.float64)
    with pytest.raises(RuntimeError):  # the batched pass itself cannot run here
        torch.autograd.grad(z, [h], S, retain_graph=True, is_grads_batched=True)
    ref = _loop(z, [h, z], S)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither the fallback nor torch's slow path warns
        _check(kfac_backward.output_moments(z, [h, z], S, moment, batched=True), ref)
        z2 = lin2(torch.tanh(lin1(x)))  # tanh_backward: torch's own per-column fallback, silent
        ref2 = _loop(z2, [z2], S)
        _check(kfac_backward.output_moments(z2, [z2], S, moment, batched=True), ref2)


def test_type2_kfac_step_counts_one_backward_per_class():
    from gradlab.training.loop import Trainer
    from gradlab.training.options import train_defaults, validate_train_config

    cfg = {**train_defaults(), "seed": 0, "device": "cpu", "max_train": 64, "epochs": 1, "batch_size": 32,
           "width": 8, "depth": 1, "opt": "kfac", "fisher_type": "type-2", "factor_every": 2}
    t = Trainer(validate_train_config(cfg))
    classes = t.data.spec.num_classes
    idx, n = t.sampler.epoch_batches(0)[0]
    t.train_step(t.x_train[idx], t.y_train[idx], n)
    assert t.cost.total == pytest.approx(1 + 2 / 3 * classes)  # batched: still one pass per class


@pytest.mark.parametrize("fisher_type", ["type-2", "mc"])
def test_optimizer_factors_equal_the_per_column_loop(fisher_type, monkeypatch):
    import gradlab.optim.kfac as kfac_optim

    inner = kfac_backward.output_moments

    def factors(batched):
        monkeypatch.setattr(kfac_optim, "output_moments", lambda *a, **k: inner(*a, **{**k, "batched": batched}))
        torch.manual_seed(4)
        model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 5), nn.Tanh(),
                              nn.Linear(5, 4)).double()
        x, y = torch.randn(7, 1, 4, 4, dtype=torch.float64), torch.randint(0, 4, (7,))
        opt = kfac_optim.KFAC(model.parameters(), fisher_type=fisher_type)
        opt.bind(model, F.cross_entropy)
        opt.step(lambda: F.cross_entropy(model(x), y))
        return [blk.G for blk in opt.blocks]

    for a, b in zip(factors(True), factors(False)):
        assert a.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


def test_input_factors_equal_through_unfold_and_shifted_correlations(monkeypatch):
    import gradlab.curvature.kfac as kfac_module

    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 5 * 5, 3)).double()
    data = (torch.randn(4, 2, 5, 5, dtype=torch.float64), torch.randint(0, 3, (4,)))
    assert not kfac_module._shifted_pays(model[0], data[0])  # a small input: unfold by default
    ops = []
    for threshold in (0, 2**62):
        monkeypatch.setattr(kfac_module, "SHIFTED_MIN_WORK", threshold)
        ops.append(KFACOperator(model, None, data))
    torch.testing.assert_close(ops[0].blocks[0].A, ops[1].blocks[0].A, rtol=1e-12, atol=1e-14)
