"""The cost of fp16 loss scaling on a second-order step (issue 18), side by side in one process.

For AdaHessian (one Hutchinson probe per step) and Newton-CG (``cg_max_iter`` Hessian-vector
products per step, adaptive damping) on the digits CNN of ``steptime.py``, three steppers on
identically initialised models:

* ``fp32``: the plain step;
* ``fp16``: the closure's forward pass under fp16 autocast, the optimizer's own gradient and
  products UNSCALED (what ``--precision fp16`` did before: they underflow on a confident model);
* ``fp16 scaled``: the same with a loss scaler attached (:mod:`gradlab.optim.loss_scaling`): the
  gradient of ``S * loss``, each product divided by ``S``, one finiteness check (a host sync) per
  gradient and per product, a retry on overflow.

Printed: per-step times and the within-round ratios (median and min-max over rounds) of scaled
over unscaled fp16 (the overhead of the scaling) and of each over fp32. There is no peer library
to compare with: torch's ``GradScaler`` scales ``loss.backward()`` only, not a closure's
``autograd.grad`` or double backward.

    python benchmarks/bench_loss_scale.py [--repeats 7] [--block 5] [--batch 256] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from steptime import cnn, digits, fresh, measure, ratios  # noqa: E402
from gradlab.core.autocast import with_precision  # noqa: E402
from gradlab.optim import build_optimizer  # noqa: E402
from gradlab.optim.loss_scaling import attach  # noqa: E402

OPTIMIZERS = {"adahessian": {}, "newton": {"cg_max_iter": 10, "cg_tol": 1e-30}}
MODES = ("fp32", "fp16", "fp16 scaled")


def stepper(name, mode, x, y, device):
    net = fresh(cnn, device)
    model = net if mode == "fp32" else with_precision(net, "fp16")
    opt = build_optimizer(name, net.parameters(), seed=0, **OPTIMIZERS[name])
    if mode == "fp16 scaled":
        attach(opt)

    def step():
        opt.zero_grad(set_to_none=True)
        return opt.step(lambda: F.cross_entropy(model(x), y))
    return (net, opt), step


def span(r) -> str:
    r = sorted(r)
    return f"{r[len(r) // 2]:.2f}x ({r[0]:.2f}-{r[-1]:.2f})"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7, help="rounds (blocks per stepper)")
    ap.add_argument("--block", type=int, default=5, help="steps per block")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    x, y = digits(device, args.batch)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {args.threads} thread(s), "
          f"digits CNN, batch {args.batch}, {args.repeats} rounds of {args.block} steps, load {load:.1f}")
    for name in OPTIMIZERS:
        steppers = {mode: stepper(name, mode, x, y, device) for mode in MODES}
        times = measure(steppers, device, args.repeats, args.block, warmup=3)
        scaler = steppers["fp16 scaled"][0][1].loss_scaler
        print(f"\n{name} {OPTIMIZERS[name] or ''}  (scale now {scaler.scale:g}, {scaler.backoffs} back-offs)")
        for mode in MODES:
            ms = sorted(1e3 * t for t in times[mode])
            print(f"  {mode:<12} {ms[len(ms) // 2]:8.1f} ms/step ({ms[0]:.1f}-{ms[-1]:.1f})")
        print(f"  fp16 scaled / fp16  {span(ratios(times, 'fp16 scaled', 'fp16'))}")
        print(f"  fp16 scaled / fp32  {span(ratios(times, 'fp16 scaled', 'fp32'))}")
        print(f"  fp16 / fp32         {span(ratios(times, 'fp16', 'fp32'))}")
    print(f"\nload at the end {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "")


if __name__ == "__main__":
    main()
