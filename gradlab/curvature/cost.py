"""The cost of training in gradient-equivalents, counted by mechanism.

One unit is one forward plus one backward pass of the model over a training batch (what a plain
SGD step costs). What the counter sees, while it is active (:func:`counting`, the training loop
activates it for each optimizer step only, so evaluation and probes are not training cost):

* a forward pass of the watched model (:func:`watch`): 1/3 x (rows of its input / rows of the
  step's batch); the conventional forward : backward cost ratio of 1 : 2 of a network (a backward
  pass computes two products per layer, the forward one);
* a backward pass through the model: 2/3 x the same fraction. Counted by a gradient hook on the
  model's outputs, so every backward through the model counts, whoever asks for it: an
  optimizer's gradient, a second closure evaluation, SAM's gradient at the perturbed point,
  K-FAC's backward pass with sampled labels (its factor statistics), an attack's input gradient
  during adversarial training;
* a curvature-vector product (Hessian, Gauss-Newton or Fisher): 1, inside :func:`products`,
  where the passes that make it up are not counted again. The Hessian's comes from
  :func:`gradlab.curvature.hvp.hvp_from_grads` (double backward on a kept gradient graph, Pearlmutter
  1994: about the cost of one gradient), natural gradient's from its Gauss-Newton products.

So an SGD step is 1, an L-BFGS step its number of closure evaluations (each a forward and a
backward; a strong-Wolfe line search evaluates the gradient at every trial point), Newton-CG
1 + its products, saddle-free Newton 1 + its Lanczos steps, SAM/ASAM 2, AdaHessian 1 + its
Hutchinson products on refresh steps, natural-gd 1 + its CG products + 1/3 (the forward pass
at the new point for the reduction ratio), and K-FAC 1, plus 2/3 per backward pass of factor
statistics on refresh steps (one for ``mc``, one per class for ``type-2``, also when the classes
share one batched backward pass: :func:`add_backward`). Work that is no
pass through the model counts nothing: K-FAC's eigendecompositions, L-BFGS's two-loop
recursion, the CG and Lanczos vector arithmetic. They show in wall time, which a run records
beside this count.
"""

from __future__ import annotations

import contextlib
from typing import Optional

from torch import Tensor, nn

FORWARD, BACKWARD, PRODUCT = 1.0 / 3.0, 2.0 / 3.0, 1.0


class GradientCost:
    """Running totals of one run: forward and backward passes (in batch units) and products."""

    def __init__(self):
        self.forward = self.backward = self.products = 0.0
        self.batch_rows = 1  # rows of the current step's batch: a pass's weight is rows / this
        self._quiet = 0  # > 0 inside products(): their inner passes are not counted again

    @property
    def total(self) -> float:
        """The cost so far in gradient-equivalents."""
        return FORWARD * self.forward + BACKWARD * self.backward + PRODUCT * self.products

    def state_dict(self) -> dict:
        return {"forward": self.forward, "backward": self.backward, "products": self.products}

    def load_state_dict(self, state: dict) -> None:
        self.forward = float(state.get("forward", 0.0))
        self.backward = float(state.get("backward", 0.0))
        self.products = float(state.get("products", 0.0))


_ACTIVE: list = []


def active() -> Optional[GradientCost]:
    """The counter of the step in progress, or None."""
    return _ACTIVE[-1] if _ACTIVE else None


@contextlib.contextmanager
def counting(cost: GradientCost, batch_rows: int):
    """Count into ``cost`` inside the block (one optimizer step on a batch of ``batch_rows``)."""
    cost.batch_rows = max(int(batch_rows), 1)
    _ACTIVE.append(cost)
    try:
        yield cost
    finally:
        _ACTIVE.pop()


@contextlib.contextmanager
def products(n: int = 1):
    """The block computes ``n`` curvature-vector products (0: work that belongs to products, e.g.
    building the graph they reuse); forward and backward passes inside it are not counted."""
    cost = active()
    if cost is None:
        yield
        return
    cost.products += n
    cost._quiet += 1
    try:
        yield
    finally:
        cost._quiet -= 1


def add_backward(passes: float, rows: int) -> None:
    """Count ``passes`` more backward passes over ``rows`` examples into the active counter, unless
    inside :func:`products`: a backward vectorised over ``c`` output vectors does ``c`` passes'
    work but fires the output hook of :func:`watch` once, so it adds ``c - 1`` here."""
    cost = active()
    if cost is not None and not cost._quiet:
        cost.backward += passes * rows / cost.batch_rows


def _rows(x) -> int:
    return int(x.shape[0]) if isinstance(x, Tensor) and x.ndim > 0 else 1


def _first_tensor(output) -> Optional[Tensor]:
    """The tensor a backward pass through a model's outputs reaches first (a tuple's or a
    dict's first tensor: a user model may return several)."""
    if isinstance(output, Tensor):
        return output
    values = output.values() if isinstance(output, dict) else output if isinstance(output, (tuple, list)) else ()
    return next((v for v in values if isinstance(v, Tensor)), None)


def watch(model: nn.Module) -> list:
    """Hooks on ``model`` that count its forward and backward passes into the active counter (a
    no-op while none is); returns the handles."""

    def on_forward(module, args, output):
        cost = active()
        if cost is None or cost._quiet:
            return
        share = (_rows(args[0]) if args else cost.batch_rows) / cost.batch_rows
        cost.forward += share
        output = _first_tensor(output)
        if output is not None and output.requires_grad:
            def on_backward(grad, share=share):
                now = active()
                if now is not None and not now._quiet:
                    now.backward += share

            output.register_hook(on_backward)

    return [model.register_forward_hook(on_forward)]


__all__ = ["BACKWARD", "FORWARD", "PRODUCT", "GradientCost", "active", "add_backward", "counting", "products",
           "watch"]
