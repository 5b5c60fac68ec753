"""Curvature engine vs PyHessian: eigenvalues, trace, and the cost of one Hessian-vector product.

Same model, batch and data for every method (sklearn digits, standardised, as (N, 1, 8, 8)):

* ``mlp``: 64-128-128-10 tanh MLP (26k parameters), briefly trained, batch 512;
* ``cnn``: a 6.3k-parameter tanh CNN, briefly trained, batch 512;
* ``mlp3x512``: 64-512-512-512-10 tanh MLP (564k parameters), briefly trained, batch 1024;
* ``mlp-relu``: the ``mlp`` case with ReLU (piecewise linear: the Gauss-Newton trace is exact).

Accuracy references are computed on a copy of the model: the top-5 eigenvalues by a float64
Lanczos solve at tol 1e-10 (its residual certifies the error: |lambda - theta| <= residual);
the trace exactly, from the dense float64 Hessian when n <= --dense-max or as the sum of the
diagonal from n unit-vector HVPs when n <= --diag-max (about 2 minutes for the 26k MLP, 3-4 for
the CNN on one shared core); above that (the 564k model) by the Gauss-Newton estimator with
--gn-ref-samples residual samples (unbiased, checked against dense Hessians in the tests; its
standard error is printed and bounds the ratios that can be resolved), cross-checked against
Hutch++ with --ref-matvecs / 4 products. Every timed method runs on the float32 model. Times are
medians over --repeats, methods interleaved so load on a shared machine hits all alike (the top-5
speed-up is the median of the ratios within each repeat); errors are medians over the same repeats
(different seeds).

Trace methods are compared at PyHessian's own number of HVPs in each repeat: the operator
estimators (XTrace, Hutch++, Krylov, Hutchinson) get that many products; the Gauss-Newton trace
gets as many residual samples as that many HVPs pay for after its exact part, at the costs
measured in HVPs before the comparison (none for piecewise-linear nets), so it spends about the
same time as PyHessian; the time ratio is printed. Errors: median and root-mean-square over
--trace-repeats seeds (PyHessian's stopping rule gives a heavy tail: its median flatters it).

Targets (issue 3): top-5 >= 3x faster than PyHessian ``eigenvalues(top_n=5)`` with a relative
error no larger (and >= 100x smaller at the default tol); trace error >= 5x smaller than
PyHessian's ``trace()`` at the same number of products, time per HVP no worse.

    python benchmarks/bench_curvature.py [--repeats 3] [--cases mlp,cnn,mlp3x512,mlp-relu] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import math
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
    HessianOperator, eigsh, gauss_newton_trace, hutchinson_trace, hutchpp_trace, is_piecewise_linear, krylov_trace, xtrace,
)
from gradlab.curvature.hvp import hvp_from_grads  # noqa: E402


# ------------------------------------------------------------------ setup
def digits(n: int):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data / 16.0, dtype=torch.float32)
    x = ((x - x.mean()) / x.std()).view(-1, 1, 8, 8)
    return x, torch.tensor(d.target)


def build(case: str) -> nn.Module:
    torch.manual_seed(0)
    if case == "mlp-relu":
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    if case == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 10))
    if case == "mlp3x512":
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 512), nn.Tanh(), nn.Linear(512, 512), nn.Tanh(),
                             nn.Linear(512, 512), nn.Tanh(), nn.Linear(512, 10))
    # 160 + 2900 + 3210 = 6270 parameters
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.Tanh(), nn.Conv2d(16, 20, 3, stride=2, padding=1), nn.Tanh(),
                         nn.Flatten(), nn.Linear(20 * 4 * 4, 10))


def train_briefly(model, x, y, steps=300):
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        i = torch.randint(0, len(x), (64,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x[i]), y[i]).backward()
        opt.step()
    for p in model.parameters():
        p.grad = None
    return model.eval()


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def med(xs):
    return statistics.median(xs)


def rms(xs):
    return math.sqrt(sum(v * v for v in xs) / len(xs))


# ------------------------------------------------------------------ PyHessian
def load_pyhessian():
    try:
        import importlib

        return importlib.import_module("pyhessian.hessian")  # the module (the package re-exports a class of that name)
    except Exception as e:  # noqa: BLE001 - any import failure means "peer unavailable"
        print(f"# PyHessian unavailable ({type(e).__name__}: {e}); reporting gradlab alone")
        return None


class CountingPyHessian:
    """PyHessian's ``hessian`` with its HVP calls counted (module-level function wrapped)."""

    def __init__(self, ph, model, x, y):
        self.ph, self.count = ph, 0
        original = ph.hessian_vector_product

        def counted(*a, **k):
            self.count += 1
            return original(*a, **k)

        ph.hessian_vector_product = counted
        try:
            self.h = ph.hessian(model, nn.CrossEntropyLoss(), data=(x, y), cuda=False)
        finally:
            self._original = original

    def restore(self, model):
        self.ph.hessian_vector_product = self._original
        for p in model.parameters():  # PyHessian leaves a graph on .grad: drop it
            p.grad = None


# ------------------------------------------------------------------ one case
def run_case(case, x_all, y_all, args, ph):
    batch = 1024 if case == "mlp3x512" else 512
    model = train_briefly(build(case), x_all, y_all)
    x, y = x_all[:batch], y_all[:batch]
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    print(f"\n## {case}: {n} parameters, batch {batch}")

    # references in float64
    m64 = copy.deepcopy(model).double()
    op64 = HessianOperator(m64, None, (x.double(), y))
    t_ref, ref = timed(lambda: eigsh(op64, 5, "LA", tol=1e-10, max_iter=400))
    top = ref.values
    print(f"reference top-5 (float64 Lanczos, tol 1e-10, {ref.num_matvecs} HVPs, {t_ref:.1f}s): "
          f"{[round(v, 6) for v in top.tolist()]}, max residual {float(ref.residuals.max()):.1e}")
    if "trace" not in args.parts:
        tr_ref = tr_ref_se = float("nan")
    elif n <= args.diag_max and n > args.dense_max:
        # exact: the diagonal from n unit-vector HVPs (float32 products, ~1e-6 relative rounding)
        op32 = HessianOperator(model, None, (x, y))

        def diag_trace():
            tot = 0.0
            for i in range(0, n, 256):
                k = min(256, n - i)
                E = torch.zeros(n, k)
                E[torch.arange(i, i + k), torch.arange(k)] = 1.0
                tot += float(op32.matmat(E)[torch.arange(i, i + k), torch.arange(k)].double().sum())
            return tot

        t_d, tr_ref = timed(diag_trace)
        tr_ref_se = 0.0
        op32.clear()
        print(f"reference trace: sum of the Hessian diagonal from {n} unit-vector HVPs ({t_d:.0f}s) = {tr_ref:.6g}")
    elif n <= args.dense_max:
        t_d, H = timed(lambda: op64.to_dense())
        tr_ref, tr_ref_se = float(torch.trace(H)), 0.0
        evs = torch.linalg.eigvalsh((H + H.T) / 2).flip(0)[:5]
        print(f"reference trace: dense Hessian ({t_d:.0f}s) = {tr_ref:.6g}; dense top-5 vs Lanczos ref: "
              f"max rel diff {float(((evs - top).abs() / top.abs()).max()):.1e}")
        del H
    else:
        m_ref = args.ref_matvecs if n < 100_000 else args.ref_matvecs // 4  # the 564k model: 4x fewer
        # float32 products (rounding ~1e-6, far below the errors compared) keep this affordable
        op32 = HessianOperator(model, None, (x, y))
        t_r, r = timed(lambda: hutchpp_trace(op32, m_ref, seed=12345))
        op32.clear()
        print(f"cross-check: Hutch++ {m_ref} HVPs ({t_r:.0f}s) = {r.estimate:.6g} +- {r.stderr:.2g} (stderr)")
        # the reference: Gauss-Newton with many residual samples (unbiased: tests check it
        # against dense Hessians), far tighter than Hutch++ at any affordable count
        t_g, rg = timed(lambda: gauss_newton_trace(op32, args.gn_ref_samples, seed=54321))
        op32.clear()
        tr_ref, tr_ref_se = rg.estimate, rg.stderr
        print(f"reference trace: Gauss-Newton, {args.gn_ref_samples} residual samples ({t_g:.0f}s) = {tr_ref:.6g} +- "
              f"{tr_ref_se:.2g} (stderr, {tr_ref_se / abs(tr_ref):.1e} relative: errors below ~2x this are not "
              f"resolved); Hutch++ differs by {(r.estimate - tr_ref) / math.hypot(r.stderr, tr_ref_se):+.1f} stderr")
    op64.clear()
    del m64, op64

    def relerr_top(values):
        return float(((torch.as_tensor(values, dtype=torch.float64) - top).abs() / top.abs()).max())

    row = {"case": case, "n": n}
    # ---- HVP and gradient costs
    V = torch.randn(n, dtype=torch.float32)
    cost = {k: [] for k in ("grad", "db_kept", "db_rebuild", "func", "func_vmap10", "pyhessian")}
    op_db = HessianOperator(model, None, (x, y), backend="double-backward")
    op_db.matvec(V)  # builds the kept graph
    op_rb = HessianOperator(model, None, (x, y), backend="double-backward", keep_graphs=False)
    op_fn = HessianOperator(model, None, (x, y), backend="func")
    V10 = torch.randn(n, 10)
    op_fn.matmat(V10[:, :2])  # warm up functorch
    if ph is not None:
        pyh = CountingPyHessian(ph, model, x, y)
        vs = [v.detach().clone() for v in HessianOperator(model, None, (x, y)).unflatten(V)]
    for _ in range(args.repeats if "hvp" in args.parts else 1):
        cost["grad"].append(timed(lambda: torch.autograd.grad(F.cross_entropy(model(x), y), params))[0])
        cost["db_kept"].append(timed(lambda: op_db.matvec(V))[0])
        cost["db_rebuild"].append(timed(lambda: op_rb.matvec(V))[0])
        cost["func"].append(timed(lambda: op_fn.matvec(V))[0])
        cost["func_vmap10"].append(timed(lambda: op_fn.matmat(V10))[0] / 10)
        if ph is not None:
            cost["pyhessian"].append(timed(lambda: ph.hessian_vector_product(pyh.h.gradsH, pyh.h.params, vs))[0])
    g = med(cost["grad"])
    print(f"gradient {g * 1e3:.2f} ms; HVP in gradients: " + ", ".join(
        f"{k} {med(v) / g:.2f}x" for k, v in cost.items() if k != "grad" and v))
    if ph is not None:
        pyh.restore(model)
    op_db.clear()

    # ---- top-5 eigenvalues
    eig = {k: {"t": [], "hvp": [], "err": []} for k in ("gradlab", "gradlab_scipy", "pyhessian")}
    for r in range(args.repeats if "eig" in args.parts else 0):
        for key in eig:
            if key == "pyhessian":
                if ph is None:
                    continue
                torch.manual_seed(r)

                def run_ph():
                    c = CountingPyHessian(ph, model, x, y)
                    vals, _ = c.h.eigenvalues(top_n=5)
                    c.restore(model)
                    return vals, c.count

                t, (vals, cnt) = timed(run_ph)
            else:
                method = "scipy" if key == "gradlab_scipy" else "lanczos"

                def run_gl():
                    op = HessianOperator(model, None, (x, y))
                    res = eigsh(op, 5, "LA", method=method, seed=r)
                    op.clear()
                    return res.values.tolist(), res.num_matvecs

                t, (vals, cnt) = timed(run_gl)
            eig[key]["t"].append(t)
            eig[key]["hvp"].append(cnt)
            eig[key]["err"].append(relerr_top(sorted(vals, reverse=True)))
    print("top-5 eigenvalues (default tolerances):")
    for key, d in eig.items():
        if d["t"]:
            print(f"  {key:14s} time {med(d['t']):7.3f}s  HVPs {med(d['hvp']):5.0f}  max rel err {med(d['err']):.1e}")
    if eig["pyhessian"]["t"]:
        # the ratio within each repeat, then the median: the shared machine's speed drifts by
        # 10-30% over seconds, which a ratio of two medians does not cancel
        sp = med([p / g for p, g in zip(eig["pyhessian"]["t"], eig["gradlab"]["t"])])
        er = med(eig["pyhessian"]["err"]) / max(med(eig["gradlab"]["err"]), 1e-16)
        print(f"  -> gradlab is {sp:.2f}x faster than PyHessian (target >= 3), error {er:.0f}x smaller (target >= 100)")
        row.update(eig_speedup=sp, eig_err_ratio=er)

    # ---- trace at PyHessian's number of HVPs
    methods = {"krylov": krylov_trace, "xtrace": xtrace, "hutch++": hutchpp_trace, "hutchinson": hutchinson_trace}
    trc = {k: {"t": [], "hvp": [], "err": []} for k in ("pyhessian", "gauss-newton", *methods)}
    # what the exact Gauss-Newton part costs, in HVPs: the residual samples get PyHessian's
    # count minus this, so that gauss-newton spends no more time than PyHessian
    op_w = HessianOperator(model, None, (x, y))
    op_w.matvec(V)
    t_hvp = med([timed(lambda: op_w.matvec(V))[0] for _ in range(5)])
    op_w.clear()
    exact_gn = is_piecewise_linear(model)

    def gn_time(m):
        return med([timed(lambda: gauss_newton_trace(HessianOperator(model, None, (x, y)), m, seed=0))[0]
                    for _ in range(3)]) / t_hvp

    t2 = gn_time(2)
    gn_sample = 0.0 if exact_gn else (gn_time(12) - t2) / 10
    gn_fixed = t2 - 2 * gn_sample
    print(f"gauss-newton: fixed part (exact tr(G), set-up) = {gn_fixed:.1f} HVPs; "
          + ("piecewise linear: exact, no samples" if exact_gn else
             f"one residual sample = {gn_sample:.2f} HVPs; samples: as many as PyHessian's HVP count pays for"))
    trace_repeats = args.trace_repeats if n < 100_000 else max(1, args.trace_repeats // 3)
    for r in range(trace_repeats if "trace" in args.parts else 0):
        m_hvps = None
        if ph is not None:
            torch.manual_seed(r)

            def run_ph_trace():
                c = CountingPyHessian(ph, model, x, y)
                samples = c.h.trace()
                c.restore(model)
                return sum(samples) / len(samples), len(samples)

            t, (est, m_hvps) = timed(run_ph_trace)
            trc["pyhessian"]["t"].append(t)
            trc["pyhessian"]["hvp"].append(m_hvps)
            trc["pyhessian"]["err"].append(abs(est - tr_ref) / abs(tr_ref))
        m = max(6, m_hvps or args.trace_matvecs)

        def run_gn_trace():
            op = HessianOperator(model, None, (x, y))
            res = gauss_newton_trace(op, max(2, int((m - gn_fixed) / max(gn_sample, 1e-9))), seed=r)
            return res

        t, res = timed(run_gn_trace)
        trc["gauss-newton"]["t"].append(t)
        trc["gauss-newton"]["hvp"].append(t / t_hvp)  # in HVP-equivalents of time
        trc["gauss-newton"]["err"].append(abs(res.estimate - tr_ref) / abs(tr_ref))
        for key, fn in methods.items():
            def run_gl_trace():
                op = HessianOperator(model, None, (x, y))
                res = fn(op, m if key == "hutch++" else 2 * (m // 2), seed=r)
                op.clear()
                return res

            t, res = timed(run_gl_trace)
            trc[key]["t"].append(t)
            trc[key]["hvp"].append(res.num_matvecs)
            trc[key]["err"].append(abs(res.estimate - tr_ref) / abs(tr_ref))
    print(f"trace (reference {tr_ref:.6g}; same number of HVPs as PyHessian's trace() in each repeat):")
    for key, d in trc.items():
        if d["t"]:
            print(f"  {key:10s} time {med(d['t']):7.3f}s  HVPs {med(d['hvp']):5.0f}  "
                  f"time/HVP {1e3 * med(d['t']) / med(d['hvp']):6.2f} ms  rel err median {med(d['err']):.1e}, "
                  f"rms {rms(d['err']):.1e}, max {max(d['err']):.1e}")
    if trc["pyhessian"]["t"]:
        ph_err, ph_t = med(trc["pyhessian"]["err"]), med(trc["pyhessian"]["t"])
        floor = 2 * tr_ref_se / abs(tr_ref)  # below this the reference cannot tell
        for key in ("gauss-newton", "xtrace"):
            er = ph_err / max(med(trc[key]["err"]), floor, 1e-12)
            er_rms = rms(trc["pyhessian"]["err"]) / max(rms(trc[key]["err"]), floor, 1e-12)
            at = "at least " if med(trc[key]["err"]) <= floor else ""
            tr_ = med(trc[key]["t"]) / ph_t
            print(f"  -> {key}: error {at}{er:.1f}x smaller than PyHessian by the median, {er_rms:.1f}x by the rms "
                  f"(target >= 5), in {tr_:.2f}x its time")
            row.update({f"trace_err_ratio_{key}": er, f"trace_rms_ratio_{key}": er_rms, f"trace_time_ratio_{key}": tr_})
        tph = (med(trc["xtrace"]["t"]) / med(trc["xtrace"]["hvp"])) / (ph_t / med(trc["pyhessian"]["hvp"]))
        print(f"  -> time per HVP (xtrace) vs PyHessian: {tph:.2f} (target <= 1)")
        row.update(trace_time_per_hvp_ratio=tph)
    row.update({f"hvp_{k}_in_grads": med(v) / g for k, v in cost.items() if k != "grad" and v})
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cases", default="mlp,cnn,mlp3x512,mlp-relu")
    ap.add_argument("--parts", default="hvp,eig,trace", help="which measurements: hvp, eig, trace")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared)")
    ap.add_argument("--dense-max", type=int, default=2000, help="largest n for the dense trace reference")
    ap.add_argument("--ref-matvecs", type=int, default=1200, help="Hutch++ products for the trace reference above --dense-max")
    ap.add_argument("--trace-repeats", type=int, default=30,
                    help="repeats of the trace comparison (errors are random; a third of this above 100k parameters)")
    ap.add_argument("--diag-max", type=int, default=30000, help="largest n for the exact trace from n unit-vector HVPs")
    ap.add_argument("--gn-ref-samples", type=int, default=1000, help="Gauss-Newton residual samples for the reference above --diag-max")
    ap.add_argument("--trace-matvecs", type=int, default=30, help="trace products when PyHessian is unavailable")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"# bench_curvature: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{args.threads} thread(s), repeats {args.repeats}")
    ph = load_pyhessian()
    x_all, y_all = digits(0)
    rows = [run_case(c, x_all, y_all, args, ph) for c in args.cases.split(",")]
    try:
        import pandas as pd

        print("\n" + pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    except ImportError:
        print(rows)


if __name__ == "__main__":
    main()
