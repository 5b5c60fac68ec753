"""GGN, Fisher, empirical Fisher and K-FAC operators against dense float64 references built
independently (explicit ``torch.func`` Jacobians, enumerated labels, per-example loops, Kronecker
products assembled by hand), and through the engine's solvers unchanged."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian, jacrev

from gradlab.core.errors import GradlabError
from gradlab.curvature import (
    EmpiricalFisherOperator, FisherOperator, GGNOperator, HessianOperator, KFACOperator, dense_hessian, eigsh,
    hutchinson_diag, hutchinson_trace, select_params, slq_density, xtrace,
)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def cnn() -> nn.Module:
    torch.manual_seed(1)
    # conv 2 has more output channels (5) than output positions (4), conv 1 fewer (3 < 9)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, stride=2), nn.Tanh(), nn.Conv2d(3, 5, 2), nn.Tanh(),
                         nn.Flatten(), nn.Linear(5 * 2 * 2, 3)).double()


def wide_cnn() -> nn.Module:
    """Patches shorter (K = 8) than the positions they slide over (L = 25)."""
    torch.manual_seed(2)
    return nn.Sequential(nn.Conv2d(2, 2, 2), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 5 * 5, 3)).double()


def wide_fc() -> nn.Module:
    """A first layer wider (24 + 1) than twice the examples: K-FAC keeps its A as rows."""
    torch.manual_seed(5)
    return nn.Sequential(nn.Linear(24, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def data(model: nn.Module, n: int = 9, seed: int = 0, soft: bool = False):
    g = torch.Generator().manual_seed(seed)
    shape = (n, 2, 6, 6) if isinstance(model[0], nn.Conv2d) else (n, model[0].in_features)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    if soft:
        return x, torch.rand(n, 3, generator=g, dtype=torch.float64).softmax(-1)
    return x, torch.randint(0, 3, (n,), generator=g)


MODELS = {"mlp": mlp, "cnn": cnn}
MSE_SUM = functools.partial(F.mse_loss, reduction="sum")


def rel(a, b) -> float:
    return float(torch.linalg.matrix_norm(a - b) / torch.linalg.matrix_norm(b))


# ------------------------------------------------------------------ independent references
def jacobian(model, x, names=None):
    """Explicit Jacobian of the outputs (N, C) in the named parameters: (N, C, n)."""
    named = dict(model.named_parameters())
    names = list(named) if names is None else names
    J = jacrev(lambda pd: functional_call(model, pd, (x,)))({k: named[k].detach() for k in names})
    n, c = J[names[0]].shape[:2]
    return torch.cat([J[k].reshape(n, c, -1) for k in names], dim=-1)


def ggn_reference(model, loss_fn, x, y, names=None):
    """``J^T (d^2 L / dz^2) J`` with the output Hessian from ``torch.func.hessian`` of the loss."""
    J = jacobian(model, x, names)
    n, c, p = J.shape
    z = model(x).detach()
    H = hessian(lambda zz: loss_fn(zz, y))(z).reshape(n * c, n * c)
    Jf = J.reshape(n * c, p)
    return Jf.T @ H @ Jf


def per_example_grad(model, x, y_one, label_loss):
    """Flat gradient of one example's negative log-likelihood, by plain autograd."""
    params = list(model.parameters())
    gs = torch.autograd.grad(label_loss(model(x.unsqueeze(0)), y_one), params)
    return torch.cat([g.reshape(-1) for g in gs])


def fisher_by_enumeration(model, x):
    """``(1/N) sum_n sum_y p(y|x_n) g_n(y) g_n(y)^T`` over every class (cross-entropy, mean)."""
    p = model(x).softmax(-1).detach()
    out = 0.0
    for i in range(len(x)):
        for c in range(p.shape[1]):
            g = per_example_grad(model, x[i], torch.tensor([c]), lambda z, t: F.cross_entropy(z, t, reduction="sum"))
            out = out + p[i, c] * torch.outer(g, g)
    return out / len(x)


def empirical_fisher_loop(model, x, y, nll, factor):
    out = sum(torch.outer(g, g) for g in (per_example_grad(model, x[i], y[i:i + 1], nll) for i in range(len(x))))
    return out * factor


# ------------------------------------------------------------------ GGN
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("loss_fn", [None, F.mse_loss, MSE_SUM, lambda z, y: F.cross_entropy(z, y) ** 2],
                         ids=["ce", "mse-mean", "mse-sum", "generic"])
@pytest.mark.parametrize("jvp", ["double-backward", "forward"])
def test_ggn_equals_explicit_jacobian_product(name, loss_fn, jvp):
    model = MODELS[name]()
    x, y = data(model)
    if loss_fn in (F.mse_loss, MSE_SUM):
        y = torch.randn(len(x), 3, dtype=torch.float64)
    ref = ggn_reference(model, loss_fn or F.cross_entropy, x, y)
    op = GGNOperator(model, loss_fn, (x, y), jvp=jvp)
    assert op.jvp_method == jvp
    assert torch.allclose(op.to_dense(), ref, atol=1e-12, rtol=1e-9)
    # the closed-form output Hessian is not used for the generic loss: the autograd path is checked too
    assert (op.likelihood is None) == (loss_fn is not None and loss_fn not in (F.mse_loss, MSE_SUM))


@pytest.mark.parametrize("loss_fn", [None, F.mse_loss])
def test_ggn_is_the_hessian_of_a_linear_model_with_a_convex_loss(loss_fn):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 3)).double()
    x = torch.randn(10, 4, dtype=torch.float64)
    y = torch.randn(10, 3, dtype=torch.float64) if loss_fn else torch.randint(0, 3, (10,))
    H = dense_hessian(model, loss_fn, (x, y))
    G = GGNOperator(model, loss_fn, (x, y)).to_dense()
    assert torch.allclose(G, H, atol=1e-12)
    # and for the tanh MLP it is not: the residual term is what the GGN leaves out
    m = mlp()
    xm, ym = data(m)
    assert rel(GGNOperator(m, None, (xm, ym)).to_dense(), dense_hessian(m, None, (xm, ym))) > 1e-3


def test_ggn_over_batches_and_without_kept_graphs_is_the_size_weighted_mean():
    model = cnn()
    x, y = data(model, n=10)
    whole = ggn_reference(model, F.cross_entropy, x, y)
    batches = [(x[:3], y[:3]), (x[3:], y[3:])]
    for keep in (True, False):
        for jvp in ("double-backward", "forward"):
            op = GGNOperator(model, None, batches, keep_graphs=keep, jvp=jvp)
            assert torch.allclose(op.to_dense(), whole, atol=1e-12)
            assert len(op._lins) == (2 if keep else 0)
    # forward mode by default for convolutional models only
    assert GGNOperator(model, None, batches).jvp_method == "forward"
    assert GGNOperator(mlp(), None, data(mlp())).jvp_method == "double-backward"


def test_ggn_in_train_mode_sees_one_dropout_mask_and_batch_statistics():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.3), nn.Linear(8, 3)).double()
    x, y = data(mlp(), n=12)
    stats = model[1].running_mean.clone()
    ops = [GGNOperator(model, None, (x, y), mode="train", seed=3, jvp=j) for j in ("double-backward", "forward")]
    dense = [op.to_dense() for op in ops]
    assert torch.allclose(dense[0], dense[1], atol=1e-12)
    assert torch.allclose(dense[0], dense[0].T, atol=1e-12)  # the same function in every product
    assert not torch.allclose(dense[0], GGNOperator(model, None, (x, y)).to_dense())  # eval mode differs
    assert torch.equal(model[1].running_mean, stats) and model.training  # state restored, stats untouched


# ------------------------------------------------------------------ Fisher
@pytest.mark.parametrize("name", list(MODELS))
def test_true_fisher_exact_expectation_is_the_ggn_and_monte_carlo_converges_to_it(name):
    model = MODELS[name]()
    x, y = data(model)
    exact = fisher_by_enumeration(model, x)
    assert torch.allclose(exact, ggn_reference(model, F.cross_entropy, x, y), atol=1e-12)
    errors = [rel(FisherOperator(model, None, (x, y), mc_samples=m, seed=5).to_dense(), exact) for m in (10, 300, 10000)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.04  # Monte Carlo error ~ 1/sqrt(M)
    # the labels are drawn once from the seed: a fixed matrix, reproducible, and another seed differs
    a = FisherOperator(model, None, (x, y), mc_samples=3, seed=1)
    assert torch.equal(a.to_dense(), a.to_dense())
    assert torch.equal(a.to_dense(), FisherOperator(model, None, (x, y), mc_samples=3, seed=1).to_dense())
    assert not torch.allclose(a.to_dense(), FisherOperator(model, None, (x, y), mc_samples=3, seed=2).to_dense())


@pytest.mark.parametrize("loss_fn", [None, F.mse_loss])
def test_true_fisher_backends_draw_the_same_labels(loss_fn):
    model = cnn()
    x, y = data(model)
    if loss_fn is not None:
        y = torch.randn(len(x), 3, dtype=torch.float64)
    batches = [(x[:4], y[:4]), (x[4:], y[4:])]
    per, jac = (FisherOperator(model, loss_fn, batches, mc_samples=3, seed=7, backend=b, chunk_size=5)
                for b in ("per-example", "jacobian"))
    assert torch.allclose(per.to_dense(), jac.to_dense(), atol=1e-12)
    assert per.per_example_gradients().shape == (3 * len(x), per.n)  # rank at most N M
    assert FisherOperator(model, loss_fn, batches, mc_samples=3).backend == "per-example"
    assert FisherOperator(model, loss_fn, batches, mc_samples=9).backend == "jacobian"  # many labels: through J


def test_true_fisher_of_squared_error_converges_to_its_ggn():
    model = mlp()
    x, _ = data(model)
    y = torch.randn(len(x), 3, dtype=torch.float64)
    ref = ggn_reference(model, F.mse_loss, x, y)
    assert rel(FisherOperator(model, F.mse_loss, (x, y), mc_samples=20000, seed=0).to_dense(), ref) < 0.04


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("backend", ["per-example", "jacobian"])
@pytest.mark.parametrize("loss", ["ce", "ce-soft", "mse-mean", "mse-sum"])
def test_empirical_fisher_equals_a_per_example_loop(name, backend, loss):
    model = MODELS[name]()
    x, y = data(model, soft=loss == "ce-soft")
    n = len(x)
    if loss.startswith("ce"):
        loss_fn, nll, factor = None, lambda z, t: F.cross_entropy(z, t, reduction="sum"), 1 / n
    else:
        y = torch.randn(n, 3, dtype=torch.float64)
        loss_fn = F.mse_loss if loss == "mse-mean" else MSE_SUM
        nll, factor = (lambda z, t: (z - t).pow(2).sum()), (1 / (3 * n) if loss == "mse-mean" else 1.0)
    ref = empirical_fisher_loop(model, x, y, nll, factor)
    op = EmpiricalFisherOperator(model, loss_fn, [(x[:4], y[:4]), (x[4:], y[4:])] if loss == "ce" else (x, y),
                                 backend=backend, chunk_size=3)
    assert op.backend == backend
    assert torch.allclose(op.to_dense(), ref, atol=1e-12)


def test_empirical_fisher_is_not_the_fisher():
    # the data's labels, not the model's: the two matrices differ (Kunstner et al. 2019)
    model = mlp()
    x, y = data(model, n=30)
    ef = EmpiricalFisherOperator(model, None, (x, y)).to_dense()
    assert rel(ef, ggn_reference(model, F.cross_entropy, x, y)) > 0.1
    assert EmpiricalFisherOperator(model, None, (x, y), mode="train").backend == "jacobian"
    with pytest.raises(GradlabError, match="mode 'eval'"):
        EmpiricalFisherOperator(model, None, (x, y), mode="train", backend="per-example")


# ------------------------------------------------------------------ K-FAC
def patches_by_loops(conv: nn.Conv2d, a):
    """Rows (N * L, C_in kh kw) of every output position's input patch, by slicing."""
    (ph, pw), (sh, sw), (kh, kw) = conv.padding, conv.stride, conv.kernel_size
    a = F.pad(a, (pw, pw, ph, ph))
    rows = []
    for n in range(a.shape[0]):
        for i in range(0, a.shape[2] - kh + 1, sh):
            for j in range(0, a.shape[3] - kw + 1, sw):
                rows.append(a[n, :, i:i + kh, j:j + kw].reshape(-1))
    return torch.stack(rows)


def kfac_reference(model, x, y, fisher_type):
    """Block-diagonal ``G (x) A`` per layer, from intermediate activations and explicit Jacobians of
    the logits in each layer's output, in the flat parameter order."""
    n = len(x)
    z = model(x).detach()
    p = z.softmax(-1)
    if fisher_type == "type-2":
        lam = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)
    else:
        g = p - F.one_hot(y, 3)
        lam = g.unsqueeze(2) * g.unsqueeze(1)
    blocks = []
    for i, layer in enumerate(model):
        if not isinstance(layer, (nn.Linear, nn.Conv2d)):
            continue
        a = model[:i](x).detach()
        out = layer(a).detach()
        rows = patches_by_loops(layer, a) if isinstance(layer, nn.Conv2d) else a
        rows = torch.cat([rows, torch.ones(len(rows), 1, dtype=rows.dtype)], dim=1)
        A = rows.T @ rows / len(rows)
        Jo = torch.stack([jacrev(model[i + 1:])(out[k:k + 1])[0, :, 0] for k in range(n)])  # (N, C, *out)
        if Jo.dim() == 5:  # conv output (C_out, H, W): each position is a row of its own
            Jo = Jo.flatten(3).permute(0, 3, 1, 2)  # (N, L, C, C_out)
        else:
            Jo = Jo.unsqueeze(1)  # (N, 1, C, O)
        G = torch.einsum("nlca,ncd,nldb->ab", Jo, lam, Jo) / n
        o, k1 = G.shape[0], A.shape[0]
        # vec(W_bar) row-major -> the flat layout: W's entries (o * K + k), then the bias (o)
        perm = [r * k1 + c for r in range(o) for c in range(k1 - 1)] + [r * k1 + k1 - 1 for r in range(o)]
        blocks.append(torch.kron(G.contiguous(), A.contiguous())[perm][:, perm])  # einsum may return a strided G
    return torch.block_diag(*blocks)


KFAC_MODELS = {**MODELS, "wide-cnn": wide_cnn, "wide-fc": wide_fc}


@pytest.mark.parametrize("name", list(KFAC_MODELS))
@pytest.mark.parametrize("fisher_type", ["type-2", "empirical"])
def test_kfac_equals_the_kronecker_formula_built_by_hand(name, fisher_type):
    model = KFAC_MODELS[name]()
    x, y = data(model)
    op = KFACOperator(model, None, (x, y), fisher_type=fisher_type)
    assert [type(b.module) for b in op.blocks] == [type(m) for m in model if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert torch.allclose(op.to_dense(), kfac_reference(model, x, y, fisher_type), atol=1e-12)
    assert (op.blocks[0]._rows is not None) == (name == "wide-fc")  # 9 rows of 25: A kept as its rows


def test_kfac_over_batches_equals_one_batch_with_a_low_rank_or_dense_input_factor():
    model = wide_fc()
    for n, low_rank in ((9, True), (20, False)):  # 2 x 20 rows > 25 columns: A becomes dense
        x, y = data(model, n=n)
        two = KFACOperator(model, None, [(x[:4], y[:4]), (x[4:], y[4:])])
        assert (two.blocks[0]._rows is not None) == low_rank
        assert torch.allclose(two.to_dense(), KFACOperator(model, None, (x, y)).to_dense(), atol=1e-12)


def test_kfac_is_exact_for_one_example_of_a_single_layer_and_mc_converges():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(4, 3)).double()
    x, y = torch.randn(1, 4, dtype=torch.float64), torch.tensor([2])
    assert torch.allclose(KFACOperator(model, None, (x, y)).to_dense(), ggn_reference(model, F.cross_entropy, x, y),
                          atol=1e-12)
    m = cnn()
    xm, ym = data(m)
    exact = KFACOperator(m, None, (xm, ym)).to_dense()
    errs = [rel(KFACOperator(m, None, (xm, ym), fisher_type="mc", mc_samples=s, seed=2).to_dense(), exact)
            for s in (10, 3000)]
    assert errs[1] < errs[0] and errs[1] < 0.05


@pytest.mark.parametrize("make", [cnn, wide_fc])
def test_kfac_solve_inverse_eigenvalues_and_trace_are_exact(make):
    model = make()
    x, y = data(model)
    op = KFACOperator(model, None, (x, y))
    K = op.to_dense()
    v = torch.randn(op.n, 3, dtype=torch.float64)
    ref = torch.linalg.solve(K + 0.05 * torch.eye(op.n, dtype=torch.float64), v)
    assert torch.allclose(op.solve(v, 0.05), ref, atol=1e-9)
    assert torch.allclose(op.solve(v[:, 0], 0.05), ref[:, 0], atol=1e-9)
    assert torch.allclose(op.inverse(0.05).to_dense(), torch.linalg.inv(K + 0.05 * torch.eye(op.n, dtype=torch.float64)),
                          atol=1e-8)
    assert torch.allclose(op.eigenvalues(), torch.linalg.eigvalsh(K), atol=1e-12)
    assert op.trace() == pytest.approx(float(torch.trace(K)), rel=1e-12)
    with pytest.raises(GradlabError, match="damping > 0"):
        op.inverse(0.0)
    if make is wide_fc:  # A of rank 9 < 25: singular without damping
        with pytest.raises(GradlabError, match="has rank 9 < 25; solve with damping > 0"):
            op.solve(v, 0.0)


# ------------------------------------------------------------------ parameter subsets
OPERATORS = {
    "ggn": lambda m, d, **kw: GGNOperator(m, None, d, **kw),
    "fisher": lambda m, d, **kw: FisherOperator(m, None, d, mc_samples=4, seed=3, **kw),
    "empirical-fisher": lambda m, d, **kw: EmpiricalFisherOperator(m, None, d, **kw),
    "kfac": lambda m, d, **kw: KFACOperator(m, None, d, **kw),
    "hessian": lambda m, d, **kw: HessianOperator(m, None, d, **kw),
}


@pytest.mark.parametrize("kind", list(OPERATORS))
def test_each_operator_restricted_to_a_parameter_subset_is_the_sub_block(kind):
    model = cnn()
    batch = data(model)
    full = OPERATORS[kind](model, batch).to_dense()
    names = [n for n, _ in model.named_parameters()]
    sizes = [p.numel() for p in model.parameters()]
    offsets = torch.tensor([0] + sizes).cumsum(0)
    for spec, chosen in (("2", ["2.weight", "2.bias"]), ("*.bias", [n for n in names if n.endswith("bias")]),
                         ([model[5].weight, model[0].bias], ["5.weight", "0.bias"])):
        idx = torch.cat([torch.arange(offsets[names.index(c)], offsets[names.index(c) + 1]) for c in chosen])
        sub = OPERATORS[kind](model, batch, params=spec)
        assert sub.n == len(idx)  # for K-FAC too: a weight alone drops the bias column, a bias alone has A = [1]
        assert torch.allclose(sub.to_dense(), full[idx][:, idx], atol=1e-12), spec


def test_parameter_patterns_and_their_errors():
    with pytest.raises(GradlabError, match="unknown jvp method 'reverse'; choose from: double-backward, forward"):
        GGNOperator(mlp(), None, data(mlp()), jvp="reverse")
    model = cnn()
    ps, names = select_params(model, "0, 5.weight")
    assert names == ["0.weight", "0.bias", "5.weight"] and ps[0] is model[0].weight
    with pytest.raises(GradlabError, match="matches no trainable parameter; names are: 0.weight"):
        select_params(model, "fc1")
    with pytest.raises(GradlabError, match="not a mix"):
        select_params(model, ["0.weight", model[0].bias])
    bn = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)).double()
    x, y = data(mlp())
    with pytest.raises(GradlabError, match="nn.Linear and nn.Conv2d layers; 1 is a BatchNorm1d"):
        KFACOperator(bn, None, (x, y))
    assert KFACOperator(bn, None, (x, y), params="0,2").n == 5 * 4 + 4 + 4 * 3 + 3
    for make in (FisherOperator, EmpiricalFisherOperator, KFACOperator):
        with pytest.raises(GradlabError, match="log-likelihood; got l1_loss"):
            make(mlp(), F.l1_loss, (x, torch.randn(len(x), 3, dtype=torch.float64)))
    with pytest.raises(GradlabError, match="choose from: type-2, mc, empirical"):
        KFACOperator(mlp(), None, (x, y), fisher_type="type-1")
    with pytest.raises(GradlabError, match="mc_samples"):
        FisherOperator(mlp(), None, (x, y), mc_samples=0)


# ------------------------------------------------------------------ the solvers, unchanged
@pytest.mark.parametrize("kind", [k for k in OPERATORS if k != "hessian"])
def test_every_solver_accepts_the_new_operators(kind):
    model = mlp()
    op = OPERATORS[kind](model, data(model, n=12))
    A = op.to_dense()
    ev = torch.linalg.eigvalsh(A)
    top = eigsh(op, 3, "LA", tol=1e-10)
    assert top.converged and torch.allclose(top.values, ev.flip(0)[:3], rtol=1e-8, atol=1e-12)
    exact = float(torch.trace(A))
    h = hutchinson_trace(op, 400, seed=1)
    assert abs(h.estimate - exact) < 4 * h.stderr + 1e-12
    assert xtrace(op, 2 * op.n, seed=2).estimate == pytest.approx(exact, rel=1e-6)  # s >= rank: exact
    d = hutchinson_diag(op, 300, seed=3)
    assert (d.estimate - torch.diag(A)).abs().max() < 5 * d.stderr.max() + 1e-12
    dens = slq_density(op, num_starts=2, lanczos_steps=op.n, seed=4)
    # Ritz values lie inside the spectrum; the quadrature's mean is a Hutchinson estimate of tr / n
    assert float(dens.nodes.min()) > float(ev[0]) - 1e-9 and float(dens.nodes.max()) < float(ev[-1]) + 1e-9
    assert 0 < dens.mean < 4 * exact / op.n
    assert (ev > -1e-12).all()  # all four are positive semi-definite
