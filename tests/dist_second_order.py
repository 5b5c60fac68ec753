"""Helper process for tests/test_dist_second_order.py: ``python dist_second_order.py OUT_DIR`` under
torchrun. Each rank takes its share (positions rank, rank + W, ...) of one float64 batch, steps
K-FAC, natural-gd, SAM, Newton (dense and CG) and saddle-free Newton a few times, and saves the
parameters, the damping after each step (natural-gd and the Newton cases adapt it by the
Levenberg-Marquardt rule of gradlab.optim.damping) and a check of ``reduce_over_ranks`` as
``OUT_DIR/rank{R}.pt``; :func:`train` on one process with the whole batch is the reference."""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

from gradlab.optim import build_optimizer

D64 = torch.float64
#: case -> (optimizer, options, steps): type-2 K-FAC and the GGN are deterministic (the Monte Carlo
#: variants are checked in tests/test_dist_mc_curvature.py). The adaptive Newton cases are chosen
#: so the rule acts on this problem, in all three branches: the dense Newton step is accepted, then rejected (undone) with
#: the damping raised four times; Newton-CG lowers, keeps and raises it; saddle-free Newton lowers it.
CASES = {
    "kfac": ("kfac", dict(lr=0.1, factor_every=2, inverse_every=2, fisher_type="type-2", kl_clip=0.01), 4),
    "natural-gd": ("natural-gd", dict(damping=0.5, cg_iters=5), 3),
    # rejects three steps (damping raised), keeps one, then lowers it; each half alone would not
    "natural-gd-lm": ("natural-gd", dict(damping=1e-2, cg_iters=10), 5),
    "sam": ("sam", dict(lr=0.1, rho=0.1), 2),
    "newton": ("newton", dict(damping_rule="adaptive", damping=1e-3), 5),
    "newton-cg": ("newton", dict(damping_rule="adaptive", damping=1e-3, exact_max_params=0, cg_max_iter=10), 5),
    "saddle-free-newton": ("saddle-free-newton", dict(damping_rule="adaptive", damping=0.1, krylov_dim=8), 4),
}


def problem():
    """A conv + linear model (both K-FAC layer kinds) and a batch of 16 images (1, 4, 4), float64."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(32, 3)).to(D64)
    g = torch.Generator().manual_seed(1)
    return model, torch.randn(16, 1, 4, 4, generator=g, dtype=D64), torch.randint(0, 3, (16,), generator=g)


def train(case: str, rank: int = 0, world: int = 1) -> dict:
    """``{"params": [...], "damping": [...], "trial": [...]}``: the parameters after the case's
    steps, ``param_groups[0]["damping"]`` after each step and the adaptive rule's trial-point loss
    (``opt.last["loss_after"]``, the loss of the whole batch, which decides rho and the undo) after
    each step (``None`` for an optimizer without them)."""
    model, x, y = problem()
    xb, yb = x[rank::world], y[rank::world]
    name, options, steps = CASES[case]
    opt = build_optimizer(name, model.parameters(), seed=3, **options)
    if getattr(opt, "needs_model", False):
        opt.bind(model, F.cross_entropy)
    damping, trial = [], []
    for _ in range(steps):
        opt.zero_grad()
        opt.step(lambda: F.cross_entropy(model(xb), yb))
        damping.append(opt.param_groups[0].get("damping"))
        trial.append(getattr(opt, "last", {}).get("loss_after"))
    return {"params": [p.detach().clone() for p in model.parameters()], "damping": damping, "trial": trial}


if __name__ == "__main__":
    import torch.distributed as dist

    from gradlab.core.distributed import reduce_over_ranks

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        out = {name: train(name, rank, world) for name in CASES}
        mine = [torch.full((2, 3), float(rank + 1), dtype=D64), torch.arange(4, dtype=D64) * (rank + 1)]
        out["reduce-sum"] = reduce_over_ranks(mine)
        out["reduce-mean"] = reduce_over_ranks(mine, mean=True)
        out["inputs-after"] = mine
        torch.save(out, f"{sys.argv[1]}/rank{rank}.pt")
        dist.barrier()  # no rank tears gloo down while another is still in a collective
    finally:
        dist.destroy_process_group()
