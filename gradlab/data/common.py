"""Helpers every loader shares: seeded stratified splits, [0, 1] rescaling, statistics."""

from __future__ import annotations

import numpy as np
import torch

from gradlab.data.base import DataBundle


def stratified_split(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(train, test)``: per class, a seeded ``round(test_fraction * n_c)`` go to test.

    Deterministic from ``seed``; each index list is sorted (file order kept within a split).
    """
    rng = np.random.default_rng(seed)
    test = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        k = int(round(test_fraction * len(idx)))
        k = min(max(k, 1 if len(idx) > 1 else 0), len(idx) - 1)  # keep every class in both splits
        test.append(rng.permutation(idx)[:k])
    test_idx = np.sort(np.concatenate(test)) if test else np.zeros(0, dtype=np.int64)
    mask = np.ones(len(y), dtype=bool)
    mask[test_idx] = False
    return np.flatnonzero(mask), test_idx


def unit_rescale(x_train: np.ndarray, x_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Min-max rescale into [0, 1] with the *training* range (one scalar range; test clipped)."""
    lo, hi = float(x_train.min()), float(x_train.max())
    scale = hi - lo if hi > lo else 1.0
    return np.clip((x_train - lo) / scale, 0, 1), np.clip((x_test - lo) / scale, 0, 1)


def channel_stats(x: torch.Tensor) -> tuple[list[float], list[float]]:
    """Mean and std of training inputs ``(N, C, ...)`` per channel (one value for flat ``(N, d)``).

    Accumulated in float64; a zero std (constant data) becomes 1 so normalisation stays finite.
    """
    x = x.double()
    if x.dim() <= 2:
        mean, std = [x.mean().item()], [x.std().item()]
    else:
        flat = x.transpose(0, 1).reshape(x.shape[1], -1)  # (C, N * spatial)
        mean, std = flat.mean(1).tolist(), flat.std(1).tolist()
    return mean, [s if s > 0 else 1.0 for s in std]


def make_bundle(
    name: str, x_train, y_train, x_test, y_test, num_classes: int, notes: list | None = None
) -> DataBundle:
    """Build a DataBundle: float32 inputs, int64 labels, stats from the training split."""
    xtr = torch.as_tensor(np.ascontiguousarray(x_train), dtype=torch.float32)
    xte = torch.as_tensor(np.ascontiguousarray(x_test), dtype=torch.float32)
    mean, std = channel_stats(xtr)
    return DataBundle(
        name=name,
        x_train=xtr,
        y_train=torch.tensor(np.asarray(y_train, dtype=np.int64)),  # a copy: IDX buffers are read-only
        x_test=xte,
        y_test=torch.tensor(np.asarray(y_test, dtype=np.int64)),
        input_shape=tuple(xtr.shape[1:]),
        num_classes=int(num_classes),
        mean=mean,
        std=std,
        notes=list(notes or []),
    )


def limit_train(bundle: DataBundle, max_train: int, seed: int) -> DataBundle:
    """Keep a seeded subset of ``max_train`` training examples (0 = all); stats recomputed."""
    n = len(bundle.y_train)
    if max_train <= 0 or max_train >= n:
        return bundle
    keep = np.sort(np.random.default_rng(seed + 1).permutation(n)[:max_train])
    keep_t = torch.as_tensor(keep)
    bundle.x_train, bundle.y_train = bundle.x_train[keep_t], bundle.y_train[keep_t]
    bundle.mean, bundle.std = channel_stats(bundle.x_train)
    bundle.notes.append(f"using {max_train} of {n} training examples (max_train)")
    return bundle
