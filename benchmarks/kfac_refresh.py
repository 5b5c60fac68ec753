"""Where a K-FAC factor refresh spends its time, beside an SGD step in the same process.

A refresh step (``factor_every = inverse_every = 1``: every step refreshes) is timed whole and by
part, with per-instance wrappers on the optimizer's own methods (no change to the library):
``forward`` (the closure with the layers watched), ``gradient``, ``factors`` (labels sampled from
the model, the backward pass to the layer outputs, the output moments; the input moments are
``input moments``, a part of it), ``EMA + all-reduce``, ``inverse`` (exact: two eigendecompositions
per layer; factored: two Cholesky inverses per layer), ``precondition`` and the rest of the
update. Rounds interleave an SGD step, a K-FAC step without a refresh (``factor_every`` larger
than the run) and the refresh steps of both damping modes; figures are medians over rounds with
interquartile ranges, and "x SGD" divides by the SGD step of the same round.

With ``inverse_every`` below ``factor_every`` (factors every 10 steps, the inverse every step) the
optimizer decomposes each set of factors once; the last table compares that with what it did
before, decomposing again at every inverse step (emulated here by dropping the held inverse before
each step), per step and against SGD. Then, per factor size of the model, ``torch.linalg.eigh`` against ``cholesky_ex`` +
``cholesky_inverse`` (what the two modes call per factor and refresh) on that factor.

    python benchmarks/kfac_refresh.py [--model mlp|cnn] [--fisher-type mc|type-2] [--rounds 15] [--steps 10]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from steptime import closure_based, cnn, digits, first_order, fresh, mlp  # noqa: E402

PARTS = {"_forward": "forward", "_gradients": "gradient", "_batch_factors": "factors",
         "input_moment": "  input moments", "_update_factors": "EMA + all-reduce", "eig": "inverse",
         "_factored_inverse": "inverse", "preconditioned": "precondition", "_apply": "update (all)"}


def timed(obj, name, acc):
    """Replace ``obj.name`` by a wrapper adding its wall time to ``acc[PARTS[name]]``."""
    inner = getattr(obj, name)

    def wrapper(*a, **k):
        t0 = time.perf_counter()
        try:
            return inner(*a, **k)
        finally:
            acc[PARTS[name]] = acc.get(PARTS[name], 0.0) + time.perf_counter() - t0
    setattr(obj, name, wrapper)


def kfac_stepper(model_fn, x, y, device, acc, **opts):
    model, step = closure_based(fresh(model_fn, device, train=True), x, y, "kfac", **opts)
    opt = next(c.cell_contents for c in step.__closure__ if hasattr(c.cell_contents, "blocks"))
    if acc is not None:
        for name in ("_forward", "_gradients", "_batch_factors", "_update_factors", "_factored_inverse",
                     "preconditioned", "_apply"):
            timed(opt, name, acc)
        step()  # binds nothing new, but creates the blocks' factors
        for blk in opt.blocks:
            timed(blk, "eig", acc)
            timed(blk, "input_moment", acc)
    return opt, step


def clock(fn, steps):
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t0) / steps


def median_iqr(values):
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return q[1], q[0], q[2]


def lapack_table(blocks, repeats=30):
    sizes = sorted({n for blk in blocks for n in (blk.A.shape[0], blk.G.shape[0])})
    print("\n| factor size | eigh (ms) | Cholesky + inverse (ms) | eigh / Cholesky |")
    print("|---:|---:|---:|---:|")
    for blk_n in sizes:
        M = next(m for blk in blocks for m in (blk.A, blk.G) if m.shape[0] == blk_n).clone()
        M.diagonal().add_(1e-3)
        e = statistics.median(clock(lambda: torch.linalg.eigh(M), 1) for _ in range(repeats))
        c = statistics.median(clock(lambda: torch.cholesky_inverse(torch.linalg.cholesky_ex(M)[0]), 1)
                              for _ in range(repeats))
        print(f"| {blk_n} | {e * 1e3:.3f} | {c * 1e3:.3f} | {e / c:.1f} |")


def schedule_table(model_fn, x, y, device, sgd, args):
    rows = {}
    for mode in ("exact", "factored"):
        for again in (False, True):
            opt, step = kfac_stepper(model_fn, x, y, device, None, factor_every=10, inverse_every=1, damping_mode=mode,
                                     fisher_type=args.fisher_type)
            if again:
                step = (lambda o, s: lambda: (setattr(o, "_inverse_of", None), s())[1])(opt, step)
            rows[(mode, again)] = step
    ratios = {k: [] for k in rows}
    block = 10 * max(1, args.steps // 10)  # whole factor periods
    for _ in range(args.rounds):
        t_sgd = clock(sgd, block)
        for k, step in rows.items():
            ratios[k].append(clock(step, block) / t_sgd)
    print("\n| factors every 10, inverse every step: step / SGD step, median (IQR) | exact | factored |")
    print("|---|---:|---:|")
    for again, label in ((False, "each set of factors decomposed once (now)"),
                         (True, "decomposed at every inverse step (before)")):
        cells = [median_iqr(ratios[(m, again)]) for m in ("exact", "factored")]
        print(f"| {label} | " + " | ".join(f"{c[0]:.2f} ({c[1]:.2f}-{c[2]:.2f})" for c in cells) + " |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mlp", choices=("mlp", "cnn"))
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--steps", type=int, default=10, help="steps per timed block")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--fisher-type", default="mc", choices=("mc", "type-2"), help="the optimizer's fisher_type")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    load = os.getloadavg()
    print(f"# K-FAC refresh profile, {args.model}, fisher_type {args.fisher_type}, batch {args.batch}, torch {torch.__version__}, "
          f"{args.threads} thread(s), load average {load[0]:.1f} at the start")
    x, y = digits(device, args.batch)
    model_fn = {"mlp": mlp, "cnn": cnn}[args.model]
    _, sgd = first_order(fresh(model_fn, device, train=True), x, y, "sgd", lr=0.05)
    _, plain = kfac_stepper(model_fn, x, y, device, None, factor_every=10 ** 9, inverse_every=10 ** 9,
                            fisher_type=args.fisher_type)
    acc = {m: {} for m in ("exact", "factored")}
    refresh = {m: kfac_stepper(model_fn, x, y, device, acc[m], factor_every=1, inverse_every=1,
                               damping_mode=m, fisher_type=args.fisher_type) for m in acc}
    for fn in (sgd, plain, *(s for _, s in refresh.values())):
        for _ in range(5):
            fn()
    rows = {"sgd step": [], "kfac step, no refresh": [], "refresh step, exact": [], "refresh step, factored": []}
    parts = {m: {} for m in acc}
    for _ in range(args.rounds):
        t_sgd = clock(sgd, args.steps)
        rows["sgd step"].append((t_sgd, 1.0))
        t = clock(plain, args.steps)
        rows["kfac step, no refresh"].append((t, t / t_sgd))
        for m, (_, step) in refresh.items():
            acc[m].clear()
            t = clock(step, args.steps)
            rows[f"refresh step, {m}"].append((t, t / t_sgd))
            for name, v in acc[m].items():
                parts[m].setdefault(name, []).append((v / args.steps, v / args.steps / t_sgd))
    print("\n| step | ms, median (IQR) | x SGD step, median (IQR) |\n|---|---:|---:|")
    for name, vals in rows.items():
        ms, ratio = median_iqr([v[0] * 1e3 for v in vals]), median_iqr([v[1] for v in vals])
        print(f"| {name} | {ms[0]:.3f} ({ms[1]:.3f}-{ms[2]:.3f}) | {ratio[0]:.2f} ({ratio[1]:.2f}-{ratio[2]:.2f}) |")
    print("\n| part of a refresh step | exact: ms (x SGD) | factored: ms (x SGD) |\n|---|---:|---:|")
    for name in dict.fromkeys(PARTS.values()):
        cells = []
        for m in acc:
            vals = parts[m].get(name)
            cells.append("-" if not vals else f"{statistics.median(v[0] for v in vals) * 1e3:.3f} "
                         f"({statistics.median(v[1] for v in vals):.2f})")
        print(f"| {name} | {cells[0]} | {cells[1]} |")
    schedule_table(model_fn, x, y, device, sgd, args)
    lapack_table(refresh["exact"][0].blocks)
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
