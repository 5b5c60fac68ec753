"""AdaHessian and curvature-aware GD: hand computations against a dense float64 Hessian, the closure
contract, delayed Hessian updates, conv kernels of every rank, RNG hygiene and data-parallel
averaging. (Each-entry-reduces-the-loss and the state_dict round-trip live in test_optim.py.)
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import gradlab.optim.adahessian as adahessian_module
import gradlab.optim.hessian_diag as hessian_diag
from gradlab.core.errors import GradlabError
from gradlab.optim import build_optimizer
from gradlab.optim.adahessian import AdaHessian
from gradlab.optim.curvature_gd import CurvatureGD
from gradlab.optim.hessian_diag import spatial_average

D64 = torch.float64


class TinyConvNet(nn.Module):
    """Conv1d (a 3-D weight, so spatial averaging applies) -> tanh -> Linear; 15 parameters."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(1, 2, kernel_size=3)
        self.fc = nn.Linear(6, 1)

    def forward(self, x):  # x: (N, 1, 5)
        return self.fc(torch.tanh(self.conv(x)).flatten(1)).squeeze(1)


def tiny_problem(seed=0):
    torch.manual_seed(seed)
    model = TinyConvNet().to(D64)
    x = torch.randn(8, 1, 5, dtype=D64)
    y = torch.randn(8, dtype=D64)
    return model, x, y


def dense_reference(model, x, y):
    """Flat parameters, and the loss as a function of them (for exact gradients and Hessians)."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]

    def unflatten(theta):
        return {n: t.view(s) for n, t, s in zip(names, torch.split(theta, sizes), shapes)}

    def loss(theta):
        return F.mse_loss(functional_call(model, unflatten(theta), (x,)), y)

    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return theta, loss, unflatten


def fixed_probes(model, count):
    """``count`` deterministic +-1 probe sets (one tensor per parameter), not from any RNG."""
    sets = []
    for s in range(count):
        sets.append([
            torch.tensor([1.0 if (i * 7 + s * 3 + j) % 3 else -1.0 for i in range(p.numel())], dtype=D64).view(p.shape)
            for j, p in enumerate(model.parameters())
        ])
    return sets


@pytest.mark.parametrize("hessian_power,weight_decay", [(1.0, 0.0), (0.5, 0.01)])
def test_adahessian_first_two_updates_equal_a_hand_computation(hessian_power, weight_decay):
    model, x, y = tiny_problem()
    theta, loss_fn, unflatten = dense_reference(model, x, y)
    probes = fixed_probes(model, 2)
    lr, b1, b2, eps = 0.15, 0.9, 0.999, 1e-4
    opt = AdaHessian(model.parameters(), lr=lr, hessian_power=hessian_power, weight_decay=weight_decay,
                     vecs_fn=lambda params, it=iter(probes): next(it))

    m = torch.zeros_like(theta)
    v = torch.zeros_like(theta)
    for t in (1, 2):
        g = torch.func.grad(loss_fn)(theta)
        hess = torch.autograd.functional.hessian(loss_fn, theta)  # (15, 15) dense
        z = torch.cat([p.reshape(-1) for p in probes[t - 1]])
        diag = z * (hess @ z)
        # AdaHessian's |D| with the conv kernel (2, 1, 3) averaged over its 3 taps, written out by hand
        parts = unflatten(diag.clone())
        w = parts["conv.weight"].abs()
        parts = {k: p.abs() for k, p in parts.items()}
        parts["conv.weight"] = ((w[:, :, 0] + w[:, :, 1] + w[:, :, 2]) / 3).unsqueeze(2).expand(2, 1, 3)
        d = torch.cat([parts[n].reshape(-1) for n, _ in model.named_parameters()])
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * d * d
        denom = torch.sqrt(v / (1 - b2 ** t)) ** hessian_power + eps
        theta = theta - lr * (m / (1 - b1 ** t) / denom + weight_decay * theta)

        opt.zero_grad()
        opt.step(lambda: F.mse_loss(model(x), y))
        ours = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        assert torch.allclose(ours, theta, rtol=0, atol=1e-12), t


def test_curvature_gd_step_is_the_damped_newton_closed_form_on_a_diagonal_quadratic():
    """L = 1/2 sum a (w - c)^2 has H = diag(a), so Hutchinson z * Hz is exact for every z."""
    a = torch.tensor([2.0, -3.0, 0.5, 5.0, 1e-3, 4.0], dtype=D64)
    c = torch.tensor([1.0, 2.0, -1.0, 0.5, 3.0, -2.0], dtype=D64)
    w_vec = nn.Parameter(torch.zeros(2, dtype=D64))
    w_mat = nn.Parameter(torch.zeros(2, 2, dtype=D64))

    def loss():
        w = torch.cat([w_vec, w_mat.reshape(-1)])
        return 0.5 * (a * (w - c) ** 2).sum()

    lr, damping = 0.7, 0.05
    opt = CurvatureGD([w_vec, w_mat], lr=lr, damping=damping)  # hessian_ema 0.9: constant D stays D
    w_ref = torch.zeros(6, dtype=D64)
    for _ in range(3):
        w_ref = w_ref - lr * a * (w_ref - c) / (a.abs() + damping)
        opt.step(loss)
        assert torch.allclose(torch.cat([w_vec.detach(), w_mat.detach().reshape(-1)]), w_ref, rtol=0, atol=1e-12)


def test_curvature_gd_newton_step_reaches_the_minimum_of_a_convex_diagonal_quadratic():
    a, c = torch.tensor([2.0, 0.5, 7.0], dtype=D64), torch.tensor([1.0, -1.0, 4.0], dtype=D64)
    w = nn.Parameter(torch.zeros(3, dtype=D64))
    CurvatureGD([w], lr=1.0, damping=1e-12, hessian_ema=0.0).step(lambda: 0.5 * (a * (w - c) ** 2).sum())
    assert torch.allclose(w.detach(), c, atol=1e-10)


def test_closure_contract_works_in_a_plain_loop_without_backward():
    model, x, y = tiny_problem()
    twin, _, _ = tiny_problem()
    opt = AdaHessian(model.parameters())
    losses = []
    for _ in range(30):
        opt.zero_grad()
        losses.append(opt.step(lambda: F.mse_loss(model(x), y)).item())
    assert losses[-1] < 0.5 * losses[0]

    # p.grad after step 1 is the plain gradient, with no graph attached
    opt = AdaHessian(twin.parameters(), lr=0.05)
    ref = torch.autograd.grad(F.mse_loss(twin(x), y), list(twin.parameters()))
    loss = opt.step(lambda: F.mse_loss(twin(x), y))
    assert loss.grad_fn is None and not loss.requires_grad
    for p, g in zip(twin.parameters(), ref):
        assert p.grad.grad_fn is None and not p.grad.requires_grad
        assert torch.allclose(p.grad, g, rtol=0, atol=1e-15)


def test_closure_misuse_raises_a_clear_error():
    model, x, y = tiny_problem()
    for cls in (AdaHessian, CurvatureGD):
        opt = cls(model.parameters())
        with pytest.raises(GradlabError, match="needs a closure that returns the loss"):
            opt.step()
        with pytest.raises(GradlabError, match="must return the loss tensor"):
            opt.step(lambda: F.mse_loss(model(x), y).item())
        assert cls.needs_loss_closure is True


@pytest.mark.parametrize("name", ["adahessian", "curvature-gd"])
def test_delayed_update_computes_the_diagonal_only_every_k_steps(name, monkeypatch):
    calls = []
    real = hessian_diag.hvp_from_grads

    def counting(grads, params, vecs, **kw):
        calls.append(kw.get("retain_graph"))
        return real(grads, params, vecs, **kw)

    monkeypatch.setattr(hessian_diag, "hvp_from_grads", counting)
    model, x, y = tiny_problem()
    opt = build_optimizer(name, model.parameters(), hessian_update_every=3, hessian_warmup=0)
    for _ in range(7):
        opt.step(lambda: F.mse_loss(model(x), y))
    assert len(calls) == 3 == opt.hvp_count  # steps 0, 3, 6
    assert calls == [False] * 3  # one probe per refresh: the graph is freed by it

    calls.clear()
    opt = build_optimizer(name, model.parameters(), hessian_update_every=3)  # default warm-up: 10 steps
    for _ in range(17):
        opt.step(lambda: F.mse_loss(model(x), y))
    assert len(calls) == 10 + 3 == opt.hvp_count  # steps 0-9, then 10, 13, 16

    calls.clear()
    opt = build_optimizer(name, model.parameters(), hessian_samples=2)
    for _ in range(2):
        opt.step(lambda: F.mse_loss(model(x), y))
    assert calls == [True, False] * 2 and opt.hvp_count == 4


def test_delayed_update_reuses_the_last_diagonal_between_refreshes():
    """With k=2, step 2's |D| is step 1's: v follows b2 v + (1 - b2) D_1^2 twice."""
    model, x, y = tiny_problem()
    opt = AdaHessian(model.parameters(), hessian_every=2, hessian_warmup=0)
    opt.step(lambda: F.mse_loss(model(x), y))
    d1 = {p: opt.state[p]["hessian_diag"].clone() for p in model.parameters()}
    opt.step(lambda: F.mse_loss(model(x), y))
    for p in model.parameters():
        assert torch.equal(opt.state[p]["hessian_diag"], d1[p])
        expected = (0.999 * 0.001 + 0.001) * d1[p] ** 2
        assert torch.allclose(opt.state[p]["exp_hessian_diag_sq"], expected.expand_as(p), rtol=1e-14, atol=0)


class ConvZoo(nn.Module):
    """Parameters of rank 1 to 5: Conv1d (3-D), Conv2d (4-D), Conv3d (5-D), Linear (2-D), biases (1-D)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(2, 3, 3)
        self.c2 = nn.Conv2d(2, 3, 3)
        self.c3 = nn.Conv3d(2, 3, 2)
        self.fc = nn.Linear(3 * 3 + 3 * 2 * 2 + 3 * 2 * 2 * 2, 4)

    def forward(self, x1, x2, x3):
        h = [torch.tanh(self.c1(x1)).flatten(1), torch.tanh(self.c2(x2)).flatten(1), torch.tanh(self.c3(x3)).flatten(1)]
        return self.fc(torch.cat(h, 1))


def test_adahessian_handles_conv1d_conv2d_conv3d_kernels():
    torch.manual_seed(0)
    model = ConvZoo()
    x1, x2, x3 = torch.randn(16, 2, 5), torch.randn(16, 2, 4, 4), torch.randn(16, 2, 3, 3, 3)
    y = torch.randint(0, 4, (16,))
    opt = AdaHessian(model.parameters(), lr=0.05)
    losses = [opt.step(lambda: F.cross_entropy(model(x1, x2, x3), y)).item() for _ in range(20)]
    assert losses[-1] < 0.7 * losses[0]
    expected_shapes = {1: lambda s: s, 2: lambda s: s, 3: lambda s: (*s[:2], 1),
                       4: lambda s: (*s[:2], 1, 1), 5: lambda s: (*s[:2], 1, 1, 1)}
    for p in model.parameters():
        d = opt.state[p]["hessian_diag"]
        assert d.shape == expected_shapes[p.dim()](tuple(p.shape)), p.shape
        assert opt.state[p]["exp_hessian_diag_sq"].shape == p.shape


def test_spatial_average_is_the_mean_magnitude_over_each_kernel():
    torch.manual_seed(1)
    for shape in [(3,), (4, 3), (4, 3, 5), (4, 3, 2, 2), (4, 3, 2, 3, 2)]:
        d = torch.randn(shape, dtype=D64)
        out = spatial_average(d)
        if len(shape) < 3:
            assert torch.equal(out, d.abs())
            continue
        for o, i in itertools.product(range(shape[0]), range(shape[1])):
            assert out[o, i].item() == pytest.approx(d[o, i].abs().sum().item() / d[o, i].numel(), rel=1e-14)


@pytest.mark.parametrize("cls", [AdaHessian, CurvatureGD])
def test_second_order_optimizers_leave_the_global_rng_alone_and_are_seeded(cls):
    results = []
    for seed in (3, 3, 4):
        model, x, y = tiny_problem()
        state = torch.get_rng_state()
        opt = cls(model.parameters(), seed=seed)
        for _ in range(3):
            opt.step(lambda: F.mse_loss(model(x), y))
        assert torch.equal(torch.get_rng_state(), state)
        results.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    assert torch.equal(results[0], results[1]) and not torch.equal(results[0], results[2])


def test_unused_and_frozen_parameters_are_handled():
    model, x, y = tiny_problem()
    unused = nn.Parameter(torch.ones(3, dtype=D64))
    model.fc.bias.requires_grad_(False)
    frozen = model.fc.bias.detach().clone()
    opt = AdaHessian([*model.parameters(), unused])
    for _ in range(2):
        opt.step(lambda: F.mse_loss(model(x), y))
    assert torch.equal(unused.grad, torch.zeros(3, dtype=D64))
    assert torch.equal(unused.detach(), torch.ones(3, dtype=D64))
    assert torch.equal(model.fc.bias.detach(), frozen)


# -- data parallel: gradient and raw diagonal averaged across ranks ----------------------------------

def _ddp_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for name in ("adahessian", "curvature-gd"):
            model, x, y = tiny_problem()
            half = len(x) // world
            xb, yb = x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half]
            opt = build_optimizer(name, model.parameters(), seed=7)
            for _ in range(2):
                opt.step(lambda: F.mse_loss(model(xb), yb))
            torch.save([p.detach() for p in model.parameters()], f"{out_dir}/{name}-rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_data_parallel_matches_one_process_on_the_global_batch(tmp_path):
    """Each rank sees half the batch; the all-reduce of g and of the raw z * Hz (before |.|) makes
    both ranks take exactly the single-process step on the whole batch."""
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for name in ("adahessian", "curvature-gd"):
        model, x, y = tiny_problem()
        opt = build_optimizer(name, model.parameters(), seed=7)
        for _ in range(2):
            opt.step(lambda: F.mse_loss(model(x), y))
        for rank in range(2):
            got = torch.load(tmp_path / f"{name}-rank{rank}.pt", weights_only=True)
            for a, b in zip(got, model.parameters()):
                assert torch.allclose(a, b.detach(), rtol=0, atol=1e-12), (name, rank)


def test_docstring_examples_run():
    """The closure-contract examples in the docstrings are runnable as written."""
    import doctest

    import gradlab.optim as optim_pkg
    import gradlab.optim.adahessian as ada_mod
    import gradlab.optim.curvature_gd as cgd_mod

    for module in (ada_mod, cgd_mod, optim_pkg):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.attempted > 0 and result.failed == 0, module.__name__


def test_adahessian_resumes_from_a_state_saved_before_the_squared_diagonal_was_kept():
    """Checkpoints written before ``hessian_diag_sq`` existed hold only ``hessian_diag``: a resumed
    optimizer rebuilds the square and takes the same steps as one that never stopped."""
    model, x, y = tiny_problem()
    twin, _, _ = tiny_problem()
    closure = lambda m: (lambda: F.mse_loss(m(x), y))  # noqa: E731
    opt = AdaHessian(model.parameters(), hessian_every=3, hessian_warmup=0)
    for _ in range(2):
        opt.step(closure(model))
    old = copy.deepcopy(opt.state_dict())  # as a checkpoint would: no tensors shared with opt
    for s in old["state"].values():
        del s["hessian_diag_sq"]
    twin.load_state_dict(model.state_dict())
    resumed = AdaHessian(twin.parameters(), hessian_every=3, hessian_warmup=0)
    resumed.load_state_dict(old)
    for _ in range(4):  # a stale-diagonal step first, then a refresh and more
        opt.step(closure(model))
        resumed.step(closure(twin))
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-14)


def test_adahessian_parameters_at_different_step_counts_get_their_own_bias_corrections():
    """A parameter frozen for the first step joins at t=1 while the others are at t=2 (the
    per-tensor branch of the update): its step equals that of a fresh optimizer's first step."""
    model, x, y = tiny_problem()
    twin, _, _ = tiny_problem()
    probes = fixed_probes(model, 1)[0]
    fixed = lambda params: [z for z, p in zip(probes, model.parameters()) if p.requires_grad]  # noqa: E731
    opt = AdaHessian(model.parameters(), weight_decay=0.01, vecs_fn=fixed)
    model.fc.bias.requires_grad_(False)
    opt.step(lambda: F.mse_loss(model(x), y))
    model.fc.bias.requires_grad_(True)
    twin.load_state_dict(model.state_dict())
    fresh = AdaHessian(twin.parameters(), weight_decay=0.01, vecs_fn=lambda params: probes)
    opt.step(lambda: F.mse_loss(model(x), y))
    fresh.step(lambda: F.mse_loss(twin(x), y))
    assert opt.state[model.fc.bias]["step"] == 1 and opt.state[model.fc.weight]["step"] == 2
    assert torch.allclose(model.fc.bias, twin.fc.bias, rtol=0, atol=1e-14)
    assert not torch.allclose(model.fc.weight, twin.fc.weight, rtol=0, atol=1e-6)  # t=2 there


def reference_adahessian(params, grad_and_diag, steps, *, lr=0.15, betas=(0.9, 0.999), eps=1e-4, weight_decay=0.0,
                         hessian_power=1.0, every=1, warmup=10):
    """AdaHessian written per tensor, one formula of the module docstring per line (Yao et al.
    2021, with the delayed update): ``grad_and_diag(t)`` gives the gradients and the raw z * Hz."""
    b1, b2 = betas
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    d = [None] * len(params)
    for t in range(steps):
        grads, raw = grad_and_diag(t)
        refresh = t < warmup or (t - warmup) % every == 0
        assert (raw is not None) == refresh
        for i, p in enumerate(params):
            if refresh:
                a = raw[i].abs()
                d[i] = a.mean(dim=tuple(range(2, a.dim())), keepdim=True) if a.dim() >= 3 else a
            m[i] = b1 * m[i] + (1 - b1) * grads[i]
            v[i] = b2 * v[i] + (1 - b2) * d[i] * d[i]
            m_hat, v_hat = m[i] / (1 - b1 ** (t + 1)), v[i] / (1 - b2 ** (t + 1))
            p.mul_(1 - lr * weight_decay)
            p.sub_(lr * m_hat / (v_hat.sqrt() ** hessian_power + eps))
    return m, v


@pytest.mark.parametrize("hessian_power", [1.0, 0.5])
def test_adahessian_foreach_update_equals_a_per_tensor_reference_loop(hessian_power):
    """Over 12 steps with weight decay, a conv kernel and delayed refreshes (warm-up 2, then every
    3rd step), the whole-group foreach update equals the per-tensor formulas to float64 rounding:
    parameters, first moments and second moments."""
    x = torch.randn(32, 1, 6, 6, generator=torch.Generator().manual_seed(0), dtype=D64)
    y = torch.randint(0, 3, (32,), generator=torch.Generator().manual_seed(1))

    def model():
        torch.manual_seed(1)
        return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3)).double()

    net, ref = model(), model()
    gen, drawn = torch.Generator().manual_seed(4), []

    def probes(params):  # recorded, so that the reference uses the very same z
        drawn.append([torch.randint(0, 2, p.shape, generator=gen, dtype=D64) * 2 - 1 for p in params])
        return drawn[-1]

    opt = AdaHessian(net.parameters(), weight_decay=0.01, hessian_every=3, hessian_warmup=2,
                     hessian_power=hessian_power, vecs_fn=probes)
    for _ in range(12):
        opt.zero_grad()
        opt.step(lambda: F.cross_entropy(net(x), y))
    assert len(drawn) == 2 + 4  # steps 0, 1, then 2, 5, 8, 11

    names = [n for n, _ in ref.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in ref.parameters()]
    refreshes = iter(drawn)

    def grad_and_diag(t):
        """The gradient at the reference's own parameters, and z * Hz from a dense-free double backward."""
        refresh = t < 2 or (t - 2) % 3 == 0
        with torch.enable_grad():
            loss = F.cross_entropy(functional_call(ref, dict(zip(names, params)), (x,)), y)
            grads = torch.autograd.grad(loss, params, create_graph=refresh)
            if not refresh:
                return [g.detach() for g in grads], None
            z = next(refreshes)
            hz = torch.autograd.grad(grads, params, z)
        return [g.detach() for g in grads], [zi * h for zi, h in zip(z, hz)]

    with torch.no_grad():
        m, v = reference_adahessian(params, grad_and_diag, 12, weight_decay=0.01, hessian_power=hessian_power,
                                    every=3, warmup=2)
    for p, q, mi, vi in zip(net.parameters(), params, m, v):
        torch.testing.assert_close(p, q.detach(), rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(opt.state[p]["exp_avg"], mi, rtol=1e-12, atol=1e-18)
        torch.testing.assert_close(opt.state[p]["exp_hessian_diag_sq"], vi, rtol=1e-12, atol=1e-24)
    assert not torch.equal(next(model().parameters()), next(net.parameters()))


def test_adahessian_source_uses_no_private_torch_names():
    """Only torch._foreach_* (the ops torch.optim itself runs) may appear in gradlab/optim."""
    import pathlib
    import re

    root = pathlib.Path(adahessian_module.__file__).parent
    for path in root.glob("*.py"):
        for name in re.findall(r"torch(?:\.[a-z_]+)*\._[a-zA-Z]\w*", path.read_text()):
            assert name.startswith("torch._foreach_"), (path.name, name)
