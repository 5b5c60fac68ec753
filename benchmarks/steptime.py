"""The step-timing loop shared by ``bench_optim.py`` and ``bench_second_order.py``.

A "stepper" is ``(model, step)``: ``step()`` runs one whole training step (forward, gradient(s),
update) of one optimizer on its own identically initialised model. :func:`measure` times blocks of
consecutive steps round-robin over the steppers (so load on a shared machine hits all of them
alike), with the garbage collector run before each block and off inside it; :func:`paired` and
:func:`spread` read the ratios within rounds (median, interquartile range).
"""

from __future__ import annotations

import gc
import statistics
import sys
import time
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


def fresh(model_fn, device, train=False):
    """``model_fn()`` on ``device`` from seed 0: every stepper starts from the same weights."""
    torch.manual_seed(0)
    model = model_fn().to(device)
    return model.train() if train else model


def first_order(model, x, y, name, **opts):
    """A stepper for an optimizer that reads ``p.grad``: zero_grad, loss, backward, step."""
    opt = build_optimizer(name, model.parameters(), **opts)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss
    return model, step


def closure_based(model, x, y, name, **opts):
    """A stepper for an optimizer that takes a loss closure (bound to the model when it needs it)."""
    opt = build_optimizer(name, model.parameters(), **opts)
    if getattr(opt, "needs_model", False):
        opt.bind(model, F.cross_entropy)

    def step():
        opt.zero_grad(set_to_none=True)
        return opt.step(lambda: F.cross_entropy(model(x), y))
    return model, step


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(steppers, device, repeats, block, warmup=12):
    """Per-step times of ``repeats`` blocks of ``block`` steps per stepper, round-robin, after
    ``warmup`` untimed steps each."""
    for _, step in steppers.values():
        for _ in range(warmup):
            step()
    sync(device)
    times = {name: [] for name in steppers}
    for _ in range(repeats):
        for name, (_, step) in steppers.items():
            # As timeit does: garbage collected before each block, and the collector off inside it.
            # A loop that leaves reference cycles (backward(create_graph=True) through p.grad) would
            # otherwise have them collected in whichever stepper's block runs next.
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


def ratios(times, name, ref) -> list[float]:
    return [a / b for a, b in zip(times[name], times[ref])]


def paired(times, name, ref):
    """Median over rounds of (name's block time / ref's block time in the same round): the shared
    machine's speed drifts by 10-30% over seconds, which a ratio of two medians does not cancel."""
    return statistics.median(ratios(times, name, ref))


def spread(times, name, ref) -> str:
    """``", IQR a-b"`` of the within-round ratios ("" for one round), printed beside a median."""
    r = ratios(times, name, ref)
    if len(r) < 2:
        return ""
    q1, _, q3 = statistics.quantiles(r, n=4)
    return f", IQR {q1:.2f}-{q3:.2f}"


def final_losses(steppers, x, y):
    with torch.no_grad():
        return {name: F.cross_entropy(model(x), y).item() for name, (model, _) in steppers.items()}
