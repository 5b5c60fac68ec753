"""Datasets read from disk batch by batch (``stream=true``), through a torch ``DataLoader``.

A streamed dataset returns a :class:`StreamingData` in place of a :class:`DataBundle`: the same
name, shapes, classes and training statistics, but its splits are map-style
``torch.utils.data.Dataset`` objects that read examples from their files on demand (CIFAR-10
pickle batches through a small per-process cache, image files one by one). Consumers draw
batches with :meth:`StreamingData.loader`, a ``DataLoader`` with ``workers`` worker processes
(the ``workers`` option), so training, full-dataset curvature and attacks over a whole test set
hold a few batches at a time, never the dataset.

Order and sharding are the in-memory ones, so streamed results equal in-memory results:
evaluation passes read consecutive batches of ``batch_size`` examples in file order, and under
``torchrun`` rank ``r`` takes batches ``r, r + W, ...`` (whole batches, as
:func:`gradlab.curvature.distributed.shard_batches` and the attack sweep deal them). Training
uses the trainer's own :class:`~gradlab.core.distributed.GlobalBatchSampler` indices as the
loader's batch sampler. torch's ``DistributedSampler`` is not used: it pads a split with repeated
examples, which would count them twice in a full-dataset mean.

A dataset whose reads are only cheap in file order (CIFAR's 10,000-image pickle files) gives
``blocks``, the sizes of its read units; training then shuffles the order of the blocks and the
examples within each block (:func:`block_permutation`), so an epoch decodes each file once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from gradlab.core.distributed import DistInfo
from gradlab.core.errors import GradlabError

#: Examples per batch of the statistics pass (:func:`stream_stats`).
STATS_BATCH = 512


@dataclass
class StreamingData:
    """A dataset streamed from disk; see the module docstring.

    ``train``/``test`` are map-style datasets of ``(x float32 (*input_shape) in [0, 1], y int)``;
    ``blocks`` the sizes of the training split's read units in index order (None: any order is
    cheap); ``workers`` the loader's worker processes.
    """

    name: str
    train: torch.utils.data.Dataset
    test: torch.utils.data.Dataset
    input_shape: tuple
    num_classes: int
    mean: list
    std: list
    notes: list = field(default_factory=list)
    workers: int = 0
    blocks: Optional[list] = None

    streamed = True

    @property
    def spec(self):
        from gradlab.data.base import DataSpec

        return DataSpec(self.name, tuple(self.input_shape), self.num_classes, list(self.mean), list(self.std))

    def split(self, name: str):
        if name not in ("train", "test"):
            raise GradlabError(f"invalid split: {name!r} (must be one of: train, test)")
        return self.train if name == "train" else self.test

    def size(self, name: str) -> int:
        return len(self.split(name))

    def loader(self, split: str, batch_size: int, *, dist: DistInfo = DistInfo(), limit: Optional[int] = None,
               batch_sampler=None) -> torch.utils.data.DataLoader:
        """Consecutive batches of ``batch_size`` of ``split`` (its first ``limit`` examples), this
        rank's share under ``torchrun``; or the batches of index lists ``batch_sampler`` gives."""
        data = self.split(split)
        if batch_sampler is None:
            batch_sampler = eval_batches(len(data) if limit is None else min(limit, len(data)), batch_size, dist)
        return torch.utils.data.DataLoader(data, batch_sampler=batch_sampler, num_workers=self.workers,
                                           generator=_own_generator())

    def _in_memory(self):
        raise GradlabError(f"dataset {self.name} is streamed (stream=true) and this command needs it in memory: "
                           f"run it without --stream")

    x_train = y_train = x_test = y_test = property(_in_memory)


def _own_generator() -> torch.Generator:
    """A loader's own generator: iterating it must not draw from the global one (a model's
    initialisation or dropout after loading would then differ from the in-memory run)."""
    return torch.Generator().manual_seed(0)


def eval_batches(n: int, batch_size: int, dist: DistInfo = DistInfo()) -> list:
    """``[range(0, bs), range(bs, 2 bs), ...]`` over ``n`` examples; under ``torchrun`` rank ``r``
    keeps batches ``r, r + W, ...``."""
    if batch_size < 1:
        raise GradlabError(f"invalid batch_size: {batch_size} (must be an integer >= 1)")
    starts = list(range(0, n, batch_size))[dist.rank :: dist.world_size]
    return [list(range(s, min(s + batch_size, n))) for s in starts]


def block_permutation(blocks: list, generator: torch.Generator) -> torch.Tensor:
    """A permutation of ``range(sum(blocks))`` that visits the blocks in a random order and each
    block's indices in a random order (every index exactly once)."""
    starts = np.concatenate([[0], np.cumsum(blocks)[:-1]]).astype(np.int64)
    order = torch.randperm(len(blocks), generator=generator).tolist()
    return torch.cat([int(starts[b]) + torch.randperm(int(blocks[b]), generator=generator) for b in order])


def stream_stats(data: torch.utils.data.Dataset, workers: int = 0) -> tuple[list, list]:
    """Per-channel mean and std (float64 sums, one pass in file order) of a streamed split, as
    :func:`gradlab.data.common.channel_stats` computes them for the same examples in memory."""
    loader = torch.utils.data.DataLoader(data, batch_sampler=eval_batches(len(data), STATS_BATCH),
                                         num_workers=workers, generator=_own_generator())
    s1 = s2 = None
    count = 0
    for x, _ in loader:
        x = x.double()
        flat = x.reshape(1, -1) if x.dim() <= 2 else x.transpose(0, 1).reshape(x.shape[1], -1)  # (C, N * spatial)
        s1 = flat.sum(1) if s1 is None else s1 + flat.sum(1)
        s2 = (flat * flat).sum(1) if s2 is None else s2 + (flat * flat).sum(1)
        count += flat.shape[1]
    if s1 is None:
        raise GradlabError("the training split is empty")
    mean = s1 / count
    var = (s2 - count * mean * mean) / max(count - 1, 1)  # unbiased, as torch.std
    std = var.clamp_min(0).sqrt().tolist()
    return mean.tolist(), [s if s > 0 else 1.0 for s in std]


def limit_stream(data: StreamingData, max_train: int, seed: int) -> StreamingData:
    """:func:`gradlab.data.common.limit_train` for a streamed dataset: the same seeded subset."""
    n = len(data.train)
    if max_train <= 0 or max_train >= n:
        return data
    keep = np.sort(np.random.default_rng(seed + 1).permutation(n)[:max_train])
    data.train = torch.utils.data.Subset(data.train, keep.tolist())
    data.blocks = None  # a sorted subset keeps file order; blocks no longer match its indices
    data.mean, data.std = stream_stats(data.train, data.workers)
    data.notes.append(f"using {max_train} of {n} training examples (max_train)")
    return data


def to_bundle(data: StreamingData):
    """The whole dataset in memory (a :class:`~gradlab.data.base.DataBundle`; tests compare the two)."""
    from gradlab.data.base import DataBundle

    def read(split):
        loader = data.loader(split, STATS_BATCH)
        xs, ys = zip(*loader) if len(data.split(split)) else ((torch.zeros(0, *data.input_shape),), (torch.zeros(0),))
        return torch.cat(xs).float(), torch.cat(ys).long()

    (xtr, ytr), (xte, yte) = read("train"), read("test")
    return DataBundle(data.name, xtr, ytr, xte, yte, tuple(data.input_shape), data.num_classes, list(data.mean),
                      list(data.std), list(data.notes))
