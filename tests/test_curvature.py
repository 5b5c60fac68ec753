"""The curvature engine against exact dense references, in float64 on tiny models."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradlab.curvature import (
    DenseOperator,
    HessianOperator,
    dense_hessian,
    eigsh,
    hutchinson_diag,
    hutchinson_trace,
    hutchpp_trace,
    krylov_trace,
    slq_density,
    xtrace,
)
from gradlab.core.errors import GradlabError
from gradlab.models.base import GradlabNet, Normalize


def tiny_mlp() -> nn.Module:
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(12, 10), nn.Tanh()), nn.Sequential(nn.Linear(10, 8), nn.Tanh())]
    return GradlabNet(Normalize([0.5], [0.25]), blocks, nn.Linear(8, 4)).double()


def tiny_cnn() -> nn.Module:
    torch.manual_seed(1)
    blocks = [nn.Sequential(nn.Conv2d(1, 3, 3), nn.Tanh()), nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.Tanh())]
    return GradlabNet(Normalize([0.5], [0.25]), blocks, nn.Sequential(nn.Flatten(), nn.Linear(4 * 2 * 2, 3))).double()


def bn_dropout_net() -> nn.Module:
    torch.manual_seed(2)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 3)).double()


def data_for(model: nn.Module, n: int = 24, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    first = next(model.parameters())
    if first.ndim == 4:  # conv: (N, 1, 7, 7) images
        x = torch.rand(n, 1, 7, 7, generator=g, dtype=torch.float64)
        classes = 3
    else:
        x = torch.rand(n, first.shape[1], generator=g, dtype=torch.float64)
        classes = model[-1].out_features if isinstance(model, nn.Sequential) else 4
    return x, torch.randint(0, classes, (n,), generator=g)


MODELS = {"mlp": tiny_mlp, "cnn": tiny_cnn}


def rel(a, b) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


@pytest.fixture(scope="module", params=list(MODELS))
def case(request):
    model = MODELS[request.param]()
    x, y = data_for(model)
    H = dense_hessian(model, None, (x, y))
    return model, (x, y), H


@pytest.mark.parametrize("backend", ["double-backward", "func"])
def test_hvp_matches_dense_hessian_one_batch(case, backend):
    model, batch, H = case
    op = HessianOperator(model, None, batch, backend=backend)
    V = torch.randn(op.n, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    assert rel(op.matvec(V[:, 0]), H @ V[:, 0]) < 1e-8
    assert rel(op.matmat(V), H @ V) < 1e-8
    assert op.num_matvecs == 4


@pytest.mark.parametrize("backend", ["double-backward", "func"])
@pytest.mark.parametrize("keep_graphs", [True, False])
def test_hvp_several_batches_is_size_weighted_mean(case, backend, keep_graphs):
    model, (x, y), H = case  # H is the Hessian of the mean loss over all 24 samples
    batches = [(x[:5], y[:5]), (x[5:16], y[5:16]), (x[16:], y[16:])]  # unequal sizes
    op = HessianOperator(model, None, batches, backend=backend, keep_graphs=keep_graphs)
    v = torch.randn(op.n, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    assert rel(op.matvec(v), H @ v) < 1e-8
    assert rel(op.matvec(v), H @ v) < 1e-8  # a second product reuses/rebuilds graphs correctly


def test_hessian_is_symmetric_and_no_graph_left_on_grad(case):
    model, batch, H = case
    assert torch.allclose(H, H.T, atol=1e-12)
    op = HessianOperator(model, None, batch)
    op.matvec(torch.ones(op.n, dtype=torch.float64))
    op.loss_and_gradient()
    assert all(p.grad is None for p in model.parameters())


def test_loss_and_gradient_match_autograd(case):
    model, (x, y), _ = case
    op = HessianOperator(model, None, [(x[:10], y[:10]), (x[10:], y[10:])])
    loss, g = op.loss_and_gradient()
    ref_loss = F.cross_entropy(model(x), y)
    ref_g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(ref_loss, list(model.parameters()))])
    assert abs(loss - ref_loss.item()) < 1e-12 and rel(g, ref_g) < 1e-10


@pytest.mark.parametrize("which", ["LA", "SA"])
def test_eigsh_on_model_hessian_matches_eigvalsh(case, which):
    model, batch, H = case
    evals, evecs = torch.linalg.eigh(H)
    k = 3
    idx = torch.arange(H.shape[0] - 1, H.shape[0] - 1 - k, -1) if which == "LA" else torch.arange(k)
    res = eigsh(HessianOperator(model, None, batch), k, which, return_vectors=True)
    assert res.converged
    ref = evals[idx]
    assert float(((res.values - ref).abs() / ref.abs()).max()) <= 1e-4
    # eigenvectors: Davis-Kahan, sin(angle) <= residual / gap to the rest of the spectrum
    for j in range(k):
        others = torch.cat([evals[: idx[j]], evals[idx[j] + 1 :]])
        gap = float((others - ref[j]).abs().min())
        cos = float((res.vectors[:, j] @ evecs[:, idx[j]]).abs())
        assert math.sqrt(max(0.0, 1 - cos**2)) <= 2 * float(res.residuals[j]) / gap + 1e-6
        # the reported residual is the true one
        true_res = torch.linalg.vector_norm(H @ res.vectors[:, j] - res.values[j] * res.vectors[:, j])
        assert abs(float(true_res) - float(res.residuals[j])) <= 1e-8 * float(evals.abs().max())


def test_eigsh_scipy_method_agrees(case):
    model, batch, H = case
    ref = torch.linalg.eigvalsh(H).flip(0)[:2]
    res = eigsh(HessianOperator(model, None, batch), 2, "LA", method="scipy", tol=1e-8)
    assert res.converged and float(((res.values - ref).abs() / ref.abs()).max()) <= 1e-6


def test_eigsh_on_dense_matrix_with_known_spectrum():
    g = torch.Generator().manual_seed(5)
    Q, _ = torch.linalg.qr(torch.randn(60, 60, dtype=torch.float64, generator=g))
    lam = torch.cat([torch.tensor([10.0, 7.0, 5.0]), torch.linspace(-2.0, 1.0, 57, dtype=torch.float64)])
    A = Q @ torch.diag(lam.double()) @ Q.T
    top = eigsh(A, 3, "LA", tol=1e-8)
    assert top.converged and torch.allclose(top.values, torch.tensor([10.0, 7.0, 5.0], dtype=torch.float64), rtol=1e-10)
    bottom = eigsh(DenseOperator(A), 2, "SA", tol=1e-8)
    assert torch.allclose(bottom.values, torch.sort(lam)[0][:2].double(), rtol=1e-8)


def test_eigsh_repeated_eigenvalue_found_after_breakdown():
    A = torch.diag(torch.tensor([3.0, 3.0, 1.0, 0.5], dtype=torch.float64))
    res = eigsh(A, 2, "LA", tol=1e-10)
    assert torch.allclose(res.values, torch.tensor([3.0, 3.0], dtype=torch.float64))


def test_eigsh_reports_unconverged():
    A = torch.diag(torch.linspace(0, 1, 200, dtype=torch.float64))  # clustered: slow convergence
    res = eigsh(A, 1, "LA", tol=1e-12, max_iter=5)
    assert not res.converged and res.num_matvecs == 5


@pytest.mark.parametrize(
    "kwargs, match",
    [({"k": 0}, "invalid k"), ({"tol": 0.0}, "invalid tol"), ({"which": "LM"}, "unknown which"),
     ({"method": "power"}, "unknown eigen method"), ({"k": 11}, "only 10")],
)
def test_eigsh_rejects_bad_arguments(kwargs, match):
    with pytest.raises(GradlabError, match=match):
        eigsh(torch.eye(10, dtype=torch.float64), **kwargs)


def test_dense_hessian_refuses_large_models():
    model = nn.Linear(100, 60).double()
    with pytest.raises(GradlabError, match="too large"):
        dense_hessian(model, None, (torch.rand(4, 100, dtype=torch.float64), torch.zeros(4, dtype=torch.long)))


def test_hutchinson_trace_within_three_stderr(case):
    model, batch, H = case
    exact = float(torch.trace(H))
    op = HessianOperator(model, None, batch)
    res = hutchinson_trace(op, 60, seed=7)
    assert res.num_matvecs == 60 and abs(res.estimate - exact) <= 3 * res.stderr
    adaptive = hutchinson_trace(op, rel_tol=0.2, seed=8)
    assert adaptive.num_matvecs < 1000 and adaptive.stderr <= 0.2 * abs(adaptive.estimate) and abs(adaptive.estimate - exact) <= 3 * adaptive.stderr


def test_adaptive_hutchinson_handles_negative_trace():
    A = -torch.diag(torch.linspace(1, 2, 50, dtype=torch.float64)) + 0.3 * torch.ones(50, 50, dtype=torch.float64)
    res = hutchinson_trace(A, rel_tol=0.02, seed=0)
    assert res.num_matvecs >= 10 and abs(res.estimate - float(torch.trace(A))) <= 3 * res.stderr


def test_variance_reduced_traces_are_much_more_accurate():
    # a decaying spectrum, as in network Hessians: Hutch++/XTrace should beat Hutchinson per product
    g = torch.Generator().manual_seed(9)
    Q, _ = torch.linalg.qr(torch.randn(300, 300, dtype=torch.float64, generator=g))
    lam = 100.0 * torch.arange(1, 301, dtype=torch.float64) ** -2.0
    A = Q @ torch.diag(lam) @ Q.T
    exact = float(lam.sum())
    errs = {f.__name__: [] for f in (hutchinson_trace, hutchpp_trace, xtrace, krylov_trace)}
    for seed in range(5):
        for f in (hutchinson_trace, hutchpp_trace, xtrace, krylov_trace):
            errs[f.__name__].append(abs(f(A, 60, seed=seed).estimate - exact))
    mean = {k: sum(v) / len(v) for k, v in errs.items()}
    assert mean["hutchpp_trace"] * 5 < mean["hutchinson_trace"]
    assert mean["xtrace"] * 5 < mean["hutchinson_trace"]
    assert mean["krylov_trace"] * 5 < mean["hutchinson_trace"]
    res = xtrace(A, 60, seed=0)
    assert res.num_matvecs == 60 and abs(res.estimate - exact) <= 4 * res.stderr + 1e-12


def test_xtrace_is_exact_for_low_rank():
    g = torch.Generator().manual_seed(10)
    B = torch.randn(80, 5, dtype=torch.float64, generator=g)
    A = B @ B.T  # rank 5 < s - 1: every leave-one-out sketch captures the whole range
    assert abs(xtrace(A, 20).estimate - float(torch.trace(A))) < 1e-8 * float(torch.trace(A))
    assert abs(hutchpp_trace(A, 30).estimate - float(torch.trace(A))) < 1e-8 * float(torch.trace(A))
    assert abs(krylov_trace(A, 20).estimate - float(torch.trace(A))) < 1e-8 * float(torch.trace(A))


@pytest.mark.parametrize("method", ["hutchpp_trace", "xtrace", "krylov_trace"])
def test_variance_reduced_traces_unbiased_on_model_hessian(case, method):
    model, batch, H = case
    exact = float(torch.trace(H))
    fn = {"hutchpp_trace": hutchpp_trace, "xtrace": xtrace, "krylov_trace": krylov_trace}[method]
    op = HessianOperator(model, None, batch)
    ests = torch.tensor([fn(op, 30, seed=s).estimate for s in range(12)], dtype=torch.float64)
    # the mean of 12 independent estimates is within 4 of its standard errors of the exact trace
    assert abs(float(ests.mean()) - exact) <= 4 * float(ests.std()) / math.sqrt(12) + 1e-10


def test_hutchinson_diagonal_unbiased(case):
    model, batch, H = case
    res = hutchinson_diag(HessianOperator(model, None, batch), 200, seed=11)
    z = (res.estimate - torch.diagonal(H)) / res.stderr.clamp_min(1e-12)
    assert float((z.abs() <= 4).double().mean()) > 0.95


def test_slq_density_integrates_to_one_and_mean_is_trace_over_n(case):
    model, batch, H = case
    n = H.shape[0]
    d = slq_density(HessianOperator(model, None, batch), num_starts=30, lanczos_steps=15, seed=12)
    assert abs(float(torch.trapezoid(d.density, d.grid)) - 1.0) < 1e-9
    assert torch.allclose(d.weights.sum(1), torch.ones(30, dtype=torch.float64), atol=1e-10)
    per_start = (d.nodes * d.weights).sum(1)  # each = v^T H v, a Hutchinson sample of tr/n
    stderr = float(per_start.std()) / math.sqrt(30)
    assert abs(d.mean - float(torch.trace(H)) / n) <= 3 * stderr
    # the density's own first moment agrees with the quadrature mean (broadening is symmetric)
    assert abs(float(torch.trapezoid(d.grid * d.density, d.grid)) - d.mean) < 1e-3 * float(H.abs().max())


def test_slq_mean_exact_for_diagonal_matrix():
    lam = torch.linspace(-1, 3, 40, dtype=torch.float64)
    d = slq_density(torch.diag(lam), num_starts=2, lanczos_steps=40)
    assert abs(d.mean - float(lam.mean())) < 1e-12  # Rademacher: v^T D v / n = tr(D)/n exactly
    # enough steps: the quadrature nodes are the eigenvalues themselves
    assert torch.allclose(torch.sort(d.nodes[0])[0], lam, atol=1e-8)


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("backend", ["double-backward", "func"])
def test_mode_restored_and_batchnorm_untouched(mode, backend):
    model = bn_dropout_net()
    x, y = data_for(model, n=16)
    model.train()
    model[3].eval()  # a mixed state must be restored exactly
    stats = [b.clone() for b in model.buffers()]
    op = HessianOperator(model, None, (x, y), backend=backend, mode=mode)
    v = torch.randn(op.n, dtype=torch.float64, generator=torch.Generator().manual_seed(13))
    h1, h2 = op.matvec(v), op.matvec(v)
    assert torch.allclose(h1, h2, rtol=1e-10, atol=1e-12)  # same dropout masks every product
    assert [m.training for m in model.modules()] == [True, True, True, True, False, True]
    assert all(torch.equal(a, b) for a, b in zip(stats, model.buffers()))
    if mode == "eval":
        assert rel(h1, dense_hessian(model, None, (x, y), mode="eval") @ v) < 1e-8


def test_both_backends_agree_in_train_mode_with_dropout():
    model = bn_dropout_net()
    x, y = data_for(model, n=16)
    ops = [HessianOperator(model, None, (x, y), backend=b, mode="train", seed=3) for b in ("double-backward", "func")]
    v = torch.randn(ops[0].n, dtype=torch.float64, generator=torch.Generator().manual_seed(14))
    assert rel(ops[0].matvec(v), ops[1].matvec(v)) < 1e-8


def test_bad_backend_and_mode_rejected(case):
    model, batch, _ = case
    with pytest.raises(GradlabError, match="unknown HVP backend"):
        HessianOperator(model, None, batch, backend="magic")
    with pytest.raises(GradlabError, match="unknown mode"):
        HessianOperator(model, None, batch, mode="test")


def test_rademacher_like_draws_balanced_independent_signs():
    """One byte gives eight signs through a table: every bit position must be fair and independent."""
    from gradlab.curvature.sampling import rademacher_like

    shapes = [(3, 5), (7,), (2, 3, 3), (0,), (40_000,)]
    like = [torch.zeros(s, dtype=torch.float64 if i == 1 else torch.float32) for i, s in enumerate(shapes)]
    draw = rademacher_like(like, torch.Generator().manual_seed(3))
    again = rademacher_like(like, torch.Generator().manual_seed(3))
    for z, t, z2 in zip(draw, like, again):
        assert z.shape == t.shape and z.dtype == t.dtype
        assert torch.equal(z, z2)  # the generator alone fixes the draw
        assert bool(((z == 1) | (z == -1)).all())
    big = torch.cat([rademacher_like([torch.zeros(80_000)], torch.Generator().manual_seed(s))[0] for s in range(5)])
    n = big.numel()
    assert abs(big.mean().item()) < 5 / math.sqrt(n)
    by_position = big.view(-1, 8).mean(0)  # each of the byte's eight bits on its own
    assert by_position.abs().max().item() < 5 / math.sqrt(n / 8)
    for lag in (1, 7, 8, 9):  # neighbours inside a byte and across bytes are uncorrelated
        assert abs((big[:-lag] * big[lag:]).mean().item()) < 5 / math.sqrt(n)
    # tensors of one dtype share a draw, but their entries differ from one another
    a, b = rademacher_like([torch.zeros(4096), torch.zeros(4096)], torch.Generator().manual_seed(0))
    assert not torch.equal(a, b)
