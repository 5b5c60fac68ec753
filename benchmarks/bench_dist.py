"""Two processes under torchrun against one, and full-dataset lambda_max against PyHessian.

Part 1, 2 processes (gloo, one intra-op thread each) against 1 process with 2 intra-op threads
(torch's default here: both cores) and with 1, on the zoo's CNN trained for a few epochs on digits:

* ``landscape``: a 21 x 21 filter-normalised random plane on 512 examples (each rank evaluates
  every other grid point, :func:`gradlab.landscape.grid.evaluate_grid`);
* ``pgd``: 10-step linf PGD at eps 0.1 over 2,000 examples (digits has 1,797: they are tiled),
  batches of 250 dealt to the ranks (:func:`gradlab.attacks.report.robustness_sweep`);
* ``top5``: the 5 largest Hessian eigenvalues over 8 batches of 128 (tol 1e-3), each rank holding
  4 batches and summing every product over the ranks in one collective
  (:class:`gradlab.curvature.distributed.DistributedOperator`: an all-gather at this size);
  ``top5ar`` (only when named in ``--tasks``) is the same solve with every product all-reduced
  instead, to compare the two collectives in the same launches.

Each launch first runs every task's code once on 8 examples, untimed (``--cold`` skips this),
then times every task once after a barrier (in-process, so startup is excluded) and checks that
its numbers equal the 2-process ones. The warm-up keeps a fresh process's one-off costs out of
the work timed: the first ``torch.autograd.grad`` given ``grad_outputs`` tensors (every
Hessian-vector product) makes torch import ``torch.fx.experimental.symbolic_shapes`` and with
it sympy, about 0.45 s of CPU once per process. Every rank pays it at the same time, so it does
not shrink with processes: without the warm-up it was half of the 1-process top-5 time and held
its 2-process speed-up near 1.25x although the products themselves halve. The time of the
warm-up and the number of Lanczos products of each setting (the same: the reductions' order
does not change the iteration count here) are printed below the table, with the CPU-time ratio of
the 1-thread process to the 2-process rank that used most CPU: a loaded machine inflates it less
than wall time, and as it leaves out the ranks' waits in the collectives it bounds from above
the wall-time ratio an idle machine can give. Each round launches the
three settings; a ratio is per round (1-process time / 2-process time), median and range over
rounds. On a loaded machine two intra-op threads lose much of their time waiting for each
other, so the 2-thread baseline swings with the load; the 1-thread one is the steadier.

Part 2, one process: the top-1 eigenvalue of the Hessian of the mean loss over 10 batches of 128
(1,280 examples): gradlab's Lanczos (tol 1e-3) against PyHessian's power iteration in dataloader
mode (tol 1e-3, at most 100 iterations), both against a float64 Lanczos reference at tol 1e-10.

Run: ``python benchmarks/bench_dist.py [--rounds 3] [--part 1|2] [--cold] [--tasks top5] [--repeats 5]``
(a few minutes; PyHessian is in the ``bench`` extra). ``--tasks`` times only some of part 1's
tasks; ``--repeats R`` times each task R times per launch and keeps the medians (wall and CPU),
so that one launch's scheduling hiccup moves a round's ratio less.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve()
TASKS = ("landscape", "pgd", "top5")
EXTRA = ("top5ar",)  # top5 with every product all-reduced (the collective before the all-gather)


def trained_cnn(epochs: int = 4, seed: int = 0):
    from gradlab.data import load_dataset
    from gradlab.models import build_model

    torch.manual_seed(seed)
    data = load_dataset("digits")
    model = build_model("cnn", data.spec)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(data.x_train), generator=g)
        for i in range(0, len(perm), 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            F.cross_entropy(model(data.x_train[idx]), data.y_train[idx]).backward()
            opt.step()
    return model.eval(), data


# ---------------------------------------------------------------- part 1: the worker
def worker(state: str, warm: bool = True, tasks=TASKS, repeats: int = 1) -> None:
    from gradlab.attacks.report import robustness_sweep
    from gradlab.core.distributed import current, init_from_env, shutdown
    from gradlab.curvature import HessianOperator, eigsh
    from gradlab.curvature import distributed as gdist
    from gradlab.curvature.distributed import DistributedOperator, shard_batches
    from gradlab.data import load_dataset
    from gradlab.landscape.directions import random_directions
    from gradlab.landscape.grid import evaluate_grid, grid_coords, make_axes
    from gradlab.models import build_model

    init_from_env("cpu")
    info = current()
    data = load_dataset("digits")
    model = build_model("cnn", data.spec)
    model.load_state_dict(torch.load(state, weights_only=True))
    model.eval()
    x_all = torch.cat([data.x_train, data.x_test])
    y_all = torch.cat([data.y_train, data.y_test])
    reps = -(-2000 // len(x_all))
    x2k, y2k = x_all.repeat(reps, 1, 1, 1)[:2000], y_all.repeat(reps)[:2000]

    cpu = {}

    def timed(fn, name=None):
        """Wall seconds of ``fn()`` and its result; ``cpu[name]``: the CPU seconds of the rank
        that used most (every thread of this process)."""
        if info.enabled:
            torch.distributed.barrier()
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        c = torch.tensor([time.process_time() - c], dtype=torch.float64)
        if info.enabled:
            torch.distributed.barrier()
        t = time.perf_counter() - t
        if info.enabled:
            torch.distributed.all_reduce(c, op=torch.distributed.ReduceOp.MAX)
        if name:
            cpu[name] = float(c)
        return t, out

    out = {}
    dirs = random_directions(model, 2, generator=torch.Generator().manual_seed(0))
    batches = [(data.x_train[i : i + 128], data.y_train[i : i + 128]) for i in range(0, 8 * 128, 128)]

    def top5(data_, k=5, max_iter=None, gather_max_bytes=gdist.GATHER_MAX_BYTES):
        op = HessianOperator(model, F.cross_entropy, shard_batches(data_, info))
        op = DistributedOperator(op, info) if info.enabled else op
        kept, gdist.GATHER_MAX_BYTES = gdist.GATHER_MAX_BYTES, gather_max_bytes
        try:
            return eigsh(op, k, "LA", tol=1e-3, seed=0, max_iter=max_iter)
        finally:
            gdist.GATHER_MAX_BYTES = kept

    tiny = (data.x_train[:8], data.y_train[:8])
    coords = grid_coords(make_axes(-1.0, 1.0, 21, 2))
    batch = [(data.x_train[:512], data.y_train[:512])]
    work = {  # each task: (the timed work, the same on 8 examples for the warm-up, its checked value)
        "landscape": (lambda: evaluate_grid(model, dirs, coords, batch),
                      lambda: evaluate_grid(model, dirs, grid_coords(make_axes(-1.0, 1.0, 2, 2)), [tiny]),
                      lambda grid: {"value": float(grid.loss.sum())}),
        "pgd": (lambda: robustness_sweep(model, x2k, y2k, "pgd", [0.1], 250, keep_adv=False, steps=10, seed=0,
                                         dist=info),
                lambda: robustness_sweep(model, *tiny, "pgd", [0.1], 4, keep_adv=False, steps=1, seed=0, dist=info),
                lambda res: {"value": float(res.table["robust_acc"].iloc[0])}),
        "top5": (lambda: top5(batches), lambda: top5([tiny], k=1, max_iter=2),
                 lambda res: {"value": res.values.tolist(), "products": res.num_matvecs}),
    }
    work["top5ar"] = (lambda: top5(batches, gather_max_bytes=0), lambda: top5([tiny], k=1, max_iter=2,
                                                                             gather_max_bytes=0), work["top5"][2])
    if warm:  # each task's code once on 8 examples, untimed: the one-off costs of a fresh process
        out["warm_up"], _ = timed(lambda: [work[k][1]() for k in tasks])
    runs = {k: [] for k in tasks}
    for _ in range(repeats):  # ``repeats`` timings of each task, interleaved: the medians of wall and CPU
        for k in tasks:
            runs[k].append(timed(work[k][0], k) + (cpu[k],))
    for k, rs in runs.items():
        out[k] = {"seconds": statistics.median(r[0] for r in rs), "cpu": statistics.median(r[2] for r in rs),
                  **work[k][2](rs[-1][1])}
    if info.is_main:
        print("RESULT " + json.dumps(out), flush=True)
    shutdown(info)


def launch(state: str, procs: int, threads: int = 1, cold: bool = False, tasks=TASKS, repeats: int = 1) -> dict:
    env = {**os.environ}
    flag = (["--cold"] if cold else []) + ["--tasks", ",".join(tasks), "--repeats", str(repeats)]
    if procs == 1:
        cmd = [sys.executable, str(HERE), "--worker", state, *flag]
        env["OMP_NUM_THREADS"] = str(threads)
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs),
               str(HERE), "--worker", state, *flag]
        env["OMP_NUM_THREADS"] = "1"
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode != 0 or not line:
        raise SystemExit(f"{procs}-process run failed:\n{p.stderr[-3000:]}")
    return json.loads(line[0][7:])


def part1(rounds: int, cold: bool = False, tasks=TASKS, repeats: int = 1) -> None:
    model, _ = trained_cnn()
    with tempfile.TemporaryDirectory() as tmp:
        state = os.path.join(tmp, "cnn.pt")
        torch.save(model.state_dict(), state)
        # ratios against 1 process with 2 intra-op threads ("1p2t") and with 1 ("1p1t")
        ratios = {(k, b): [] for k in tasks for b in ("1p2t", "1p1t")}
        times = {(k, c): [] for k in tasks for c in ("1p2t", "1p1t", "2p")}
        products = {c: [] for c in ("1p2t", "1p1t", "2p")}  # Lanczos products of the top-5 solve
        warm_up = {c: [] for c in ("1p2t", "1p1t", "2p")}
        cpu = {k: [] for k in tasks}  # 1p x1t CPU seconds / the busiest rank's of 2p, per round
        for r in range(rounds):
            runs = {"1p2t": launch(state, 1, 2, cold, tasks, repeats), "2p": launch(state, 2, 1, cold, tasks, repeats),
                    "1p1t": launch(state, 1, 1, cold, tasks, repeats)}
            for k in tasks:
                two = runs["2p"][k]
                cpu[k].append(runs["1p1t"][k]["cpu"] / two["cpu"])
                for c, res in runs.items():
                    a = res[k]
                    if k.startswith("top5"):
                        assert max(abs(u - v) / abs(u) for u, v in zip(a["value"], two["value"])) < 1e-2, (a, two)
                    else:
                        assert abs(a["value"] - two["value"]) <= 1e-6 * max(1.0, abs(a["value"])), (k, a, two)
                    times[k, c].append(a["seconds"])
                    if k.startswith("top5"):
                        products[c].append(a["products"])
                    if k == tasks[0] and not cold:
                        warm_up[c].append(res["warm_up"])
                    if c != "2p":
                        ratios[k, c].append(a["seconds"] / two["seconds"])
            print(f"round {r + 1}: " + ", ".join(f"{k} {ratios[k, '1p2t'][-1]:.2f}x/{ratios[k, '1p1t'][-1]:.2f}x"
                                                for k in tasks), flush=True)
    print("seconds (median); speed-up of 2 processes x 1 thread over 1 process x 2 threads and x 1 thread")
    print(f"{'task':<10} {'1p x2t':>7} {'1p x1t':>7} {'2p':>6} {'vs 1p x2t':>18} {'vs 1p x1t':>18}")
    for k in tasks:
        cells = [f"{statistics.median(times[k, c]):>7.2f}" for c in ("1p2t", "1p1t")]
        rs = [f"{statistics.median(v):.2f}x ({min(v):.2f}-{max(v):.2f})" for v in (ratios[k, "1p2t"], ratios[k, "1p1t"])]
        print(f"{k:<10} {cells[0]} {cells[1]} {statistics.median(times[k, '2p']):>6.2f} {rs[0]:>18} {rs[1]:>18}")
    print("CPU-time ratio, 1p x1t over the busiest rank of 2p (steadier than wall time under load):\n  "
          + ", ".join(f"{k} {statistics.median(v):.2f}x ({min(v):.2f}-{max(v):.2f})" for k, v in cpu.items()))
    print("top-5 products per solve (top5ar: the same solve, every product all-reduced): " + ", ".join(f"{c} {sorted(set(v))}" for c, v in products.items()))
    if not cold:
        print("untimed warm-up per process, s (median): "
              + ", ".join(f"{c} {statistics.median(v):.2f}" for c, v in warm_up.items()))


# ---------------------------------------------------------------- part 2: against PyHessian
def part2(rounds: int) -> None:
    import copy

    from pyhessian import hessian as PyHessian

    from gradlab.curvature import HessianOperator, eigsh

    model, data = trained_cnn()
    batches = [(data.x_train[i : i + 128], data.y_train[i : i + 128]) for i in range(0, 10 * 128, 128)]
    m64 = copy.deepcopy(model).double()
    ref = float(eigsh(HessianOperator(m64, F.cross_entropy, [(x.double(), y) for x, y in batches]), 1, "LA",
                      tol=1e-10, seed=0).values[0])
    ratios, errs_g, errs_p, tg, tp = [], [], [], [], []
    for r in range(rounds):
        t = time.perf_counter()
        op = HessianOperator(model, F.cross_entropy, batches)
        lam_g = float(eigsh(op, 1, "LA", tol=1e-3, seed=r).values[0])
        t_g = time.perf_counter() - t
        t = time.perf_counter()
        torch.manual_seed(r)
        h = PyHessian(model, torch.nn.CrossEntropyLoss(), dataloader=batches, cuda=False)
        lam_p = float(h.eigenvalues(maxIter=100, tol=1e-3, top_n=1)[0][0])
        t_p = time.perf_counter() - t
        ratios.append(t_p / t_g)
        tg.append(t_g)
        tp.append(t_p)
        errs_g.append(abs(lam_g - ref) / ref)
        errs_p.append(abs(lam_p - ref) / ref)
        print(f"round {r + 1}: gradlab {t_g:.2f}s ({op.num_matvecs} products, rel err {errs_g[-1]:.1e}), "
              f"pyhessian {t_p:.2f}s (rel err {errs_p[-1]:.1e}), {ratios[-1]:.2f}x", flush=True)
    print(f"lambda_max reference {ref:.6g}; gradlab {statistics.median(tg):.2f}s, pyhessian "
          f"{statistics.median(tp):.2f}s: {statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}x); "
          f"median rel err gradlab {statistics.median(errs_g):.1e}, pyhessian {statistics.median(errs_p):.1e}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--part", choices=("1", "2", "both"), default="both")
    ap.add_argument("--cold", action="store_true", help="part 1 without the untimed warm-up of each process")
    ap.add_argument("--tasks", default=",".join(TASKS), help="part 1's tasks, comma-separated")
    ap.add_argument("--repeats", type=int, default=1, help="part 1: timings of each task per launch (median)")
    a = ap.parse_args()
    tasks = tuple(a.tasks.split(","))
    if not set(tasks) <= set(TASKS + EXTRA) or a.repeats < 1:
        raise SystemExit(f"--tasks: a comma-separated subset of {','.join(TASKS + EXTRA)}; --repeats >= 1")
    if a.worker:
        worker(a.worker, warm=not a.cold, tasks=tasks, repeats=a.repeats)
    else:
        if a.part in ("1", "both"):
            part1(a.rounds, a.cold, tasks, a.repeats)
        if a.part in ("2", "both"):
            part2(a.rounds)
