"""GGN, Fisher and empirical-Fisher products and K-FAC factors: gradlab vs curvlinops and BackPACK.

One process, the same model, batch and parameters for every library:

* ``mlp``: the digits 64-128-128-10 tanh MLP (26k parameters), batch 128;
* ``cnn``: the digits 6.3k-parameter tanh CNN (two convolutions and a linear head), batch 128;
* ``cnn32``: a ReLU CNN on 3x32x32 inputs (three convolutions, 16/32/64 channels, linear head;
  47k parameters), batch 128, random inputs and labels.

Measured, each as the median of ``--calls`` calls, for ``--rounds`` rounds with the methods
interleaved inside a round (load on a shared machine hits all alike); the printed ratio is
gradlab's time over the peer's, median and range over the rounds:

* ``ggn``: one GGN-vector product, ``GGNOperator`` vs curvlinops ``GGNLinearOperator``;
* ``fisher``: one true-Fisher (1 Monte Carlo label) product, ``FisherOperator`` (both backends) vs
  ``FisherMCLinearOperator``; the per-example backend's one-off gradients are timed as ``fisher-setup``
  (against one peer product: the setup pays for itself after that many products);
* ``ef``: the same for the empirical Fisher, ``EmpiricalFisherOperator`` vs ``EFLinearOperator``;
* ``kfac``: computing all Kronecker factors, ``KFACOperator`` vs curvlinops
  ``KFACLinearOperator.compute_kronecker_factors()`` (type-2, MC with 1 and with 8 samples) and
  BackPACK's ``KFAC`` (MC, ``mc_samples`` 1 and 8) and ``KFLR`` (type-2) extensions, each one
  backward pass.

* ``top-5``: the five largest GGN eigenvalues, gradlab ``eigsh(GGNOperator(...), 5)`` (default
  tolerance, operator built inside the timing) against curvlinops' ``GGNLinearOperator`` through
  ``to_scipy()`` and ``scipy.sparse.linalg.eigsh(k=5, which="LA")`` (ARPACK's default tolerance),
  with the relative error of each against a float64 Lanczos solve at tol 1e-10 (``--eig-rounds``).
* ``--cases resnet20`` (with ``--eig-rounds 0 --calls 1``): the products above on resnet20 (random
  3x32x32 inputs, batch 128, eval mode); K-FAC on its Conv2d and Linear parameters, against curvlinops only.
* ``--resnet20``: only the top-5 comparison, for the Hessian (``HessianOperator`` vs
  ``HessianLinearOperator``) and the GGN of resnet20 on random 3x32x32 inputs (batch 128, eval
  mode). Slow on a CPU (a float32 product takes seconds, a float64 one far longer): the float64
  reference (tol 1e-10) starts from the sum of gradlab's five Ritz vectors plus a random
  component, which shortens it and leaves the converged values unchanged.

Before timing, each pair is checked to compute the same matrix (relative difference of products;
Monte Carlo ones only for shape since their labels differ). gradlab's products keep each batch's
graphs after the first product, which is timed separately as ``ggn-first``.

    python benchmarks/bench_curvature_operators.py [--rounds 3] [--calls 5] [--cases mlp,cnn,cnn32] [--threads 1] [--only kfac]
    nice python benchmarks/bench_curvature_operators.py --resnet20 [--eig-rounds 1] [--matrices hessian,ggn]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from gradlab.curvature import (  # noqa: E402
    EmpiricalFisherOperator, FisherOperator, GGNOperator, HessianOperator, KFACOperator, eigsh)


def build(case: str):
    """``(model, x, y)`` for a case, the model briefly trained on digits so probabilities are not uniform."""
    if case == "resnet20":
        return resnet20_case()
    torch.manual_seed(0)
    if case == "cnn32":
        model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1),
                              nn.ReLU(), nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                              nn.Linear(64 * 8 * 8, 10))
        g = torch.Generator().manual_seed(1)
        return model.eval(), torch.randn(128, 3, 32, 32, generator=g), torch.randint(0, 10, (128,), generator=g)
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data / 16.0, dtype=torch.float32)
    x = ((x - x.mean()) / x.std()).view(-1, 1, 8, 8)
    y = torch.tensor(d.target)
    if case == "mlp":
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 10))
    else:
        model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.Tanh(), nn.Conv2d(16, 20, 3, stride=2, padding=1),
                              nn.Tanh(), nn.Flatten(), nn.Linear(20 * 4 * 4, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for step in range(150):
        i = torch.randint(0, len(x), (64,), generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        F.cross_entropy(model(x[i]), y[i]).backward()
        opt.step()
    for p in model.parameters():
        p.grad = None
    return model.eval(), x[:128], y[:128]


def med_time(fn, calls: int) -> float:
    ts = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def rel(a, b) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def backpack_factors(model, x, y, extension):
    """Run one BackPACK KFAC/KFLR backward pass on an extended copy of ``model``; return the factors."""
    from backpack import backpack, extend

    loss = extend(nn.CrossEntropyLoss())(model(x), y)
    with backpack(extension):
        loss.backward()
    out = [p.kflr if hasattr(p, "kflr") else p.kfac for p in model.parameters()]
    for p in model.parameters():
        p.grad = None
    return out


OPERATORS = {"ggn": (GGNOperator, "GGNLinearOperator"), "hessian": (HessianOperator, "HessianLinearOperator")}


def top5_lines(model, x, y, rounds: int, matrix: str = "ggn", warm_reference: bool = False,
               tol: float = 1e-3) -> list[str]:
    """Top-5 eigenvalues of ``matrix``: gradlab's Lanczos vs curvlinops + scipy ``eigsh``, time and
    error against a float64 Lanczos solve at tol 1e-10 (started from gradlab's first Ritz vectors
    plus a random component when ``warm_reference``)."""
    import copy

    import curvlinops as cl
    import numpy as np
    from scipy.sparse.linalg import eigsh as scipy_eigsh

    ours_op, peer_name = OPERATORS[matrix]
    params = [p for p in model.parameters() if p.requires_grad]
    ratios, errs, counts, found = [], ([], []), ([], []), []
    for r in range(rounds):
        t = time.perf_counter()
        res = eigsh(ours_op(model, None, (x, y)), 5, tol=tol, seed=r, return_vectors=warm_reference and r == 0)
        ours = time.perf_counter() - t
        t = time.perf_counter()
        op = getattr(cl, peer_name)(model, nn.CrossEntropyLoss(), params, [(x, y)], progressbar=False,
                                    check_deterministic=False).to_scipy()
        v0 = np.random.default_rng(r).standard_normal(op.shape[0]).astype(np.float32)
        calls = [0]
        inner = op.matvec

        def counted(v, inner=inner):
            calls[0] += 1
            return inner(v)

        op.matvec = counted
        vals = np.sort(scipy_eigsh(op, k=5, which="LA", v0=v0, return_eigenvectors=False))[::-1]
        peer = time.perf_counter() - t
        ratios.append(peer / ours)
        found.append((res.values, torch.from_numpy(vals.copy()).double(), ours, peer))
        counts[0].append(res.num_matvecs)
        counts[1].append(calls[0])
        if r == 0 and warm_reference:
            noise = torch.randn(res.vectors.shape[0], generator=torch.Generator().manual_seed(7), dtype=torch.float64)
            ref_v0 = res.vectors.sum(1) + 1e-2 * noise / noise.norm()
    m64 = copy.deepcopy(model).double()
    t = time.perf_counter()
    ref_res = eigsh(ours_op(m64, None, (x.double(), y)), 5, tol=1e-10, max_iter=400,
                    v0=ref_v0 if warm_reference else None)
    ref, t_ref = ref_res.values, time.perf_counter() - t
    for ours_vals, peer_vals, _, _ in found:
        errs[0].append(float(((ours_vals - ref).abs() / ref.abs()).max()))
        errs[1].append(float(((peer_vals - ref).abs() / ref.abs()).max()))
    med = statistics.median
    lines = [f"  top-5 {matrix} eigenvalues (gradlab tol {tol:g}): gradlab {med(ratios):.2f}x faster than curvlinops + scipy eigsh "
             f"(range {min(ratios):.2f}-{max(ratios):.2f}); max relative error {med(errs[0]):.1e} vs "
             f"{med(errs[1]):.1e}; products {med(counts[0]):.0f} vs {med(counts[1]):.0f}"]
    if warm_reference:
        secs = [f"{a:.1f} s / {b:.1f} s" for *_, a, b in found]
        lines += [f"    times gradlab / peer per round: {', '.join(secs)}; time per product "
                  f"{med(a / c for (*_, a, _), c in zip(found, counts[0])):.2f} s / "
                  f"{med(b / c for (*_, b), c in zip(found, counts[1])):.2f} s",
                  f"    float64 reference: {ref_res.num_matvecs} products in {t_ref:.0f} s, converged "
                  f"{ref_res.converged}, max residual / |lambda| {float((ref_res.residuals / ref.abs()).max()):.1e}",
                  f"    eigenvalues: {', '.join(f'{v:.6g}' for v in ref.tolist())}"]
    return lines


def resnet20_case():
    """resnet20 (eval mode, untrained, seed 0) and a batch of 128 random 3x32x32 inputs and labels."""
    from gradlab.data.base import DataSpec
    from gradlab.models import build_model

    torch.manual_seed(0)
    spec = DataSpec("cifar10", (3, 32, 32), 10, [0.49, 0.48, 0.45], [0.25, 0.24, 0.26])
    model = build_model("resnet20", spec).eval()
    g = torch.Generator().manual_seed(1)
    return model, torch.randn(128, 3, 32, 32, generator=g), torch.randint(0, 10, (128,), generator=g)


def run_case(case: str, args) -> list[str]:
    import copy

    import curvlinops as cl
    from backpack import extend
    from backpack.extensions import KFAC, KFLR

    model, x, y = build(case)
    params = [p for p in model.parameters() if p.requires_grad]
    n = sum(p.numel() for p in params)
    data = [(x, y)]
    ce = nn.CrossEntropyLoss()
    v = torch.randn(n, generator=torch.Generator().manual_seed(3))
    kw = dict(progressbar=False, check_deterministic=False)

    ops = {
        "ggn": (GGNOperator(model, None, (x, y)), cl.GGNLinearOperator(model, ce, params, data, **kw)),
        "ggn-other-jvp": (GGNOperator(model, None, (x, y), jvp="double-backward" if case != "mlp" else "forward"), None),
        "fisher": (FisherOperator(model, None, (x, y), mc_samples=1, backend="per-example"),
                   cl.FisherMCLinearOperator(model, ce, params, data, mc_samples=1, **kw)),
        "fisher-jacobian": (FisherOperator(model, None, (x, y), mc_samples=1, backend="jacobian"), None),
        "ef": (EmpiricalFisherOperator(model, None, (x, y), backend="per-example"),
               cl.EFLinearOperator(model, ce, params, data, **kw)),
        "ef-jacobian": (EmpiricalFisherOperator(model, None, (x, y), backend="jacobian"), None),
    }
    ops["ef-jacobian"] = (ops["ef-jacobian"][0], ops["ef"][1])
    ops["ggn-other-jvp"] = (ops["ggn-other-jvp"][0], ops["ggn"][1])
    ops["fisher-jacobian"] = (ops["fisher-jacobian"][0], ops["fisher"][1])
    lines = [f"{case}: {n} parameters, batch {len(x)}; gradlab's default J v: {ops['ggn'][0].jvp_method} "
             f"(ggn-other-jvp: {ops['ggn-other-jvp'][0].jvp_method})"]
    t0 = time.perf_counter()
    first = ops["ggn"][0].matvec(v)
    lines.append(f"  ggn-first (builds the kept graphs): {1e3 * (time.perf_counter() - t0):.2f} ms")
    for name in ("ggn", "ggn-other-jvp", "ef", "ef-jacobian"):
        ours, peer = ops[name]
        diff = rel(ours.matvec(v), peer @ v)
        lines.append(f"  check {name}: relative difference to curvlinops {diff:.1e}")
    lines.append(f"  check ggn-first = ggn: {rel(first, ops['ggn'][0].matvec(v)):.1e}")
    fa, fb = ops["fisher"][0].matvec(v), ops["fisher-jacobian"][0].matvec(v)  # draws the labels, builds the graphs
    lines.append(f"  check fisher: per-example = jacobian backend {rel(fa, fb):.1e} (Monte Carlo: no peer check)")

    # K-FAC: both type-2 (K-FAC of the GGN) and Monte Carlo; curvlinops with weight and bias in one block.
    # resnet20: only the Conv2d and Linear parameters (BatchNorm's have no Kronecker factors)
    kf_params = None if isinstance(model, nn.Sequential) else [
        f"{name}.{k}" for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))
        for k, _ in m.named_parameters(recurse=False)]
    kparams = params if kf_params is None else [p for nm, p in model.named_parameters() if nm in kf_params]
    vk = torch.randn(sum(p.numel() for p in kparams), generator=torch.Generator().manual_seed(4))
    kf_ours = KFACOperator(model, None, (x, y), fisher_type="type-2", params=kf_params)
    kf_peer = cl.KFACLinearOperator(model, ce, kparams, data, fisher_type="type-2",
                                    separate_weight_and_bias=False, **kw)
    lines.append(f"  check kfac type-2: relative difference to curvlinops {rel(kf_ours.matvec(vk), kf_peer @ vk):.1e}"
                 + ("" if kf_params is None else f" ({len(kf_params)} conv/linear parameters)"))
    bp_model = None
    if kf_params is None:  # BackPACK: Sequential models (its converter does not trace gradlab's resnet20)
        bp_model = extend(copy.deepcopy(model))
        bp = backpack_factors(bp_model, x, y, KFLR())
        ours_w = next(b for b in kf_ours.blocks if b.module is model[-1])
        last_w = bp[-2]  # [G, A] of the head's weight: BackPACK keeps weight and bias apart (A without bias column)
        d_bp = max(rel(ours_w.G, last_w[0]), rel(ours_w.A[:-1, :-1], last_w[1]))
        lines.append(f"  check kfac type-2 vs BackPACK KFLR (head layer factors): {d_bp:.1e}")
    else:
        lines.append("  kfac vs BackPACK: not compared (its module converter cannot trace this model)")

    timers = {
        "ggn": (lambda: ops["ggn"][0].matvec(v), lambda: ops["ggn"][1] @ v),
        "ggn-other-jvp": (lambda: ops["ggn-other-jvp"][0].matvec(v), lambda: ops["ggn"][1] @ v),
        "fisher": (lambda: ops["fisher"][0].matvec(v), lambda: ops["fisher"][1] @ v),
        "fisher-jacobian": (lambda: ops["fisher-jacobian"][0].matvec(v), lambda: ops["fisher"][1] @ v),
        "fisher-setup": (lambda: FisherOperator(model, None, (x, y), backend="per-example").per_example_gradients(),
                         lambda: ops["fisher"][1] @ v),
        "ef": (lambda: ops["ef"][0].matvec(v), lambda: ops["ef"][1] @ v),
        "ef-jacobian": (lambda: ops["ef-jacobian"][0].matvec(v), lambda: ops["ef"][1] @ v),
        "ef-setup": (lambda: EmpiricalFisherOperator(model, None, (x, y), backend="per-example").per_example_gradients(),
                     lambda: ops["ef"][1] @ v),
        "kfac type-2 vs curvlinops": (
            lambda: KFACOperator(model, None, (x, y), fisher_type="type-2", params=kf_params),
            lambda: cl.KFACLinearOperator(model, ce, kparams, data, fisher_type="type-2", separate_weight_and_bias=False,
                                          **kw).compute_kronecker_factors()),
        **{f"kfac mc{m} vs curvlinops": (
            lambda m=m: KFACOperator(model, None, (x, y), fisher_type="mc", mc_samples=m, params=kf_params),
            lambda m=m: cl.KFACLinearOperator(model, ce, kparams, data, fisher_type="mc", mc_samples=m,
                                              separate_weight_and_bias=False, **kw).compute_kronecker_factors())
           for m in (1, 8)},
        **{f"kfac mc{m} vs BackPACK KFAC": (lambda m=m: KFACOperator(model, None, (x, y), fisher_type="mc", mc_samples=m),
                                            lambda m=m: backpack_factors(bp_model, x, y, KFAC(mc_samples=m)))
           for m in (1, 8)},
        "kfac type-2 vs BackPACK KFLR": (lambda: KFACOperator(model, None, (x, y), fisher_type="type-2"),
                                         lambda: backpack_factors(bp_model, x, y, KFLR())),
    }
    if bp_model is None:
        timers = {k: t for k, t in timers.items() if "BackPACK" not in k}
    if args.only:
        timers = {k: t for k, t in timers.items() if any(k.startswith(w) for w in args.only.split(","))}
    ratios = {k: [] for k in timers}
    times = {k: ([], []) for k in timers}
    for _ in range(args.rounds):
        for name, (ours, peer) in timers.items():
            a, b = med_time(ours, args.calls), med_time(peer, args.calls)
            ratios[name].append(a / b)
            times[name][0].append(a)
            times[name][1].append(b)
    if args.eig_rounds:
        lines += top5_lines(model, x, y, args.eig_rounds, tol=args.eig_tol or 1e-3)
    for name in timers:
        r = ratios[name]
        a, b = statistics.median(times[name][0]), statistics.median(times[name][1])
        lines.append(f"  {name:30s} gradlab {1e3 * a:8.2f} ms  peer {1e3 * b:8.2f} ms  ratio median {statistics.median(r):.2f}"
                     f"  (range {min(r):.2f}-{max(r):.2f})")
    return lines


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--cases", default="mlp,cnn,cnn32")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eig-rounds", type=int, default=3, help="rounds of the top-5 comparison (0: skip)")
    ap.add_argument("--resnet20", action="store_true", help="only the top-5 Hessian and GGN eigenvalues of "
                    "resnet20 at batch 128 (slow: run it with nice and --eig-rounds 1)")
    ap.add_argument("--eig-tol", type=float, default=None, help="gradlab's eigsh tolerance in the top-5 "
                    "comparison (default 1e-3; 1e-4 with --resnet20, where the error then sits at float32's floor)")
    ap.add_argument("--matrices", default="hessian,ggn", help="with --resnet20: hessian, ggn or both")
    ap.add_argument("--only", default="", help="time only the comparisons whose names start with one of "
                    "these (comma-separated, e.g. 'kfac,ggn'); the checks run as always")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        import backpack  # noqa: F401
        import curvlinops  # noqa: F401
    except ImportError as e:
        print(f"skipped: {e.name} is not installed (pip install -e '.[bench]' brings curvlinops and BackPACK)")
        return
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {args.threads} thread(s), "
          f"{args.rounds} rounds x {args.calls} calls; ratio = gradlab time / peer time (< 1: gradlab faster)")
    if args.resnet20:
        import os

        model, x, y = resnet20_case()
        n = sum(p.numel() for p in model.parameters())
        print(f"resnet20: {n} parameters, batch {len(x)}, load average {os.getloadavg()[0]:.1f}", flush=True)
        for matrix in args.matrices.split(","):
            for line in top5_lines(model, x, y, max(1, args.eig_rounds), matrix, warm_reference=True,
                                   tol=args.eig_tol or 1e-4):
                print(line, flush=True)
        print(f"load average at the end {os.getloadavg()[0]:.1f}")
        return
    for case in args.cases.split(","):
        for line in run_case(case, args):
            print(line, flush=True)


if __name__ == "__main__":
    main()
