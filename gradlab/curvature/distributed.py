"""Curvature operators over data split across ``torchrun`` processes.

Every curvature matrix here is a mean over examples, ``A = sum_r (n_r / N) A_r`` where ``A_r`` is
the same matrix over the ``n_r`` examples of rank ``r``. :class:`DistributedOperator` wraps the
rank's own operator (a :class:`~gradlab.curvature.HessianOperator`, a GGN, a Fisher...) and makes
each product ``A V`` one local product plus ONE collective, so every solver (``eigsh``, the
trace estimators, SLQ density) runs unchanged and identically on every rank: the products agree
on all ranks bit for bit (every rank receives the same sums), so a solver seeded alike on every
rank builds the same vectors on every rank and needs no broadcast of its inputs.

The collective: a small product (all ranks' copies within :data:`GATHER_MAX_BYTES`) is
all-gathered and every rank adds the parts in rank order, one exchange where gloo's ring
all-reduce takes two rounds (each a wait on the other process: the latency is what a Lanczos
step pays per product, see ``benchmarks/RESULTS.md``); a larger one is all-reduced.

That agreement is checked at every product, at the price of a few numbers in the same
collective: each rank appends a fingerprint of its input block (two weighted integer sums over
its bits), 16 bytes written as 16 small integers (exact in every float dtype; in the
all-reduce, in a slot of its own, zeros in the others' slots). Every rank then sees every rank's
fingerprint and takes the same branch: when one differs from rank 0's (an unseeded generator,
a rank with other thread counts), the product is done again from rank 0's block (broadcast) and
the operator broadcasts every later input first, as it always did before the check: the
products are then those of rank 0's vectors whatever each rank's generator says
(``input_mismatches`` counts the products that disagreed).

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

#: A product whose copies from all ranks total at most this many bytes is summed from one
#: all-gather instead of an all-reduce (:meth:`DistributedOperator._exchange`).
GATHER_MAX_BYTES = 2**22


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
    the same order (each product is a collective); ``input_mismatches`` and ``broadcast_inputs``:
    see the module docstring.
    """

    def __init__(self, local: CurvatureOperator, info: DistInfo):
        super().__init__(local.n, local.dtype, local.device)
        self.local, self.info = local, info
        counts = sum_over_ranks(torch.tensor([float(local.num_samples)], dtype=torch.float64, device=local.device),
                                info)
        self.num_samples = int(counts.item())
        self.share = local.num_samples / self.num_samples  # this rank's weight in the mean
        self.input_mismatches = 0  # products whose input blocks differed between ranks (redone)
        self.broadcast_inputs = False  # True once they have: rank 0's block is broadcast first
        self._weights = None  # the fingerprint's position weights, kept for the block's size
        for name in ("model", "mode", "backend", "params", "param_names"):
            if hasattr(local, name):
                setattr(self, name, getattr(local, name))

    def _local(self, V: Tensor) -> Tensor:
        self.local.num_matvecs += V.shape[1]
        return self.local._matmat(V) * self.share

    def _fingerprint(self, V: Tensor) -> Tensor:
        """16 small integers (0..255, in V's dtype) that differ between two blocks whose bits
        differ: two sums of V's bits read as 16-bit integers, each weighted by fixed
        pseudo-random integers below 2^15 (the same on every rank). No product or sum overflows,
        so a change in one element always changes both; changes in several cancel only by
        chance (about 1 in 2^15 per sum, independently)."""
        bits = V.reshape(-1).view(torch.int16).to(torch.int32)
        w = self._weights
        if w is None or w.shape[1] != bits.numel():
            g = torch.Generator().manual_seed(0x5EED)
            w = self._weights = torch.randint(1, 2**15, (2, bits.numel()), generator=g, dtype=torch.int32).to(V.device)
        h = (bits * w).sum(1, dtype=torch.int64)
        return h.view(torch.uint8).to(V.dtype)

    def _exchange(self, out: Tensor, fingerprint: Tensor) -> tuple[Tensor, Tensor]:
        """The sum over ranks of ``out`` (the same bits on every rank) and every rank's
        fingerprint (W, 16), from one collective: an all-gather of ``[out, fingerprint]`` whose
        rows every rank adds in rank order when the W rows total at most :data:`GATHER_MAX_BYTES`
        (one exchange instead of a ring's two rounds: the latency-bound case), else an all-reduce
        with each fingerprint in its rank's slot."""
        import torch.distributed as dist

        W, size = self.info.world_size, out.numel()
        if W * (size + 16) * out.element_size() <= GATHER_MAX_BYTES:
            row = torch.cat([out.reshape(-1), fingerprint])
            rows = torch.empty(W, size + 16, dtype=out.dtype, device=out.device)
            dist.all_gather(list(rows.unbind(0)), row)
            total = rows[0, :size].clone()
            for r in range(1, W):  # elementwise, in rank order: the same bits on every rank
                total += rows[r, :size]
            return total.view_as(out), rows[:, size:]
        buf = torch.zeros(size + 16 * W, dtype=out.dtype, device=out.device)
        buf[:size] = out.reshape(-1)
        buf[size + 16 * self.info.rank : size + 16 * (self.info.rank + 1)] = fingerprint
        sum_over_ranks(buf, self.info)
        return buf[:size].view_as(out), buf[size:].view(W, 16)

    def _matmat(self, V: Tensor) -> Tensor:
        V = V.contiguous()
        if self.broadcast_inputs:  # after a disagreement: rank 0's block first, then the product
            return sum_over_ranks(self._local(broadcast_from_main(V, self.info)).contiguous(), self.info)
        total, prints = self._exchange(self._local(V), self._fingerprint(V))
        if bool((prints == prints[0]).all()):
            return total
        self.input_mismatches += 1  # every rank sees the same fingerprints: all of them land here
        self.broadcast_inputs = True
        self.local.num_matvecs -= V.shape[1]  # the product is redone, not a new one
        return self._matmat(V)

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
