"""Helper process for tests/test_dist_mc_curvature.py: ``python dist_mc_curvature.py OUT_DIR`` under
torchrun. Monte Carlo curvature (K-FAC's ``mc`` factors, natural-gd's sampled Fisher) on the model
and batch of tests/dist_second_order.py: each rank takes the strided share (positions rank,
rank + W, ...) of a global batch of 16, then 15 examples (unequal shares), alternately, and saves
its parameters and what :func:`gradlab.optim.model_bound.global_rows` gathers as
``OUT_DIR/rank{R}.pt``; :func:`train` on one process with the whole batches is the reference."""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from dist_second_order import D64, problem
from gradlab.optim import build_optimizer

#: case -> (optimizer, options, steps). Every step draws labels (factor_every=1).
CASES = {
    "kfac-mc": ("kfac", dict(lr=0.1, factor_every=1, inverse_every=1, fisher_type="mc", kl_clip=0.01), 4),
    "natural-gd-fisher": ("natural-gd", dict(damping=0.5, cg_iters=5, curvature="fisher", mc_samples=2), 3),
}


def train(case: str, rank: int = 0, world: int = 1) -> list[torch.Tensor]:
    model, x, y = problem()
    name, options, steps = CASES[case]
    opt = build_optimizer(name, model.parameters(), seed=3, **options)
    opt.bind(model, F.cross_entropy)
    for k in range(steps):
        n = 16 - k % 2  # 16, 15, 16, ...: the odd global batch gives the ranks 8 and 7 examples
        xb, yb = x[:n][rank::world], y[:n][rank::world]
        opt.zero_grad()
        # the training loop's loss: this rank's share of the global mean (sum * W / n), whose
        # average over ranks is the global batch's mean for unequal shares too
        opt.step(lambda: F.cross_entropy(model(xb), yb, reduction="sum") * (world / n))
    return [p.detach().clone() for p in model.parameters()]


if __name__ == "__main__":
    import torch.distributed as dist

    from gradlab.optim.model_bound import global_rows

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        out = {case: train(case, rank, world) for case in CASES}
        rows = torch.arange(10, dtype=D64).reshape(5, 2)
        strided, mine = global_rows(rows[rank::world] if world > 1 else rows)
        out["strided"] = (strided, strided[mine])
        block = rows[:1] if rank == 0 else rows[1:]  # sizes 1, 4: not strided shares, concatenated
        whole, mine = global_rows(block)
        out["block"] = (whole, whole[mine])
        torch.save(out, f"{sys.argv[1]}/rank{rank}.pt")
        dist.barrier()  # neither rank tears gloo down while the other is still in a collective
    finally:
        dist.destroy_process_group()
