"""Issue 18: no host-device copies inside inner loops (Lanczos, eigsh, HVPs, attack steps, grids).

Counted on the CPU with :class:`synccount.HostSyncs` (every ``item``/``float``/``bool``/``tolist``/
``cpu``/``nonzero``/boolean-mask index): the count of a run must not grow with its iterations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from synccount import HostSyncs


def _net(dtype=torch.float32):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 12), torch.nn.Tanh(), torch.nn.Linear(12, 4))
    net.to(dtype)
    x = torch.rand(24, 1, 4, 4, dtype=dtype)
    with torch.no_grad():
        y = net(x).argmax(1)  # every example classified correctly: attacks run all their steps
    return net, x, y


def test_a_sync_free_lanczos_step_reads_nothing_back_and_matches_the_dense_spectrum():
    from gradlab.curvature.hessian_op import HessianOperator, dense_hessian
    from gradlab.curvature.lanczos import Lanczos

    net, x, y = _net(torch.float64)
    op = HessianOperator(net, F.cross_entropy, data=[(x, y)])
    counts, tops = [], {}
    for sync_free in (True, False):
        for m in (4, 40):
            v0 = torch.randn(1, op.n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
            with HostSyncs() as s:
                lz = Lanczos(op, v0, generator=torch.Generator().manual_seed(0), sync_free=sync_free)
                for _ in range(m):
                    lz.step()
                theta = lz.ritz()[0][0]
            if sync_free:
                counts.append(s.count)
            tops[sync_free, m] = theta[-1].item()
    assert counts == [0, 0], counts  # the HVPs and the recurrence: nothing read back
    exact = torch.linalg.eigvalsh(dense_hessian(net, F.cross_entropy, data=[(x, y)]).double())[-1].item()
    assert abs(tops[True, 40] - exact) <= 1e-6 * abs(exact)
    assert abs(tops[True, 40] - tops[False, 40]) <= 1e-9 * abs(exact)  # the same Krylov space
    assert abs(tops[True, 4] - tops[False, 4]) <= 1e-9 * abs(exact)


def test_eigsh_reads_back_one_value_per_step_its_convergence_test():
    from gradlab.curvature.eigen import eigsh

    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(60, 60, dtype=torch.float64))
    A = q @ torch.diag(torch.linspace(1, 2, 60, dtype=torch.float64)) @ q.T  # slow to converge
    per_step = []
    for it in (20, 40):
        with HostSyncs() as s:
            r = eigsh(A, k=2, tol=1e-14, max_iter=it, seed=0, sync_free=True)
        assert r.num_matvecs == it
        per_step.append(s.count - (it - 4 + 1))  # steps from min_steps = k + 2 on: one read each
    assert per_step[0] == per_step[1] and per_step[0] <= 4, per_step


def test_attack_steps_read_nothing_back():
    from gradlab.attacks import build_attack

    net, x, y = _net()
    for name, few, many in (("pgd", 2, 12), ("apgd", 4, 20)):
        counts = []
        for steps in (few, many):
            attack = build_attack(name, net, 0.05, seed=0, steps=steps)
            with HostSyncs() as s:
                attack(x, y)
            counts.append(s.count)
        assert counts[0] == counts[1], (name, counts)


def test_a_landscape_grid_reads_back_once_whatever_its_size():
    from gradlab.landscape.grid import evaluate_grid, grid_coords, make_axes

    net, x, y = _net()
    d = [{n: torch.randn_like(p) for n, p in net.named_parameters()} for _ in range(2)]
    batches = [(x[:12], y[:12]), (x[12:], y[12:])]
    counts, results = [], []
    for steps, ppc in ((3, 1), (7, 1), (3, 4), (7, 4)):
        coords = grid_coords(make_axes(-1.0, 1.0, steps, 2))
        with HostSyncs() as s:
            res = evaluate_grid(net, d, coords, batches, points_per_call=ppc)
        counts.append(s.count)
        results.append(res)
    assert counts[0] == counts[1] and counts[2] == counts[3], counts
    # the device-side float64 sums equal a plain loop of per-batch means weighted by size
    live = dict(net.named_parameters())
    saved = {n: p.detach().clone() for n, p in live.items()}
    res = results[1]
    for g in (0, 17, 48):
        c = res.coords[g].tolist()
        with torch.no_grad():
            for n, p in live.items():
                p.copy_(saved[n] + c[0] * d[0][n] + c[1] * d[1][n])
            ref = sum(F.cross_entropy(net(xb), yb).item() * len(yb) for xb, yb in batches) / len(y)
            for n, p in live.items():
                p.copy_(saved[n])
        assert abs(res.loss[g].item() - ref) <= 1e-6 * max(1.0, ref)
    assert torch.allclose(results[3].loss, results[1].loss, rtol=1e-5)


def test_the_sync_free_restart_finds_repeated_eigenvalues_as_the_host_checked_one_does():
    from gradlab.curvature.eigen import eigsh

    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64))
    vals = torch.tensor([3.0, 3.0, 2.0, 2.0] + [1.0] * 8, dtype=torch.float64)
    A = q @ torch.diag(vals) @ q.T  # a 3-dimensional Krylov space: copies need restarts
    for sync_free in (True, False):
        r = eigsh(A, k=4, tol=1e-10, seed=0, sync_free=sync_free)
        assert torch.allclose(r.values, torch.tensor([3.0, 3.0, 2.0, 2.0], dtype=torch.float64), atol=1e-9)
