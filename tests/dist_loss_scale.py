"""Helper process for tests/test_dist_loss_scale.py: ``python dist_loss_scale.py OUT_DIR`` under
torchrun (2 gloo processes, CPU fp16 autocast). Each rank takes loss-scaled gradients of a tiny
float16 layer through :func:`gradlab.optim.loss_scaling.gradients`, three times:

* ``"none"``: no rank overflows;
* ``"last"``: the LAST rank's loss overflows float16 even at scale 1 (its output gradient is
  1e5 > 65504), the others' does not;
* ``"first"``: rank 0's overflows, the others' does not.

It saves ``OUT_DIR/rank{R}.pt`` with, for each case, whether this rank raised
:class:`GradientOverflow` and the unscaled gradient when it did not, plus the result of one
all-reduce after the three cases (a rank left behind in the flag's all-reduce would hang or
disagree there)."""

from __future__ import annotations

import sys

import torch
from torch import nn

from gradlab.core.distributed import reduce_over_ranks
from gradlab.optim.loss_scaling import GradientOverflow, LossScaler, gradients


def case(rank: int, world: int, overflowing_rank) -> dict:
    torch.manual_seed(0)
    layer = nn.Linear(3, 2)
    x = torch.ones(4, 3)
    c = 1e5 if rank == overflowing_rank else 1.0
    with torch.autocast("cpu", dtype=torch.float16):
        y = layer(x)
    loss = y.float().sum() * c
    try:
        g = gradients(LossScaler(), loss, list(layer.parameters()))
        return {"raised": False, "grad": [t.detach() for t in g]}
    except GradientOverflow:
        return {"raised": True}


if __name__ == "__main__":
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        out = {name: case(rank, world, who) for name, who in (("none", None), ("last", world - 1), ("first", 0))}
        out["after"] = reduce_over_ranks([torch.tensor([float(rank + 1)])])[0]
        torch.save(out, f"{sys.argv[1]}/rank{rank}.pt")
        dist.barrier()  # no rank tears gloo down while another is still in a collective
    finally:
        dist.destroy_process_group()
