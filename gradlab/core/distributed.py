"""Data parallelism on what exists: ``torchrun`` + ``torch.distributed`` (gloo on CPU, nccl on GPU).

Launched as ``torchrun --nproc_per_node=N -m gradlab train ...``, each process reads RANK,
WORLD_SIZE and LOCAL_RANK from the environment; a plain ``gradlab train`` is world size 1.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_from_env(device_type: str) -> DistInfo:
    """Join the process group torchrun set up (no-op for a single process)."""
    import torch.distributed as dist

    world = env_world_size()
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def rank_device(device: torch.device, info: DistInfo) -> torch.device:
    """Each process its own GPU (LOCAL_RANK) under torchrun; the CPU is shared."""
    if info.enabled and device.type == "cuda":
        return torch.device("cuda", info.local_rank)
    return device


def shutdown(info: DistInfo) -> None:
    import torch.distributed as dist

    if info.enabled and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except RuntimeError:  # a peer that died leaves a group that cannot be torn down cleanly
            pass


# What gloo and NCCL say when the process at the other end of a connection is gone.
_PEER_GONE = ("connection reset by peer", "connection closed by peer", "broken pipe", "connection refused",
              "socket closed", "remote process exited", "nccl communicator was aborted")


def rank_failure_message(exc: BaseException, info: DistInfo,
                         kept: str = "the last checkpoint is kept") -> str | None:
    """One line for a collective that failed because another rank exited (killed, crashed,
    out of memory), or None when ``exc`` is something else or the run is not distributed.

    Which rank: with two processes, the other one; with more, the error does not say (gloo
    names an address, not a rank), and neither does this line.
    """
    if not info.enabled or not isinstance(exc, RuntimeError):
        return None
    import torch.distributed as dist

    text = str(exc).lower()
    backend = isinstance(exc, getattr(dist, "DistBackendError", ())) or "gloo" in text or "nccl" in text
    if not backend or not any(p in text for p in _PEER_GONE):
        return None
    who = f"rank {1 - info.rank}" if info.world_size == 2 else "another rank"
    first = str(exc).strip().splitlines()[0]
    # gloo's message starts with its source position in brackets; the part after it says what happened
    detail = first.split("] ", 1)[-1].split(". ")[0].strip()
    return (f"{who} of {info.world_size} exited: its connection closed ({detail}); rank {info.rank} "
            f"stopped, {kept}")


class GlobalBatchSampler:
    """A distributed sampler of *global* batches.

    Each epoch the whole training set is permuted with a generator seeded by ``seed + epoch``
    (the same on every rank), cut into global batches of ``batch_size``, and rank ``r`` takes
    positions ``r, r + W, r + 2W, ...`` of each global batch. The union over ranks of step ``i``
    is exactly the single-process batch ``i``, including the last, partial one; torch's
    DistributedSampler instead pads the epoch with repeated examples and shards before batching,
    which changes the batches whenever the sizes do not divide.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        return (self.n + self.batch_size - 1) // self.batch_size

    def epoch_batches(self, epoch: int) -> list[tuple[torch.Tensor, int]]:
        """``[(local_indices, global_batch_size), ...]`` for ``epoch``."""
        g = torch.Generator().manual_seed(self.seed + epoch)
        perm = torch.randperm(self.n, generator=g)
        out = []
        for start in range(0, self.n, self.batch_size):
            glob = perm[start : start + self.batch_size]
            out.append((glob[self.rank :: self.world_size], len(glob)))
        return out


def all_reduce_sum(values: list[float], info: DistInfo, device) -> list[float]:
    """Sum a few Python floats over ranks (one small collective)."""
    if not info.enabled:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def current() -> DistInfo:
    """The process group this process has joined (world size 1 when none)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return DistInfo()
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def my_share(n: int, info: DistInfo) -> list[int]:
    """Positions ``rank, rank + W, ...`` of ``range(n)``: this rank's share of ``n`` work items
    (batches, grid points), dealt round-robin so every rank gets within one of ``n / W``."""
    return list(range(info.rank, n, info.world_size))


def sum_over_ranks(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """``t`` summed over ranks (in place; returned). With each item filled by exactly one rank
    and zeros elsewhere, the sum is that rank's values, bit for bit (``x + 0 == x``)."""
    if info.enabled:
        import torch.distributed as dist

        dist.all_reduce(t)
    return t


def broadcast_from_main(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Rank 0's ``t`` on every rank (in place; returned)."""
    if info.enabled:
        import torch.distributed as dist

        dist.broadcast(t, 0)
    return t


def gather_objects(obj, info: DistInfo) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (small picklable objects only)."""
    if not info.enabled:
        return [obj]
    import torch.distributed as dist

    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def process_count() -> int:
    """The number of processes in the group this process has joined (1 when none)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def reduce_over_ranks(tensors, mean: bool = False) -> list[torch.Tensor]:
    """Several tensors summed (or, with ``mean``, averaged) over the ranks in ONE all-reduce.

    The tensors are flattened into one buffer, reduced, and returned as views of it shaped like
    the inputs (the inputs are unchanged). On one process the inputs themselves are returned.
    This is how the optimizers that take their gradients with ``torch.autograd.grad`` (which
    bypasses DDP's reducer) average them: SAM, K-FAC, natural gradient, AdaHessian and
    curvature-GD, the Newton-type closure optimizers, and the step-quality callback."""
    tensors = list(tensors)
    world = process_count()
    if world <= 1:
        return tensors
    import torch.distributed as dist

    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    if mean:
        flat.div_(world)
    out, offset = [], 0
    for t in tensors:
        out.append(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()
    return out
