"""A small trained digits MLP and test split shared by the attack tests.

Trained once per test session (full-batch Adam, 150 steps, ~97% test accuracy); the test split
holds the 397 digits the model never saw, so robust accuracies move in steps of 0.25 points.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from gradlab.models.base import GradlabNet, Normalize


def digits_split(n_train: int = 1400, n_test=None):
    """``(x_train, y_train, x_test, y_test)``: the first ``n_train`` digits of a seed-0 permutation
    and the next ``n_test`` (unset: all 397 left), as ``(N, 1, 8, 8)`` in [0, 1]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = perm[:n_train], perm[n_train:None if n_test is None else n_train + n_test]
    return x[train], y[train], x[test], y[test]


def digits_mlp() -> GradlabNet:
    """The untrained 64-32-10 ReLU MLP of :func:`trained_mlp` (initialised from torch's global generator)."""
    blocks = [nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU())]
    return GradlabNet(Normalize([0.3], [0.4]), blocks, nn.Linear(32, 10))


@functools.lru_cache(maxsize=None)
def trained_mlp(n_train: int = 1400, n_test=None):
    """``(model, x_test, y_test)``: the MLP (64-32-10, eval mode, parameters frozen) trained on
    :func:`digits_split`'s first ``n_train`` digits, and its test split."""
    x_tr, y_tr, x_te, y_te = digits_split(n_train, n_test)
    torch.manual_seed(0)
    model = digits_mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(model(x_tr), y_tr).backward()
        opt.step()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, x_te, y_te


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return (model(x).argmax(dim=1) == y).float().mean().item()


def tiny_model(seed: int, d_in: int = 16, classes: int = 10):
    """An untrained (1, 4, 4) -> ``classes`` tanh MLP for property tests."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(d_in, 12), nn.Tanh(), nn.Linear(12, classes))
