"""Curvature probes over a streamed dataset (``stream=true``): the whole split, batch by batch.

A run trained from a streamed dataset hands its probes a ``DataLoader``
(:meth:`gradlab.data.stream.StreamingData.loader`) instead of a list of batches: the first
``batches x batch_size`` examples of the split (``batches=0``: all of it), under ``torchrun``
this rank's share. The Hessian probe then builds a
:class:`~gradlab.curvature.streamed.StreamedOperator` (one pass over the data per product, one
group of batches in memory) and runs its usual solvers on it. The top eigenvalues use Lanczos,
one product per pass, not the block Krylov solver
(:func:`~gradlab.curvature.block_krylov.block_eigsh`): a block needs fewer passes, but each of
its columns costs a double backward, and on a CIFAR-sized CNN that made it slower overall
(``benchmarks/RESULTS.md``, issue 18, streamed data).
"""

from __future__ import annotations

from gradlab.core.errors import GradlabError

def is_stream(data) -> bool:
    """Whether a probe's batches are a data stream rather than a list of ``(x, y)`` tensors."""
    return not isinstance(data, (list, tuple))


def stream_batches(source, options):
    from gradlab.core.distributed import current

    data = source.data
    for key in ("per_layer", "verify", "exact"):
        if options.get(key):
            raise GradlabError(f"--{key.replace('_', '-')} needs the batches in memory; {data.name} is streamed "
                               f"(stream=true): probe the whole split without it")
    if options.get("params") is not None:
        raise GradlabError(f"--params needs the batches in memory; {data.name} is streamed (stream=true)")
    if data.size(source.split_name) == 0:
        raise GradlabError(f"the {source.split_name} split of {data.name} is empty")
    bs = options["batch_size"]
    limit = options["batches"] * bs if options.get("batches") else None
    return data.loader(source.split_name, bs, dist=current(), limit=limit)


def streamed_operator(model, loss_fn, stream, *, matrix, mode, seed, backend, dist, trace_method):
    from gradlab.core.distributed import DistInfo
    from gradlab.curvature.streamed import StreamedOperator

    if trace_method == "gauss-newton":
        raise GradlabError("trace method 'gauss-newton' needs the batches in memory; with a streamed dataset choose "
                           "auto, xtrace, krylov, hutch++ or hutchinson")
    return StreamedOperator(model, loss_fn, stream, matrix=matrix, mode=mode, seed=seed, backend=backend,
                            dist=dist or DistInfo())

