"""The Hessian of a model's mean loss as a :class:`CurvatureOperator`, and its dense reference.

Two backends compute the Hessian-vector product (HVP) ``H v``:

* ``"double-backward"`` (Pearlmutter 1994): build ``g = grad(L, params, create_graph=True)``
  once per batch and reuse its graph for every product: ``H v = grad(g . v, params)``.
* ``"func"``: ``torch.func`` forward-over-reverse, ``jvp(grad(L), (params,), (v,))``
  (functional_call keeps the module untouched); ``matmat`` vmaps over the columns.

On CPU the double backward with its graph kept is the cheapest of these in every run of
``benchmarks/bench_curvature.py`` (costs per product in ``benchmarks/RESULTS.md``), so it is the
default there. No GPU was available to measure the CUDA default; it is also ``double-backward``
there until measured (``backend="func"`` vmaps products).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradlab.curvature.hvp import hvp_from_grads
from gradlab.core.errors import GradlabError
from gradlab.curvature.model_op import MAX_KEPT_GRAPHS, MODES, ModelOperator, split_batches  # noqa: F401 (re-exported)
from gradlab.curvature.params import ParamSpec, select_params

BACKENDS = ("double-backward", "func")

#: In eval mode consecutive batches are merged into one while their inputs hold at most this
#: many elements (4 MiB of float32): the mean loss is the same (examples do not interact without
#: batch statistics), a product makes fewer and larger calls, and up to MAX_KEPT_GRAPHS merged
#: batches keep their graphs. A cap on the merged inputs keeps the kept graphs' memory bounded.
MERGE_NUMEL = 2**20


def merge_batches(batches: list, max_numel: int = MERGE_NUMEL) -> tuple[list, list]:
    """Consecutive ``(x, y)`` batches concatenated while ``x`` stays within ``max_numel`` elements;
    also how many batches each merged one holds."""
    out, cur, size = [], [], 0
    for x, y in batches:
        if cur and (size + x.numel() > max_numel or x.shape[1:] != cur[0][0].shape[1:]
                    or y.shape[1:] != cur[0][1].shape[1:]):
            out.append(cur)
            cur, size = [], 0
        cur.append((x, y))
        size += x.numel()
    out.append(cur)
    return ([grp[0] if len(grp) == 1 else (torch.cat([x for x, _ in grp]), torch.cat([y for _, y in grp]))
             for grp in out], [len(grp) for grp in out])


def default_backend(device) -> str:
    """The faster HVP backend for ``device`` (see the module docstring for the measurements)."""
    return "double-backward"


class HessianOperator(ModelOperator):
    """``H = d^2 L / d theta^2`` of the mean loss, as products with flat vectors of size ``n``.

    Args:
        model: the network; left unchanged (mode flags restored after every product).
        loss_fn: ``loss_fn(logits, y) -> scalar`` mean over the batch (default cross-entropy).
        data: one batch ``(x, y)`` or a list/iterable of batches. With several batches the loss is
            their average weighted by batch size, i.e. the mean over all their samples.
        backend: ``"double-backward"`` or ``"func"`` (module docstring); None = :func:`default_backend`.
        mode: ``"eval"`` (default: dropout off, BatchNorm running statistics) or ``"train"``
            (dropout with masks fixed per batch by a seed, BatchNorm batch statistics).
        params: the parameters to differentiate: None (all with ``requires_grad``), a list of
            tensors, or name patterns (:func:`~gradlab.curvature.params.select_params`); the flat
            vector is their concatenation in that order.
        keep_graphs: double-backward only. True keeps each batch's gradient graph for the whole
            life of the operator (the cheapest products); False rebuilds it per product (about
            one gradient more each, memory of one batch). Default: keep when there are at most
            :data:`MAX_KEPT_GRAPHS` batches.
        seed: seeds the dropout masks in train mode so every product sees the same function.
        merge: in eval mode, merge consecutive batches up to :data:`MERGE_NUMEL` input elements
            (:func:`merge_batches`; the same mean loss, fewer and larger calls per product);
            ``merged_counts`` says how many given batches each of ``batches`` holds.

    ``H`` is symmetric of size ``n = sum(p.numel())``; products are computed in the parameters'
    dtype. Nothing is ever written to ``p.grad`` (``torch.autograd.grad`` only).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
        data=None,
        *,
        backend: Optional[str] = None,
        mode: str = "eval",
        params: ParamSpec = None,
        keep_graphs: Optional[bool] = None,
        seed: int = 0,
        merge: bool = True,
    ):
        if backend is not None and backend not in BACKENDS:
            raise GradlabError(f"unknown HVP backend {backend!r}; choose from: {', '.join(BACKENDS)}")
        counts = None
        if merge and mode == "eval" and data is not None:
            data, counts = merge_batches(split_batches(data))
        super().__init__(model, loss_fn, data, mode=mode, params=params, seed=seed)
        self.merged_counts = counts or [1] * len(self.batches)  # given batches in each of self.batches
        self.backend = default_backend(self.device) if backend is None else backend
        self.keep_graphs = len(self.batches) <= MAX_KEPT_GRAPHS if keep_graphs is None else keep_graphs
        self._graphs: dict[int, tuple[Tensor, list[Tensor]]] = {}
        if self.backend == "func":
            self._names = self.registered_names("backend 'func'")

    # ------------------------------------------------------------------ helpers
    def _grad_graph(self, i: int) -> tuple[Tensor, list[Tensor]]:
        """``(loss, grads)`` of batch ``i`` with ``create_graph=True`` (cached when keeping graphs)."""
        if i in self._graphs:
            return self._graphs[i]
        x, y = self.batches[i]
        with self._batch_context(i):
            loss = self.loss_fn(self.model(x), y)
        grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, self.params)]
        if self.keep_graphs:
            self._graphs[i] = (loss, grads)
        return loss, grads

    def clear(self) -> None:
        """Free the kept gradient graphs (they are rebuilt on the next product)."""
        self._graphs.clear()

    # ------------------------------------------------------------------ products
    def _matmat(self, V: Tensor) -> Tensor:
        product = self._matmat_double_backward if self.backend == "double-backward" else self._matmat_func
        if len(self.weights) == 1:  # one batch (weight 1): no accumulator, one pass less per product
            return product(0, V)
        out = torch.zeros_like(V)
        for i, w in enumerate(self.weights):
            out.add_(product(i, V), alpha=w)
        return out

    def _matmat_double_backward(self, i: int, V: Tensor) -> Tensor:
        cols = []
        k = V.shape[1]
        _, grads = self._grad_graph(i)
        for j in range(k):
            last = j == k - 1 and not self.keep_graphs
            hv = hvp_from_grads(grads, self.params, self.unflatten(V[:, j]), retain_graph=not last)
            cols.append(self.flatten(hv).detach())
        return cols[0].unsqueeze(1) if k == 1 else torch.stack(cols, dim=1)

    def _matmat_func(self, i: int, V: Tensor) -> Tensor:
        from torch.func import functional_call, grad, jvp, vmap

        x, y = self.batches[i]
        primals = {n: p.detach() for n, p in zip(self._names, self.params)}

        def loss_of(pd):
            return self.loss_fn(functional_call(self.model, pd, (x,)), y)

        def hvp_one(v_flat):
            tangents = dict(zip(self._names, self.unflatten(v_flat)))
            return self.flatten(list(jvp(grad(loss_of), (primals,), (tangents,))[1].values()))

        with self._batch_context(i):
            if V.shape[1] == 1:
                return hvp_one(V[:, 0]).unsqueeze(1)
            # randomness="same": one dropout mask shared by all columns, as for a single product
            return vmap(hvp_one, in_dims=1, out_dims=1, randomness="same")(V)

    # ------------------------------------------------------------------ first order
    def loss_and_gradient(self) -> tuple[float, Tensor]:
        """Mean loss and its flat gradient ``(n,)`` in float64, at the current parameters."""
        total, g = 0.0, torch.zeros(self.n, dtype=torch.float64, device=self.device)
        for i, w in enumerate(self.weights):
            if self.backend == "double-backward" and self.keep_graphs:
                loss, grads = self._grad_graph(i)  # built now and reused by the products that follow
            else:
                x, y = self.batches[i]
                with self._batch_context(i):
                    loss = self.loss_fn(self.model(x), y)
                grads = torch.autograd.grad(loss, self.params, allow_unused=True)
                grads = [torch.zeros_like(p) if gg is None else gg for gg, p in zip(grads, self.params)]
            total += w * float(loss.detach())
            g.add_(self.flatten([gg.detach() for gg in grads]).to(torch.float64), alpha=w)
        return total, g


def dense_hessian(
    model: nn.Module,
    loss_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
    data=None,
    *,
    mode: str = "eval",
    params: ParamSpec = None,
    max_params: int = 5000,
) -> Tensor:
    """The exact ``(n, n)`` Hessian of the (batch-size weighted) mean loss, in the params' dtype.

    Built with ``torch.func.hessian`` over the flat parameter vector; the reference for every
    curvature test. Raises :class:`GradlabError` when ``n > max_params`` (the dense path needs
    ``n^2`` memory and ``n`` backward passes).
    """
    from torch.func import functional_call, hessian

    params, keys = select_params(model, params)
    n = sum(p.numel() for p in params)
    if n > max_params:
        raise GradlabError(
            f"model too large for the dense Hessian: {n} parameters > max_params={max_params} "
            f"(use the HVP-based solvers instead)"
        )
    loss_fn = F.cross_entropy if loss_fn is None else loss_fn
    sizes = [p.numel() for p in params]
    op = HessianOperator(model, loss_fn, data, mode=mode, params=params)  # device/dtype/weights

    def total_loss(flat):
        pd = {k: c.view_as(p) for k, c, p in zip(keys, torch.split(flat, sizes), params)}
        out = 0.0
        for i, w in enumerate(op.weights):
            x, y = op.batches[i]
            with op._batch_context(i):
                out = out + w * loss_fn(functional_call(model, pd, (x,)), y)
        return out

    flat = torch.cat([p.detach().reshape(-1) for p in params])
    return hessian(total_loss)(flat).detach()
