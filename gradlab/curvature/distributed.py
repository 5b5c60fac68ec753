"""Curvature operators over data split across ``torchrun`` processes.

Every curvature matrix here is a mean over examples, ``A = sum_r (n_r / N) A_r`` where ``A_r`` is
the same matrix over the ``n_r`` examples of rank ``r``. :class:`DistributedOperator` wraps the
rank's own operator (a :class:`~gradlab.curvature.HessianOperator`, a GGN, a Fisher...) and makes
each product ``A V`` one local product plus one all-reduce, so every solver (``eigsh``, the
trace estimators, SLQ density) runs unchanged and identically on every rank: the products agree
on all ranks, and the input block is broadcast from rank 0 first, so a solver's random probe
vectors are rank 0's whatever each rank's generator says.

:func:`shard_batches` deals a list of batches to the ranks: whole batches round-robin when there
are at least as many batches as ranks (train-mode BatchNorm then sees the single-process
batches), otherwise every batch's examples round-robin.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gradlab.core.distributed import DistInfo, broadcast_from_main, my_share, sum_over_ranks
from gradlab.core.errors import GradlabError
from gradlab.curvature.model_op import split_batches
from gradlab.curvature.operator import CurvatureOperator


def shard_batches(data, info: DistInfo) -> list:
    """This rank's share of ``data`` (one ``(x, y)`` batch or a list of them)."""
    batches = split_batches(data)
    if not info.enabled:
        return batches
    if len(batches) >= info.world_size:
        return [batches[i] for i in my_share(len(batches), info)]
    mine = [(x[info.rank :: info.world_size], y[info.rank :: info.world_size]) for x, y in batches]
    mine = [b for b in mine if len(b[1])]
    if not mine:
        raise GradlabError(f"too little data for {info.world_size} processes: rank {info.rank} has no example")
    return mine


class DistributedOperator(CurvatureOperator):
    """The mean over every rank's data of the curvature matrix ``local`` holds for this rank's.

    ``num_samples`` is the total over ranks; ``local`` stays reachable for what needs the model
    and the data (the Gauss-Newton trace, :func:`combine`). Every rank must make the same calls in
    the same order (each product is a collective).
    """

    def __init__(self, local: CurvatureOperator, info: DistInfo):
        super().__init__(local.n, local.dtype, local.device)
        self.local, self.info = local, info
        counts = sum_over_ranks(torch.tensor([float(local.num_samples)], dtype=torch.float64, device=local.device),
                                info)
        self.num_samples = int(counts.item())
        self.share = local.num_samples / self.num_samples  # this rank's weight in the mean
        for name in ("model", "mode", "backend", "params", "param_names"):
            if hasattr(local, name):
                setattr(self, name, getattr(local, name))

    def _matmat(self, V: Tensor) -> Tensor:
        V = broadcast_from_main(V.contiguous(), self.info)
        out = self.local._matmat(V) * self.share
        self.local.num_matvecs += V.shape[1]
        return sum_over_ranks(out.contiguous(), self.info)

    def loss_and_gradient(self) -> tuple[float, Tensor]:
        """Mean loss over every rank's examples and its flat float64 gradient."""
        loss, g = self.local.loss_and_gradient()
        both = torch.cat([torch.tensor([loss], dtype=torch.float64, device=g.device), g.to(torch.float64)]) * self.share
        sum_over_ranks(both, self.info)
        return float(both[0]), both[1:]

    def combine(self, result):
        """A :class:`~gradlab.curvature.TraceResult` of this rank's data -> the one of all data
        (estimates weighted by the ranks' shares, standard errors added in quadrature)."""
        from gradlab.curvature.trace import TraceResult

        t = torch.tensor([self.share * result.estimate, (self.share * result.stderr) ** 2, float(result.num_matvecs)],
                         dtype=torch.float64, device=self.device)
        sum_over_ranks(t, self.info)
        return TraceResult(float(t[0]), math.sqrt(float(t[1])), int(t[2]), result.method)

    def clear(self) -> None:
        if hasattr(self.local, "clear"):
            self.local.clear()


__all__ = ["DistributedOperator", "shard_batches"]
