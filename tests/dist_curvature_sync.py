"""Helper process for tests/test_dist_curvature_sync.py: ``python dist_curvature_sync.py OUT_DIR``
under torchrun (2 or more ranks). On the float64 conv model and 16 images of
tests/dist_second_order.py, each rank holds its strided share of 4 batches of 4 in a
:class:`DistributedOperator` and saves ``OUT_DIR/rank{R}.pt`` with: the seeded top-3 eigenpairs
(the ranks build their vectors alike), a product whose input differs between the ranks (rank 0's
must be used), an unseeded Hutchinson trace whose global RNG is seeded with the rank (rank 0's
probes must be used), a product on a fresh operator whose input differs on the last rank only,
and the operator's mismatch counters after each, all of it twice: ``"gather"`` with the products
summed from an all-gather (the default for small products) and ``"allreduce"`` with
``GATHER_MAX_BYTES = 0`` (what larger products use). :func:`reference` is the same on one process."""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from dist_second_order import D64, problem
from gradlab.curvature import HessianOperator, eigsh
from gradlab.curvature.trace import hutchinson_trace


def batches():
    _, x, y = problem()
    return [(x[i : i + 4], y[i : i + 4]) for i in range(0, 16, 4)]


def operator(info=None):
    from gradlab.curvature.distributed import DistributedOperator, shard_batches

    model, _, _ = problem()
    op = HessianOperator(model, F.cross_entropy, batches() if info is None else shard_batches(batches(), info))
    return op if info is None else DistributedOperator(op, info)


def run(info=None) -> dict:
    op = operator(info)
    rank = 0 if info is None else info.rank
    last = info is not None and rank == info.world_size - 1
    out = {}
    top = eigsh(op, 3, "LA", tol=1e-8, seed=0, return_vectors=True)
    out["values"], out["vectors"], out["products"] = top.values, top.vectors, top.num_matvecs
    out["mismatches_after_eigsh"] = getattr(op, "input_mismatches", 0)
    v = torch.randn(op.n, 2, dtype=D64, generator=torch.Generator().manual_seed(10 + rank))  # rank's own
    out["product"] = op.matmat(v)
    out["mismatches_after_product"] = getattr(op, "input_mismatches", 0)
    torch.manual_seed(100 + rank)  # the unseeded trace draws from the global RNG: rank 0's must win
    out["trace"] = torch.tensor(hutchinson_trace(op, 6, seed=None).estimate)
    out["mismatches_after_trace"] = getattr(op, "input_mismatches", 0)
    out["broadcast_inputs"] = bool(getattr(op, "broadcast_inputs", False))
    # a fresh operator whose input differs on the LAST rank only (the others agree with rank 0)
    op = operator(info)
    v = torch.randn(op.n, 2, dtype=D64, generator=torch.Generator().manual_seed(20 + int(last)))
    out["product_last_differs"] = op.matmat(v)
    out["mismatches_last_differs"] = getattr(op, "input_mismatches", 0)
    return out


def reference() -> dict:
    """One process, all the data: rank 0's inputs everywhere."""
    return run(None)


if __name__ == "__main__":
    import torch.distributed as dist

    from gradlab.core.distributed import current

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        import gradlab.curvature.distributed as gdist

        out = {}
        for path, limit in (("gather", gdist.GATHER_MAX_BYTES), ("allreduce", 0)):
            gdist.GATHER_MAX_BYTES = limit
            out[path] = run(current())
        torch.save(out, f"{sys.argv[1]}/rank{dist.get_rank()}.pt")
        dist.barrier()  # no rank tears gloo down while another is still in a collective
    finally:
        dist.destroy_process_group()
