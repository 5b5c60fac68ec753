"""A curvature matrix over a whole dataset, accumulated batch by batch with bounded memory.

:class:`StreamedOperator` is the mean over every example of a data stream (a ``DataLoader``, or
any re-iterable of ``(x, y)`` batches) of a curvature matrix named as for
:func:`~gradlab.curvature.curvature_matrix`. Each product ``A V`` is one pass over the stream:
for every batch ``b`` the batch's own operator computes ``A_b V`` (for the Hessian: one forward,
one gradient with its graph, one double backward per column of ``V``) and

    A V = sum_b n_b A_b V / sum_b n_b,

after which the batch and its graph are freed. In eval mode consecutive batches are first
gathered while their inputs hold at most ``merge_numel`` elements (default
:data:`~gradlab.curvature.hessian_op.MERGE_NUMEL`, 4 MiB of float32) and multiplied as one (the
same mean; fewer, larger calls), as the in-memory Hessian does. Memory is therefore that group's
graph plus the loader's prefetched batches, whatever the dataset's size; the price is that every
product reads the data again (an in-memory operator keeps up to ``MAX_KEPT_GRAPHS`` graphs instead). Every
solver (``eigsh``, the trace estimators, SLQ density, :func:`~gradlab.curvature.block_krylov.block_eigsh`)
takes it unchanged; the cost of a full-dataset eigenvalue is then the solver's number of passes
(measured against PyHessian's dataloader mode in ``benchmarks/bench_data.py``).

Under ``torchrun`` each rank streams its own share of the batches (``dist``); a product is the
local weighted sum plus one all-reduce, the input block broadcast from rank 0 first (as
:class:`~gradlab.curvature.distributed.DistributedOperator`).

Exactness: for ``hessian``, ``ggn`` and ``empirical-fisher`` the result equals the in-memory
operator over the same batches (a weighted mean of per-batch matrices; train mode seeds batch
``i``'s dropout masks with ``seed + i`` as the in-memory operator does). The true Fisher draws
its labels per batch from ``seed + i``, so its Monte Carlo samples differ from the in-memory
draw; K-FAC is not a mean of per-batch matrices and is refused.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

from gradlab.core.distributed import DistInfo, broadcast_from_main, sum_over_ranks
from gradlab.core.errors import GradlabError
from gradlab.curvature.hessian_op import MERGE_NUMEL, default_backend
from gradlab.curvature.matrices import MATRICES, curvature_matrix
from gradlab.curvature.model_op import MODES
from gradlab.curvature.operator import CurvatureOperator
from gradlab.curvature.params import ParamSpec, select_params

STREAMABLE = tuple(m for m in MATRICES if m != "kfac")


class StreamedOperator(CurvatureOperator):
    """The mean curvature matrix of ``loss_fn(model(x), y)`` over every example of ``batches``.

    Args:
        model, loss_fn, mode, params, seed, mc_samples, backend: as for
            :func:`~gradlab.curvature.curvature_matrix`.
        batches: a re-iterable of ``(x, y)`` batches (iterated once per product), e.g.
            :meth:`gradlab.data.stream.StreamingData.loader`; under ``torchrun``, this rank's share.
        matrix: one of :data:`STREAMABLE`.
        dist: the process group the batches are split over (:class:`DistInfo`: none).
        merge_numel: in eval mode, consecutive batches are multiplied together while their inputs
            hold at most this many elements (0: one batch at a time).

    ``num_samples`` is known after the first pass (:meth:`count` makes one without products).
    """

    def __init__(self, model: nn.Module, loss_fn: Optional[Callable[[Tensor, Tensor], Tensor]], batches, *,
                 matrix: str = "hessian", mode: str = "eval", params: ParamSpec = None, seed: int = 0,
                 mc_samples: int = 1, backend: Optional[str] = None, dist: DistInfo = DistInfo(),
                 merge_numel: int = MERGE_NUMEL):
        if matrix not in STREAMABLE:
            raise GradlabError(f"matrix {matrix!r} cannot be accumulated over a data stream; choose from: "
                               f"{', '.join(STREAMABLE)}")
        if mode not in MODES:
            raise GradlabError(f"unknown mode {mode!r}; choose from: {', '.join(MODES)}")
        chosen, names = select_params(model, params)
        super().__init__(sum(p.numel() for p in chosen), chosen[0].dtype, chosen[0].device)
        self.model, self.loss_fn, self.stream, self.matrix = model, loss_fn, batches, matrix
        self.params, self.param_names, self.mode, self.seed = chosen, names, mode, seed
        self.mc_samples, self.info = mc_samples, dist
        self.backend = default_backend(self.device) if backend is None else backend
        self.merge_numel = merge_numel if mode == "eval" else 0
        self.num_samples: Optional[int] = None
        self.passes = 0  # passes over the data so far (one per product block, one per gradient)

    def _groups(self):
        """``(global index of the first batch, [batches])``: consecutive batches within ``merge_numel``."""
        group, size, first = [], 0, 0
        for i, (x, y) in enumerate(self.stream):
            if group and size + x.numel() > self.merge_numel:
                yield first, group
                group, size = [], 0
            if not group:
                first = self.info.rank + i * self.info.world_size
            group.append((x, y))
            size += x.numel()
        if group:
            yield first, group

    def _batch_ops(self):
        """``(examples, operator)`` of each group of this rank's batches, one group at a time."""
        count = 0
        for first, group in self._groups():
            n_g = sum(len(y) for _, y in group)
            count += n_g
            op = curvature_matrix(self.matrix, self.model, self.loss_fn, group, mode=self.mode, params=self.params,
                                  seed=self.seed + first, mc_samples=self.mc_samples, backend=self.backend)
            del group
            yield n_g, op
        self.passes += 1
        self._set_count(count)

    def _set_count(self, local: int) -> None:
        t = sum_over_ranks(torch.tensor([float(local)], dtype=torch.float64, device=self.device), self.info)
        total = int(t.item())
        if total == 0:
            raise GradlabError("no data batches given for the curvature matrix (the data stream is empty)")
        self.num_samples = total

    def count(self) -> int:
        """The number of examples over all ranks (one pass over the labels if not yet known)."""
        if self.num_samples is None:
            self._set_count(sum(len(y) for _, y in self.stream))
        return self.num_samples

    def _matmat(self, V: Tensor) -> Tensor:
        V = broadcast_from_main(V.contiguous(), self.info)
        out = torch.zeros_like(V)
        for n_b, op in self._batch_ops():
            out.add_(op._matmat(V), alpha=float(n_b))
            del op  # frees the batch and its graph before the next one is read
        return sum_over_ranks(out, self.info) / self.num_samples

    def loss_and_gradient(self) -> tuple[float, Tensor]:
        """Mean loss over every example and its flat float64 gradient (one pass)."""
        both = torch.zeros(self.n + 1, dtype=torch.float64, device=self.device)
        for n_b, op in self._batch_ops():
            loss, g = op.loss_and_gradient()
            both[0] += n_b * loss
            both[1:].add_(g, alpha=float(n_b))
            del op
        sum_over_ranks(both, self.info)
        return float(both[0]) / self.num_samples, both[1:] / self.num_samples

    def clear(self) -> None:
        """Nothing is kept between products (the operator's memory is one batch)."""


__all__ = ["STREAMABLE", "StreamedOperator"]
