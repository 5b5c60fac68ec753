"""Per-example gradients: the one primitive behind gradient statistics and the empirical Fisher.

For a batch ``(x, y)`` of ``B`` examples and a mean-reduction loss ``loss_fn(logits, y)``,
:func:`per_example_grads` returns, for each parameter ``p`` of shape ``S``, the ``(B, *S)``
tensor whose row ``i`` is the gradient of example ``i``'s own loss, ``d loss_fn(f(x_i), y_i) / dp``
(so the mini-batch gradient is their mean).

It runs ``torch.func.vmap`` over ``torch.func.grad`` of a ``functional_call`` of the model (one
batched backward pass instead of ``B``), in chunks of ``chunk_size`` examples to bound the
memory (``B * n_params`` floats per chunk), and falls back to a plain loop over the examples
(one backward each) for models vmap cannot take (an in-place op on a batched tensor, a custom
autograd function, a layer without a batching rule). Modules that mix examples (BatchNorm in
training mode) have no per-example gradients: the model runs as it is, so put it in eval mode
first (:func:`gradlab.core.modelstate.model_state`) if it has BatchNorm.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional

import torch
from torch import Tensor, nn

METHODS = ("auto", "vmap", "loop")


def _params_of(model: nn.Module, params) -> dict[str, Tensor]:
    if params is None:
        return {n: p for n, p in model.named_parameters() if p.requires_grad}
    if isinstance(params, Mapping):
        return dict(params)
    by_id = {id(p): n for n, p in model.named_parameters()}
    return {by_id[id(p)]: p for p in params}


def per_example_grads_vmap(model: nn.Module, loss_fn: Callable, x: Tensor, y: Tensor,
                           params: Mapping[str, Tensor], chunk_size: Optional[int] = None) -> dict[str, Tensor]:
    """:func:`per_example_grads` through ``vmap(grad(...))`` (raises where vmap cannot go)."""
    from torch.func import functional_call, grad, vmap

    names = list(params)
    fixed = {n: t.detach() for n, t in model.named_parameters() if n not in params}
    fixed.update(dict(model.named_buffers()))

    def example_loss(p, xi, yi):
        out = functional_call(model, {**fixed, **p}, (xi.unsqueeze(0),))
        return loss_fn(out, yi.unsqueeze(0))

    detached = {n: params[n].detach() for n in names}
    grads = vmap(grad(example_loss), in_dims=(None, 0, 0), chunk_size=chunk_size, randomness="different")(detached, x, y)
    return {n: grads[n] for n in names}


def per_example_grads_loop(model: nn.Module, loss_fn: Callable, x: Tensor, y: Tensor,
                           params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """:func:`per_example_grads` by one backward pass per example (the reference, and the
    fallback for models vmap cannot take)."""
    names = list(params)
    tensors = [params[n] for n in names]
    rows: list[list[Tensor]] = [[] for _ in names]
    for i in range(len(x)):
        loss = loss_fn(model(x[i : i + 1]), y[i : i + 1])
        gs = torch.autograd.grad(loss, tensors, allow_unused=True)
        for row, g, t in zip(rows, gs, tensors):
            row.append(torch.zeros_like(t) if g is None else g)
    return {n: torch.stack(row) for n, row in zip(names, rows)}


def per_example_grads(model: nn.Module, loss_fn: Callable, x: Tensor, y: Tensor, params=None,
                      chunk_size: Optional[int] = None, method: str = "auto") -> dict[str, Tensor]:
    """Per-example gradients ``{name: (B, *p.shape)}`` (see the module docstring).

    Args:
        model: the network; its parameters' ``.grad`` are left untouched.
        loss_fn: ``loss_fn(logits, y) -> scalar``, a mean over the batch (each example's loss is
            ``loss_fn`` on a batch of one).
        x, y: the batch, ``(B, ...)`` and ``(B,)``.
        params: the parameters to differentiate (``{name: tensor}`` or an iterable of the
            model's parameters); default: every parameter that requires a gradient.
        chunk_size: examples per vmap chunk (None: all at once).
        method: ``"vmap"``, ``"loop"`` or ``"auto"`` (vmap, and the loop where vmap fails).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, not {method!r}")
    chosen = _params_of(model, params)
    if method == "loop":
        return per_example_grads_loop(model, loss_fn, x, y, chosen)
    try:
        return per_example_grads_vmap(model, loss_fn, x, y, chosen, chunk_size)
    except (RuntimeError, NotImplementedError, TypeError, ValueError):
        if method == "vmap":
            raise
        return per_example_grads_loop(model, loss_fn, x, y, chosen)


__all__ = ["METHODS", "per_example_grads", "per_example_grads_loop", "per_example_grads_vmap"]
