"""Step cost of SAM and K-FAC against an SGD step, side by side in one process.

A "step" is the whole training step: forward, gradient(s), update. SAM takes two gradients (at
``w`` and at ``w + e``); K-FAC with ``factor_every=10`` (and ``inverse_every=10``) refreshes its
Kronecker factors and their eigenbases on one step in ten (a backward pass to the layer outputs,
the moments, an eigendecomposition per factor) and on the others takes a gradient and applies the
per-layer preconditioning products. Steps are timed in blocks of ``--block`` consecutive steps (a
multiple of 10, so each block holds the same share of refresh steps), blocks round-robin over the
optimizers, and each ratio is the median over rounds of the ratio within a round (with its
interquartile range): the loop of ``steptime.py``, shared with ``bench_optim.py``.

Targets (issue 15): sam / SGD <= 2.1; kfac (factors every 10 steps) / SGD <= 1.5, for both damping
modes (``exact``, the default: eigendecompositions and four products per layer; ``factored``:
Cholesky inverses and two products, Martens & Grosse 2015 Sec. 6.3). SAM's base
optimizer here is plain SGD (``base=sgd``), so the ratio is the cost of SAM itself; the rows with
momentum compare momentum SAM / K-FAC (K-FAC has heavy-ball momentum 0.9) with momentum SGD.

Models: the digits MLP 64-128-128-10 and CNN of ``steptime.py`` (batch 512), and with
``--resnet`` resnet20 on random 3x32x32 inputs (``--resnet-batch`` examples, train mode; BatchNorm's
parameters take K-FAC's plain momentum steps), fewer rows and blocks of 10 steps.

    python benchmarks/bench_second_order.py [--repeats 11] [--threads 1] [--resnet]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from steptime import closure_based, cnn, digits, final_losses, first_order, fresh  # noqa: E402
from steptime import measure, mlp, paired, ratios, spread  # noqa: E402

TARGETS = {"sam (base sgd)": ("sgd", 2.1), "kfac, factors every 10": ("sgd", 1.5),
           "kfac factored, every 10": ("sgd", 1.5)}


def resnet20():
    from gradlab.data.base import DataSpec
    from gradlab.models import build_model

    spec = DataSpec("cifar10", (3, 32, 32), 10, [0.49, 0.48, 0.45], [0.25, 0.24, 0.26])
    return build_model("resnet20", spec)


RESNET_ROWS = ("sgd", "momentum sgd", "sam (base sgd)", "kfac, factors every 10", "kfac factored, every 10")


def make_steppers(model_fn, x, y, device, only=None):
    """name -> (model, one-step function), each with its own identically initialised model
    (``only``: these rows alone)."""

    def model():
        return fresh(model_fn, device, train=True)

    rows = {
        "sgd": lambda: first_order(model(), x, y, "sgd", lr=0.05),
        "momentum sgd": lambda: first_order(model(), x, y, "momentum", lr=0.05),
        "sam (base sgd)": lambda: closure_based(model(), x, y, "sam", base="sgd"),
        "sam (base momentum)": lambda: closure_based(model(), x, y, "sam"),
        "kfac, factors every 10": lambda: closure_based(model(), x, y, "kfac", factor_every=10, inverse_every=10),
        "kfac, factors every step": lambda: closure_based(model(), x, y, "kfac", factor_every=1, inverse_every=1),
        "kfac factored, every 10": lambda: closure_based(model(), x, y, "kfac", factor_every=10, inverse_every=10,
                                                         damping_mode="factored"),
        "kfac factored, every step": lambda: closure_based(model(), x, y, "kfac", factor_every=1, inverse_every=1,
                                                           damping_mode="factored"),
    }
    return {name: make() for name, make in rows.items() if only is None or name in only}


def iqr(times, name, ref) -> str:
    r = sorted(ratios(times, name, ref))
    return f"{r[len(r) // 4]:.2f}-{r[(3 * len(r)) // 4]:.2f}"


def report(title, times, losses):
    print(f"\n## {title}\n")
    print("| optimizer | x SGD (IQR) | x momentum SGD | loss after |")
    print("|---|---:|---:|---:|")
    for name in times:
        print(f"| {name} | {paired(times, name, 'sgd'):.2f} ({iqr(times, name, 'sgd')}) "
              f"| {paired(times, name, 'momentum sgd'):.2f} | {losses[name]:.4f} |")
    print()
    for name, (ref, target) in TARGETS.items():
        r = paired(times, name, ref)
        print(f"{name + ' / ' + ref:<36} = {r:.2f}  (target <= {target:g}{spread(times, name, ref)}; "
              f"{'meets' if r <= target else 'misses'} it)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=11, help="timed blocks per optimizer (rounds)")
    ap.add_argument("--block", type=int, default=20, help="steps per timed block (a multiple of 10)")
    ap.add_argument("--batch", type=int, default=512, help="batch size on digits")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: stable on a shared machine)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--models", default="mlp,cnn", help="comma-separated: mlp, cnn")
    ap.add_argument("--resnet", action="store_true", help="also resnet20 on 3x32x32 (slow on a CPU)")
    ap.add_argument("--resnet-batch", type=int, default=32)
    ap.add_argument("--resnet-repeats", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"# SAM and K-FAC step cost: torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"device {device}, {args.threads} thread(s), blocks of {args.block} steps, load average "
          f"{'n/a' if load is None else ' '.join(f'{v:.1f}' for v in load)} at the start")
    x, y = digits(device, args.batch)
    cases = {"mlp": ("digits MLP 64-128-128-10", mlp), "cnn": ("digits CNN (6k parameters)", cnn)}
    for key in filter(None, args.models.split(",")):
        title, model_fn = cases[key]
        steppers = make_steppers(model_fn, x, y, device)
        times = measure(steppers, device, args.repeats, args.block, warmup=10)
        n = sum(p.numel() for p in model_fn().parameters())
        report(f"{title}, {n} parameters, batch {args.batch}", times, final_losses(steppers, x, y))
    if args.resnet:
        g = torch.Generator().manual_seed(0)
        xr = torch.randn(args.resnet_batch, 3, 32, 32, generator=g).to(device)
        yr = torch.randint(0, 10, (args.resnet_batch,), generator=g).to(device)
        steppers = make_steppers(resnet20, xr, yr, device, only=RESNET_ROWS)
        times = measure(steppers, device, args.resnet_repeats, 10, warmup=2)  # 10 steps: one refresh each
        report(f"resnet20 on 3x32x32, batch {args.resnet_batch}", times, final_losses(steppers, xr, yr))
    if load is not None:
        print(f"\nload average at the end: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
