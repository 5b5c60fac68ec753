"""Where the trainer's batches come from: tensors in memory, or a streamed dataset.

In memory (a :class:`~gradlab.data.base.DataBundle`) both splits move to the device once and a
step's batch is an index into them. A streamed dataset (:class:`~gradlab.data.stream.StreamingData`,
``stream=true``) stays on disk: each epoch's batches are read by a ``DataLoader`` (``workers``
worker processes) whose batch sampler is the trainer's own list of index batches from the
resume position on, so a step sees exactly the examples it would see in memory (under
``torchrun``: this rank's share of the global batch, from
:class:`~gradlab.core.distributed.GlobalBatchSampler`). A dataset that reads cheaply only in
file order (CIFAR-10's pickle files: ``blocks``) is shuffled by :func:`~gradlab.data.stream.block_permutation`
instead of a global permutation, so an epoch decodes each file once. Evaluation streams the test
split in batches (:func:`evaluate_stream`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gradlab.core.distributed import GlobalBatchSampler
from gradlab.core.modelstate import model_state


class BlockBatchSampler(GlobalBatchSampler):
    """:class:`GlobalBatchSampler` over a block permutation (blocks in a seeded random order,
    examples shuffled within each block), cut into global batches and dealt to ranks alike."""

    def __init__(self, blocks: list, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        super().__init__(sum(blocks), batch_size, seed, rank, world_size)
        self.blocks = list(blocks)

    def epoch_batches(self, epoch: int):
        from gradlab.data.stream import block_permutation

        perm = block_permutation(self.blocks, torch.Generator().manual_seed(self.seed + epoch))
        return [(perm[s : s + self.batch_size][self.rank :: self.world_size], len(perm[s : s + self.batch_size]))
                for s in range(0, self.n, self.batch_size)]


def place_data(trainer, device) -> GlobalBatchSampler:
    """Put ``trainer.data`` where the steps read it (``x_train`` ... None when streamed) and
    return the training sampler."""
    data, cfg, dist = trainer.data, trainer.cfg, trainer.dist
    streamed = getattr(data, "streamed", False)
    if streamed:
        trainer.x_train = trainer.y_train = trainer.x_test = trainer.y_test = None
        n = data.size("train")
        if data.blocks:
            return BlockBatchSampler(data.blocks, cfg["batch_size"], cfg["seed"], dist.rank, dist.world_size)
    else:
        trainer.x_train, trainer.y_train = data.x_train.to(device), data.y_train.to(device)
        trainer.x_test, trainer.y_test = data.x_test.to(device), data.y_test.to(device)
        n = len(trainer.x_train)
    return GlobalBatchSampler(n, cfg["batch_size"], cfg["seed"], dist.rank, dist.world_size)


def batch_fetcher(trainer, batches: list):
    """``fetch(b, idx) -> (x, y)`` on the device for step ``b`` of this epoch's ``batches``."""
    device = trainer.device
    if trainer.x_train is not None:
        x_train, y_train, on_device = trainer.x_train, trainer.y_train, device.type != "cpu"

        def from_memory(b, idx):
            idx = idx.to(device) if on_device else idx
            return x_train[idx], y_train[idx]

        return from_memory
    start = trainer.batch_in_epoch
    sampler = [idx.tolist() for idx, _ in batches[start:]]
    stream = iter(trainer.data.loader("train", 1, batch_sampler=sampler))
    position = [start]

    def from_stream(b, idx):
        if b != position[0]:
            raise RuntimeError(f"streamed batches are read in order: asked for {b}, next is {position[0]}")
        position[0] += 1
        x, y = next(stream)
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    return from_stream


def evaluate_stream(model, data, split: str, device, batch_size: int = 1024, loss_fn=F.cross_entropy):
    """Mean loss and accuracy over a streamed split in eval mode (as ``evaluate`` in memory)."""
    loss_sum, correct, n = 0.0, 0, 0
    with torch.no_grad(), model_state(model, train=False):
        for x, y in data.loader(split, batch_size):
            x, y = x.to(device), y.to(device)
            out = model(x)
            loss_sum += loss_fn(out, y, reduction="sum").item()
            correct += (out.argmax(1) == y).sum().item()
            n += len(y)
    return loss_sum / max(n, 1), correct / max(n, 1)
