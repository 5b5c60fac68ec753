"""The GPU benchmark (``benchmarks/gpu.sh``): four measurements, each an absolute time and a ratio.

1. training overhead: one ``gradlab train`` step (``Trainer.train_step``: loss checks, gradient
   norms, callbacks' bookkeeping) against a bare PyTorch step (zero_grad, forward, loss,
   backward, SGD step) of a copy of the same model on the same batch; fp32 and bf16 (autocast).
2. top-5 Hessian eigenvalues of resnet20 at batch 512 (random init, random 3x32x32 inputs):
   gradlab's ``eigsh`` (Lanczos, tol 1e-3) against PyHessian's ``eigenvalues(top_n=5)``.
3. PGD (10 steps) and APGD (10 steps) on resnet20 at linf 8/255: examples per second, gradlab
   against torchattacks' ``PGD`` and ``APGD``.
4. landscape: milliseconds per grid point of a 2-D filter-normalised plane on resnet20 at batch
   512, as a ratio to one forward pass of that batch (1 and 8 points per vmapped call).

Every figure is the median over ``--rounds`` alternating rounds, with [min, max] of the ratio.
The GPU's name (``torch.cuda.get_device_name``) heads the section appended to RESULTS.md.
``--smoke`` runs the same code on tiny models (digits MLP/CNN, batch 64, a few steps) on any
device, so the script can be checked end to end on a CPU; its figures say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def rounds_of(pairs: dict, rounds: int, device) -> dict:
    """``{name: (ours, theirs)}`` callables -> ``{name: (times_ours, times_theirs)}``, alternating."""
    out = {k: ([], []) for k in pairs}
    for k, (ours, theirs) in pairs.items():  # warm-up (cuDNN autotuning, allocator, lazy init)
        ours()
        if theirs is not None:
            theirs()
    for _ in range(rounds):
        for k, (ours, theirs) in pairs.items():
            out[k][0].append(timed(ours, device))
            if theirs is not None:
                out[k][1].append(timed(theirs, device))
    return out


def ratio_text(ours: list, theirs: list) -> str:
    if not theirs:
        return "n/a"
    r = sorted(t / o for o, t in zip(ours, theirs))
    return f"{statistics.median(r):.2f} [{r[0]:.2f}, {r[-1]:.2f}]"


def cifar_like(n: int, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (n,), generator=g).to(device)
    return x, y


def resnet20(device):
    from gradlab.data.base import DataSpec
    from gradlab.models import build_model

    torch.manual_seed(0)
    spec = DataSpec("cifar10", (3, 32, 32), 10, [0.49, 0.48, 0.45], [0.25, 0.24, 0.26])
    return build_model("resnet20", spec).to(device).eval()


def small_model(device, kind="cnn"):
    from gradlab.data.base import DataSpec
    from gradlab.models import build_model

    torch.manual_seed(0)
    spec = DataSpec("digits", (1, 8, 8), 10, [0.3], [0.37])
    return build_model(kind, spec).to(device).eval()


# ---------------------------------------------------------------------------------- parts --
def bench_train(args, device, rows):
    from gradlab.training.loop import Trainer
    from gradlab.training.options import train_defaults, validate_train_config

    steps = 2 if args.smoke else 50
    for precision in ("fp32", "bf16"):
        cfg = validate_train_config({**train_defaults(), "runs_dir": str(args.tmp), "name": None, "seed": 0,
                                     "device": device.type, "model": "cnn", "epochs": 1, "batch_size": 128,
                                     "opt": "sgd", "precision": precision})
        trainer = Trainer(cfg)
        xb, yb = trainer.x_train[:128].to(device), trainer.y_train[:128].to(device)
        plain = copy.deepcopy(trainer.model).train()
        opt = torch.optim.SGD(plain.parameters(), lr=0.01)
        dtype = {"fp32": None, "bf16": torch.bfloat16}[precision]

        def ours():
            for _ in range(steps):
                trainer.train_step(xb, yb, len(yb))
            trainer._outputs.clear()  # the bulk accuracy count of an epoch end, not timed here

        def theirs():
            for _ in range(steps):
                opt.zero_grad(set_to_none=True)
                with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                    loss = F.cross_entropy(plain(xb), yb)
                loss.backward()
                opt.step()

        t = rounds_of({"step": (ours, theirs)}, args.rounds, device)["step"]
        rows.append((f"train step, digits CNN batch 128, {precision}", "ms/step",
                     1e3 * statistics.median(t[0]) / steps, 1e3 * statistics.median(t[1]) / steps,
                     "plain PyTorch step / gradlab step", ratio_text(t[0], t[1])))


def bench_eigen(args, device, rows):
    from gradlab.curvature.eigen import eigsh
    from gradlab.curvature.hessian_op import HessianOperator

    model = small_model(device, "mlp") if args.smoke else resnet20(device)
    x, y = (cifar_like(512, device) if not args.smoke else
            (torch.rand(64, 1, 8, 8, device=device), torch.randint(0, 10, (64,), device=device)))
    name = "digits MLP, batch 64" if args.smoke else "resnet20, batch 512"
    max_iter = 20 if args.smoke else 100  # PyHessian's power iterations per eigenvalue (its default: 100)
    found = {}

    def ours():
        found["g"] = eigsh(HessianOperator(model, F.cross_entropy, data=[(x, y)]), k=5, which="LA", tol=1e-3, seed=0)

    theirs = None
    try:
        from pyhessian import hessian as pyhessian

        def theirs():
            h = pyhessian(model, torch.nn.CrossEntropyLoss(), data=(x, y), cuda=device.type == "cuda")
            found["p"] = h.eigenvalues(maxIter=max_iter, tol=1e-3, top_n=5)[0]
            for p in model.parameters():
                p.grad = None  # PyHessian leaves a graph on .grad
    except Exception as e:  # noqa: BLE001 - the peer is optional
        print(f"# PyHessian unavailable ({type(e).__name__}); gradlab alone")
    t = rounds_of({"top5": (ours, theirs)}, args.rounds, device)["top5"]
    extra = ""
    if "p" in found:
        g = sorted(found["g"].values.tolist(), reverse=True)
        p = sorted(found["p"], reverse=True)
        extra = f" (top-1 {g[0]:.4g} vs {p[0]:.4g})"
    rows.append((f"top-5 Hessian eigenvalues, {name}{extra}", "s", statistics.median(t[0]),
                 statistics.median(t[1]) if t[1] else float("nan"), "PyHessian / gradlab", ratio_text(t[0], t[1])))


def bench_attacks(args, device, rows):
    from gradlab.attacks import build_attack

    if args.smoke:
        model, (x, y), name = small_model(device), (torch.rand(64, 1, 8, 8, device=device),
                                                    torch.randint(0, 10, (64,), device=device)), "digits CNN"
    else:
        model, (x, y), name = resnet20(device), cifar_like(256, device, seed=1), "resnet20"
    eps, steps = 8 / 255, (3 if args.smoke else 10)
    try:
        import torchattacks
    except Exception as e:  # noqa: BLE001
        print(f"# torchattacks unavailable ({type(e).__name__}); gradlab alone")
        torchattacks = None
    pairs = {}
    for aname in ("pgd", "apgd"):
        kw = {"steps": steps, "seed": 0}
        ours_attack = build_attack(aname, model, eps, **kw)
        theirs_attack = None
        if torchattacks is not None:
            theirs_attack = (torchattacks.PGD(model, eps=eps, alpha=2.5 * eps / steps, steps=steps, random_start=True)
                             if aname == "pgd" else torchattacks.APGD(model, eps=eps, steps=steps, n_restarts=1, seed=0))
        pairs[aname] = ((lambda a=ours_attack: a(x, y)),
                        (lambda a=theirs_attack: a(x, y)) if theirs_attack is not None else None)
    for aname, t in rounds_of(pairs, args.rounds, device).items():
        rows.append((f"{aname.upper()} {steps} steps, {name}, {len(y)} examples", "ex/s",
                     len(y) / statistics.median(t[0]), len(y) / statistics.median(t[1]) if t[1] else float("nan"),
                     "gradlab ex/s / torchattacks ex/s", ratio_text(t[0], t[1])))


def bench_landscape(args, device, rows):
    from gradlab.landscape.directions import random_directions
    from gradlab.landscape.grid import evaluate_grid, grid_coords, make_axes

    if args.smoke:
        model, batch, name = small_model(device), (torch.rand(64, 1, 8, 8, device=device),
                                                   torch.randint(0, 10, (64,), device=device)), "digits CNN, batch 64"
    else:
        model, batch, name = resnet20(device), cifar_like(512, device, seed=2), "resnet20, batch 512"
    steps = 3 if args.smoke else 7
    coords = grid_coords(make_axes(-1.0, 1.0, steps, 2))
    dirs = random_directions(model, 2, generator=torch.Generator().manual_seed(0))

    def forward():
        with torch.no_grad():
            model(batch[0])

    for ppc in (1, 8):
        pairs = {"grid": ((lambda p=ppc: evaluate_grid(model, dirs, coords, [batch], points_per_call=p)),
                          (lambda: [forward() for _ in range(len(coords))]))}
        t = rounds_of(pairs, args.rounds, device)["grid"]
        per_point, per_forward = statistics.median(t[0]) / len(coords), statistics.median(t[1]) / len(coords)
        r = sorted(o / f for o, f in zip(t[0], t[1]))
        rows.append((f"landscape point, {name}, {ppc} point(s)/call", "ms/point", 1e3 * per_point,
                     1e3 * per_forward, "gradlab point / one forward pass",
                     f"{statistics.median(r):.2f} [{r[0]:.2f}, {r[-1]:.2f}]"))


# ----------------------------------------------------------------------------------- main --
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny models on any device: checks the script end to end")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 5; smoke 1)")
    ap.add_argument("--results", default=str(Path(__file__).with_name("RESULTS.md")), help="file to append to")
    ap.add_argument("--parts", default="train,eigen,attacks,landscape")
    args = ap.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.rounds = args.rounds or (1 if args.smoke else 5)
    import tempfile

    args.tmp = Path(tempfile.mkdtemp(prefix="gradlab-gpu-bench-"))
    if args.smoke and device.type == "cpu":
        torch.set_num_threads(1)  # tiny models: more threads only oversubscribe a shared machine
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (no GPU)"
    rows: list = []
    t0 = time.perf_counter()
    for part in args.parts.split(","):
        start = time.perf_counter()
        {"train": bench_train, "eigen": bench_eigen, "attacks": bench_attacks, "landscape": bench_landscape}[part](
            args, device, rows)
        print(f"# {part}: {time.perf_counter() - start:.1f}s", flush=True)
    total = time.perf_counter() - t0
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    mode = "SMOKE run (tiny models: checks the script, not a GPU measurement)" if args.smoke else "full run"
    lines = [f"\n## GPU benchmark (`benchmarks/gpu.sh`{' --smoke' if args.smoke else ''}), {gpu}, {stamp}\n",
             f"{mode}; torch {torch.__version__}; {args.rounds} round(s); {total:.0f}s in all. Ratio: median "
             "[min, max] over rounds.\n",
             "| measurement | unit | gradlab | reference | ratio is | ratio |", "|---|---|---|---|---|---|"]
    for what, unit, ours, ref, meaning, ratio in rows:
        lines.append(f"| {what} | {unit} | {ours:.4g} | {ref:.4g} | {meaning} | {ratio} |")
    text = "\n".join(lines) + "\n"
    print(text)
    with open(args.results, "a") as f:
        f.write(text)
    print(f"appended to {args.results}")


if __name__ == "__main__":
    main()
