"""Per-example gradient statistics: gradlab against BackPACK's ``BatchGrad`` + ``Variance``.

What is timed, per case, on the same model, batch and loss:

* gradlab: :func:`gradlab.probes.gradstats.batch_statistics` -- for the MLP the per-example
  moments of each Linear layer from its inputs and output gradients (no per-example gradient
  formed, :mod:`gradlab.curvature.per_example_linear`), for the CNN's Conv2d layers each
  example's weight gradient from the same captured input and output gradient (unfolded patches,
  one ordinary backward; it went through ``torch.func.vmap`` before); then every statistic (variance, SNR, B_simple, norm, inner-product and
  orthogonality tests) per layer and for the whole model, in float64.
* BackPACK: one ``backward()`` under ``backpack(BatchGrad(), Variance())`` (per-example
  gradients and the per-parameter variance, on the extended model), then the same statistics
  from its ``grad_batch`` tensors (so both sides deliver the same numbers; the statistics' own
  cost is the same code on both sides).
* plain loop: one backward per example (what a user writes without either), for scale.

Cases: the digits MLP (64-128-128-10) and a CNN on 1x28x28 inputs, at batch 128 (and 32).
Each round times every method once, rotating the order; the ratio is the median over rounds
of the within-round ratio, with its interquartile range.

    python benchmarks/bench_gradstats.py [--rounds 9] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from gradlab.probes.gradstats import batch_statistics, gradient_statistics, grouped, moments, statistics_from_moments


def mlp():
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))


def cnn():
    return nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * 5 * 5, 10))


def with_backpack(model, x, y):
    from backpack import backpack, extend
    from backpack.extensions import BatchGrad, Variance

    model, loss_fn = extend(model), extend(nn.CrossEntropyLoss())

    def run():
        model.zero_grad()
        loss = loss_fn(model(x), y)
        with backpack(BatchGrad(), Variance()):
            loss.backward()
        # BackPACK's grad_batch is of the mean loss: example i's own gradient is B times it
        grads = {n: p.grad_batch * len(x) for n, p in model.named_parameters()}
        layers = {k: moments(g) for k, g in grouped(grads).items()}
        s, v, g2 = (sum(m[i] for m in layers.values()) for i in range(3))
        out = {"all": statistics_from_moments(s, v, g2)}
        out.update({k: statistics_from_moments(*m) for k, m in layers.items()})
        return out

    return run


def plain_loop(model, x, y):
    def run():
        rows = []
        for i in range(len(x)):
            model.zero_grad()
            F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
            rows.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
        return gradient_statistics(torch.stack(rows))

    return run


def iqr(values):
    if len(values) < 2:
        return values[0], values[0]
    q1, _, q3 = statistics.quantiles(values, n=4)
    return q1, q3


def bench(name, make, shape, rounds):
    torch.manual_seed(0)
    x, y = torch.randn(*shape), torch.randint(0, 10, (shape[0],))
    ours_model = make()
    peer_model = make()
    peer_model.load_state_dict(ours_model.state_dict())
    loop_model = make()
    loop_model.load_state_dict(ours_model.state_dict())
    methods = {"gradlab": lambda: batch_statistics(ours_model, F.cross_entropy, x, y)}
    try:
        methods["backpack"] = with_backpack(peer_model, x, y)
    except ImportError:
        print(f"{name}: BackPACK is not installed (pip install --no-deps backpack-for-pytorch); gradlab alone")
    methods["plain loop"] = plain_loop(loop_model, x, y)
    results = {k: f() for k, f in methods.items()}  # warm-up, and agreement
    if "backpack" in results:
        a, b = results["gradlab"]["all"]["variance"], results["backpack"]["all"]["variance"]
        agree = abs(a - b) / abs(b)
    times = {k: [] for k in methods}
    names = list(methods)
    for r in range(rounds):
        for k in names[r % len(names):] + names[: r % len(names)]:
            t0 = time.perf_counter()
            methods[k]()
            times[k].append(time.perf_counter() - t0)
    print(f"\n{name}, batch {shape[0]}: median ms " + ", ".join(
        f"{k} {statistics.median(v) * 1e3:.1f}" for k, v in times.items()))
    for peer in names[1:]:
        ratios = [p / o for p, o in zip(times[peer], times["gradlab"])]
        q1, q3 = iqr(ratios)
        print(f"  {peer} / gradlab = {statistics.median(ratios):.2f} (IQR {q1:.2f}-{q3:.2f}; above 1: gradlab faster)")
    if "backpack" in results:
        print(f"  same numbers: whole-model variance differs by {agree:.1e} (relative)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# per-example gradient statistics: torch {torch.__version__}, {args.threads} thread(s), "
          f"{args.rounds} rounds")
    for batch in (32, 128):
        bench("digits MLP 64-128-128-10", mlp, (batch, 64), args.rounds)
        bench("CNN 1x28x28", cnn, (batch, 1, 28, 28), args.rounds)


if __name__ == "__main__":
    main()
