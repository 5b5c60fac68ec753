"""The cost of fp16 loss scaling on a second-order step (issue 18), side by side in one process.

For AdaHessian (one Hutchinson probe per step) and Newton-CG (``cg_max_iter`` Hessian-vector
products per step, fixed damping 1) on the digits CNN of ``steptime.py`` at its initial weights
(restored after each step, a copy of 6k floats: every step repeats the same work), three steppers on identically initialised models:

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

    python benchmarks/bench_loss_scale.py [--repeats 7] [--block 5] [--batch 256] [--threads 1] [--moving]
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
from gradlab.core.loss_scale import GradientOverflow  # noqa: E402
from gradlab.optim import build_optimizer  # noqa: E402
from gradlab.optim.loss_scaling import attach  # noqa: E402

# each step starts from the initial weights again, so every step of a stepper repeats the same work
# (the same CG iterations, the same pattern of scales) and the ratios compare like with like
OPTIMIZERS = {"adahessian": {}, "newton": {"damping": 1.0, "damping_rule": "fixed", "cg_max_iter": 10, "cg_tol": 1e-30}}
# --moving (training): Newton's own damping rule (adaptive on networks; fixed damping 1 at lr 1
# diverges on this CNN in float32 too)
MOVING = {"adahessian": {}, "newton": {"cg_max_iter": 10}}
MODES = ("fp32", "fp16", "fp16 scaled")


def stepper(name, mode, x, y, device, moving=False):
    net = fresh(cnn, device)
    model = net if mode == "fp32" else with_precision(net, "fp16")
    opt = build_optimizer(name, net.parameters(), seed=0, **(MOVING if moving else OPTIMIZERS)[name])
    if mode == "fp16 scaled":
        attach(opt)

    start = [p.detach().clone() for p in net.parameters()]
    opt.skipped = 0

    def step():
        opt.zero_grad(set_to_none=True)
        before = [p.detach().clone() for p in net.parameters()] if moving else start
        restore = not moving
        try:
            loss = opt.step(lambda: F.cross_entropy(model(x), y))
        except GradientOverflow:  # as the training loop does: the step skipped, the weights restored
            opt.skipped += 1
            loss, restore = None, True
        if restore:
            with torch.no_grad():
                torch._foreach_copy_(list(net.parameters()), before)
        return loss
    return (net, opt), step


def final(net, x, y) -> str:
    with torch.no_grad():
        return f"{F.cross_entropy(net(x), y).item():.3g}"


def span(r) -> str:
    r = sorted(r)
    return f"{r[len(r) // 2]:.2f}x ({r[0]:.2f}-{r[-1]:.2f})"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7, help="rounds (blocks per stepper)")
    ap.add_argument("--block", type=int, default=5, help="steps per block")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--moving", action="store_true", help="train instead of restoring the weights after each "
                    "step (the modes then follow different paths: back-offs and CG iterations differ)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    x, y = digits(device, args.batch)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {args.threads} thread(s), "
          f"digits CNN, batch {args.batch}, {args.repeats} rounds of {args.block} steps, "
          f"{'training' if args.moving else 'fixed weights'}, load {load:.1f}")
    for name in OPTIMIZERS:
        steppers = {mode: stepper(name, mode, x, y, device, args.moving) for mode in MODES}
        times = measure(steppers, device, args.repeats, args.block, warmup=3)
        scaler = steppers["fp16 scaled"][0][1].loss_scaler
        print(f"\n{name} {(MOVING if args.moving else OPTIMIZERS)[name]}\n  (scale now {scaler.scale:g}, {scaler.backoffs} back-offs)")
        for mode in MODES:
            ms = sorted(1e3 * t for t in times[mode])
            opt = steppers[mode][0][1]
            hvps = opt.hvp_count / max(opt.steps_taken, 1)
            print(f"  {mode:<12} {ms[len(ms) // 2]:8.1f} ms/step ({ms[0]:.1f}-{ms[-1]:.1f}), {hvps:.1f} HVPs/step, "
                  f"{opt.skipped} skipped, final loss {final(steppers[mode][0][0], x, y)}")
        print(f"  fp16 scaled / fp16  {span(ratios(times, 'fp16 scaled', 'fp16'))}")
        print(f"  fp16 scaled / fp32  {span(ratios(times, 'fp16 scaled', 'fp32'))}")
        print(f"  fp16 / fp32         {span(ratios(times, 'fp16', 'fp32'))}")
    print(f"\nload at the end {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "")


if __name__ == "__main__":
    main()
