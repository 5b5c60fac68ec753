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
import platform
import statistics
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from gradlab.optim import build_optimizer  # noqa: E402
from steptime import closure_based as _closure_based, first_order as _first_order, fresh as _fresh  # noqa: E402
from steptime import cnn, digits, final_losses, measure, mlp, paired, spread  # noqa: E402,F401


def make_steppers(model_fn, x, y, device, k):
    """name -> (model, one-step function). Each gets its own identically initialised model."""
    steppers = {}
    fresh = lambda: _fresh(model_fn, device)  # noqa: E731
    first_order = lambda name, **opts: _first_order(fresh(), x, y, name, **opts)  # noqa: E731
    closure_based = lambda name, **opts: _closure_based(fresh(), x, y, name, **opts)  # noqa: E731

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
        # 12 warm-up steps: past AdaHessian's hessian_warmup (10 steps refreshing every step) and the
        # refresh at step 10, so the delayed variant is timed in its steady state
        times = measure(steppers, device, args.repeats, args.block)
        report(f"{title}, {n} parameters", times, final_losses(steppers, x, y), args.k,
               agreement_with_peer(model_fn, x, y, device))


if __name__ == "__main__":
    main()
