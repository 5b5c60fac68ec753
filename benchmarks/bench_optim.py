"""Optimizer step cost: gradlab's AdaHessian (a refresh, a step without one, delayed) against
SGD, Adam and torch-optimizer's Adahessian, on the same model, data and batch.

A "step" is the whole training step each optimizer needs: forward, gradient (and, for the
second-order ones, the Hessian-vector product), update. Steps are timed in blocks of ``--block``
consecutive steps (a multiple of k, so the delayed update's cheap and expensive steps are
amortised as in training); the reported time per step is the median over ``--repeats`` blocks,
measured round-robin across optimizers so that load on a shared machine hits all of them alike,
and each ratio is the median over rounds of the ratio within a round.
torch-optimizer's Adahessian runs at ``hessian_power=1`` (the paper's value; its default is 0.5)
and needs ``loss.backward(create_graph=True)`` in the loop, gradlab's takes a loss closure.

"A refresh" is a step that re-estimates the Hessian diagonal (``hessian_update_every=1``: every
step does); "no refresh" reuses the last one (``hessian_update_every`` larger than the run: only
the untimed warm-up steps refresh), so it times the gradient and the update alone.

Targets (issue 13): refresh/SGD <= 3, no-refresh/SGD <= 1.1, adahessian/torch-optimizer <= 1
(printed with the median and the interquartile range of the within-round ratios); delayed(k)/SGD
<= 1 + 2/k follows from the first two.

    python benchmarks/bench_optim.py [--repeats 15] [--threads 1] [--device cpu]
"""

from __future__ import annotations

import argparse
import gc
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from gradlab.optim import build_optimizer  # noqa: E402


def digits(device, batch):
    """One fixed batch of digits (standardised), as images (N, 1, 8, 8)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data[:batch] / 16.0, dtype=torch.float32)
    x = ((x - x.mean()) / x.std()).view(-1, 1, 8, 8)
    return x.to(device), torch.tensor(d.target[:batch]).to(device)


def mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                         nn.Linear(128, 10))


def cnn():
    """About 6k parameters: two 3x3 convs and a linear head."""
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(16 * 2 * 2, 64), nn.ReLU(), nn.Linear(64, 10))


def make_steppers(model_fn, x, y, device, k):
    """name -> (model, one-step function). Each gets its own identically initialised model."""
    steppers = {}

    def fresh():
        torch.manual_seed(0)
        return model_fn().to(device)

    def first_order(name, **opts):
        model = fresh()
        opt = build_optimizer(name, model.parameters(), **opts)

        def step():
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            return loss
        return model, step

    def closure_based(name, **opts):
        model = fresh()
        opt = build_optimizer(name, model.parameters(), **opts)

        def step():
            opt.zero_grad(set_to_none=True)
            return opt.step(lambda: F.cross_entropy(model(x), y))
        return model, step

    steppers["sgd"] = first_order("sgd")
    steppers["adam"] = first_order("adam")
    steppers["gradlab adahessian"] = closure_based("adahessian")  # a refresh every step
    # refreshes during the warm-up steps of measure(), then never again
    steppers["gradlab adahessian no refresh"] = closure_based("adahessian", hessian_update_every=NEVER)
    steppers[f"gradlab adahessian k={k}"] = closure_based("adahessian", hessian_update_every=k)
    steppers["gradlab curvature-gd"] = closure_based("curvature-gd")
    try:
        import torch_optimizer
    except ImportError:
        print("torch-optimizer is not installed (pip install torch-optimizer): peer rows skipped")
    else:
        model = fresh()
        peer = torch_optimizer.Adahessian(model.parameters(), lr=0.15, hessian_power=1.0)

        def peer_step():
            peer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward(create_graph=True)  # the peer's contract
            peer.step()
            return loss
        steppers["torch-optimizer Adahessian"] = (model, peer_step)
    return steppers


NEVER = 10**9  # hessian_update_every beyond any run: only the hessian_warmup steps (and one more) refresh


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(steppers, device, repeats, block, warmup=12):
    """Per-step times of ``repeats`` blocks per stepper, round-robin. The warm-up covers gradlab's
    ``hessian_warmup`` (10 steps refreshing the diagonal every step before the delay starts, and
    the refresh at step 10), so the delayed variant is timed in its steady state rather than with
    two warm-up blocks, and the "no refresh" one never refreshes while timed."""
    for _, step in steppers.values():
        for _ in range(warmup):
            step()
    sync(device)
    times = {name: [] for name in steppers}
    for _ in range(repeats):
        for name, (_, step) in steppers.items():
            # As timeit does: garbage collected before each block, and the collector off inside it.
            # The peer's loop (backward(create_graph=True)) leaves reference cycles through p.grad
            # every step; collected whenever the collector fires, their cost would land in whichever
            # optimizer's block runs next. (The peer is not charged for its own collections either.)
            gc.collect()
            gc.disable()
            try:
                sync(device)
                t0 = time.perf_counter()
                for _ in range(block):
                    step()
                sync(device)
            finally:
                gc.enable()
            times[name].append((time.perf_counter() - t0) / block)
    return times


def paired(times, name, ref):
    """Median over rounds of (name's block time / ref's block time in the same round): the shared
    machine's speed drifts by 10-30% over seconds, which a ratio of two medians does not cancel."""
    return statistics.median(a / b for a, b in zip(times[name], times[ref]))


def spread(times, name, ref) -> str:
    """The interquartile range of the within-round ratios, printed beside each target's median so
    that a median a few percent from its target reads as what it is."""
    ratios = [a / b for a, b in zip(times[name], times[ref])]
    if len(ratios) < 2:
        return ""
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    return f", IQR {q1:.2f}-{q3:.2f}"


def final_losses(steppers, x, y):
    with torch.no_grad():
        return {name: F.cross_entropy(model(x), y).item() for name, (model, _) in steppers.items()}


def agreement_with_peer(model_fn, x, y, device, steps=5):
    """Max relative parameter difference between gradlab's and the peer's AdaHessian after
    ``steps`` steps fed the same Rademacher probes: the two time the same algorithm."""
    try:
        import torch_optimizer
    except ImportError:
        return None
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(model_fn().to(device))
    ours, theirs = models

    def same_probes_as_peer(params):  # the peer draws randint_like(p, high=2) per parameter, in order
        return [2 * torch.randint_like(p, high=2) - 1 for p in params]

    opt = build_optimizer("adahessian", ours.parameters())
    opt.vecs_fn = same_probes_as_peer
    peer = torch_optimizer.Adahessian(theirs.parameters(), lr=0.15, hessian_power=1.0)
    for i in range(steps):
        torch.manual_seed(1000 + i)
        opt.zero_grad(set_to_none=True)
        opt.step(lambda: F.cross_entropy(ours(x), y))
        torch.manual_seed(1000 + i)
        peer.zero_grad(set_to_none=True)
        F.cross_entropy(theirs(x), y).backward(create_graph=True)
        peer.step()
    a = torch.cat([p.detach().reshape(-1) for p in ours.parameters()])
    b = torch.cat([p.detach().reshape(-1) for p in theirs.parameters()])
    return ((a - b).abs().max() / b.abs().max()).item()


def target_line(times, name, ref, label, target) -> str:
    ratio = paired(times, name, ref)
    verdict = "meets" if ratio <= target else "misses"
    return f"{label:<44} = {ratio:.2f}  (target <= {target:g}{spread(times, name, ref)}; {verdict} it)"


def report(title, times, losses, k, agreement=None):
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"\n## {title}\n")
    print("| optimizer | ms/step | x SGD | loss after the timed steps |")
    print("|---|---:|---:|---:|")
    for name, t in med.items():
        print(f"| {name} | {t * 1e3:.3f} | {paired(times, name, 'sgd'):.2f} | {losses[name]:.4f} |")
    ada, delayed = "gradlab adahessian", f"gradlab adahessian k={k}"
    print("\n(x SGD and the ratios below: median over rounds of the ratio within each round)\n")
    print(target_line(times, ada, "sgd", "adahessian refresh / SGD", 3))
    print(target_line(times, "gradlab adahessian no refresh", "sgd", "adahessian step without a refresh / SGD", 1.1))
    peer = "torch-optimizer Adahessian"
    if peer in times:
        print(target_line(times, ada, peer, "adahessian / torch-optimizer Adahessian", 1))
        print(f"{'torch-optimizer Adahessian / Adam':<44} = {paired(times, peer, 'adam'):.2f}")
    else:
        print(f"{'adahessian / torch-optimizer Adahessian':<44} = not measured (torch-optimizer not installed)")
    if agreement is not None:
        print(f"same probes, 5 steps: max |theta_gradlab - theta_peer| / max |theta| = {agreement:.1e}")
    print(target_line(times, delayed, "sgd", f"adahessian k={k} / SGD", round(1 + 2 / k, 2)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=21, help="timed blocks per optimizer (median reported)")
    ap.add_argument("--block", type=int, default=8, help="steps per timed block (a multiple of --k)")
    ap.add_argument("--k", type=int, default=4, help="delayed Hessian update interval")
    ap.add_argument("--batch", type=int, default=512, help="batch size")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: stable on a shared machine)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    args = ap.parse_args(argv)
    # The peer's contract (backward(create_graph=True)) makes torch warn about a reference cycle
    # on every step; that is the peer's known cost, not news for each run.
    warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"# optimizer step cost: torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"device {device}{' (' + torch.cuda.get_device_name() + ')' if device.type == 'cuda' else ''}, "
          f"{args.threads} thread(s), batch {args.batch}, median of {args.repeats} blocks of {args.block} steps")
    x, y = digits(device, args.batch)
    for title, model_fn in [("MLP 64-128-128-10", mlp), ("CNN (6k parameters)", cnn)]:
        n = sum(p.numel() for p in model_fn().parameters())
        steppers = make_steppers(model_fn, x, y, device, args.k)
        times = measure(steppers, device, args.repeats, args.block)
        report(f"{title}, {n} parameters", times, final_losses(steppers, x, y), args.k,
               agreement_with_peer(model_fn, x, y, device))


if __name__ == "__main__":
    main()
