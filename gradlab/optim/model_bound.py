"""The third stepping convention: optimizers that need the model, not only the loss.

K-FAC reads each layer's inputs and output gradients; natural gradient multiplies by the
Gauss-Newton (or Fisher) matrix, which needs the model's outputs and the loss read as a
likelihood. A loss closure alone gives neither, so these optimizers (``needs_model = True``,
which implies ``needs_loss_closure = True``) are bound once to the model and its loss::

    opt.bind(model, F.cross_entropy)        # once, before the first step (gradlab train does it)
    opt.zero_grad(); loss = opt.step(lambda: F.cross_entropy(model(x), y))

* ``bind(model, loss_fn)``: ``model`` is the bare module (not a DDP wrapper) whose forward the
  closure runs; ``loss_fn(outputs, y)`` is the per-batch criterion, cross-entropy or squared
  error with mean or sum reduction (:mod:`gradlab.curvature.likelihood`), whose likelihood the
  curvature uses. The optimized parameters must be parameters of ``model``.
* ``step(closure)``: the closure is the one of the ``needs_loss_closure`` convention (it returns
  the loss with its graph and does not call backward). During it the optimizer observes the
  model's *first* forward pass through hooks it installs for that call only (the outputs ``z``
  with their graph, and for K-FAC each layer's input and output); later forward passes in the
  same closure (an adversarial term) enter the gradient, not the curvature. Nothing stays
  registered on the model between steps.
* Under ``torch.distributed`` the model is not DDP-wrapped (as for AdaHessian): the optimizer
  averages the gradient over ranks itself and all-reduces its curvature (products or factors),
  each rank's share weighted by its number of examples, so W processes on shards of a global
  batch compute what one process computes on the whole batch.

:class:`ModelBoundOptimizer` implements the contract; subclasses write ``step``.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from gradlab.core.distributed import process_count, reduce_over_ranks
from gradlab.core.errors import GradlabError
from gradlab.optim import loss_scaling
from gradlab.optim.closure import loss_with_graph
from gradlab.curvature.likelihood import check_outputs, require_likelihood
from gradlab.optim.registry import check_int
from gradlab.optim.state import ExtraState


#: The number of processes (1 without a process group); the K-FAC, natural-gradient and SAM
#: modules reduce over ranks with :func:`gradlab.core.distributed.reduce_over_ranks`.
world_size = process_count


def global_rows(z: Tensor) -> tuple[Tensor, slice]:
    """Every rank's rows of ``z`` as one global batch, and where this rank's rows lie in it.

    One process: ``(z, slice(None))``. Under torchrun the ranks' rows are gathered (one small
    all-reduce of the sizes, one all-gather) in the order of the loop's global batch: when the
    sizes are the strided shares of :class:`gradlab.core.distributed.GlobalBatchSampler` (rank
    ``r`` at positions ``r, r + W, ...``) they are interleaved so, otherwise concatenated in rank
    order. Monte Carlo curvature draws its labels on this batch with the generator every rank
    seeds alike, and each rank keeps its rows, so W processes draw the labels one process draws
    (the same random stream, consumed the same way) and the generators stay in step.
    """
    w = world_size()
    if w == 1:
        return z, slice(None)
    import torch.distributed as dist

    r = dist.get_rank()
    sizes = torch.zeros(w, dtype=torch.int64, device=z.device)
    sizes[r] = z.shape[0]
    sizes = [int(k) for k in reduce_over_ranks([sizes])[0].tolist()]
    n, m = sum(sizes), max(sizes)
    padded = z.new_zeros((m, *z.shape[1:]))
    padded[: z.shape[0]] = z
    parts = [torch.empty_like(padded) for _ in range(w)]
    dist.all_gather(parts, padded.contiguous())
    if sizes == [len(range(q, n, w)) for q in range(w)]:
        out = z.new_empty((n, *z.shape[1:]))
        for q in range(w):
            out[q::w] = parts[q][: sizes[q]]
        return out, slice(r, n, w)
    start = sum(sizes[:r])
    return torch.cat([parts[q][: sizes[q]] for q in range(w)]), slice(start, start + sizes[r])


def sampled_output_gradients(likelihood, z: Tensor, mc_samples: int, generator: torch.Generator) -> Tensor:
    """``likelihood.sampled_gradients(z, ...)`` (M, N, C) with the labels drawn on the global batch
    (:func:`global_rows`) and the gradients taken at this rank's outputs: on one process exactly
    the likelihood's own; under torchrun the labels one process would draw."""
    zg, mine = global_rows(z)
    labels = likelihood.sample_labels(zg, mc_samples, generator)[:, mine]
    return torch.stack([likelihood.output_gradients(z, lab) for lab in labels])


@contextlib.contextmanager
def perturbed(params: list[Tensor], delta: list[Tensor], alpha: float = 1.0):
    """The parameters at ``p + alpha * delta`` inside the block, restored bit-exactly afterwards."""
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        torch._foreach_add_(params, delta, alpha=alpha)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)


class ModelBoundOptimizer(ExtraState):
    """Base class of the optimizers that need the model (module docstring)."""

    needs_loss_closure = True
    needs_model = True
    name = "this optimizer"
    loss_scaler = None  # fp16: a gradlab.core.loss_scale.LossScaler (gradlab.optim.loss_scaling.attach)

    def __init__(self, params, defaults: dict, seed: int = 0):
        super().__init__(params, defaults)
        self.seed = check_int("seed", seed, 0)
        self._generator = torch.Generator(device="cpu")
        self._generator.manual_seed(self.seed)
        self.model: Optional[nn.Module] = None
        self.loss_fn = None
        self.likelihood = None
        self.steps_taken = 0
        self.events: list = []

    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"] if p.requires_grad]

    def bind(self, model: nn.Module, loss_fn=None) -> None:
        """Attach the model whose forward pass the closures run and the loss they compute
        (default ``F.cross_entropy``); see the module docstring."""
        loss_fn = F.cross_entropy if loss_fn is None else loss_fn
        if model is self.model and loss_fn is self.loss_fn:
            return  # bound already (binding again keeps the curvature state)
        self.likelihood = require_likelihood(loss_fn, f"optimizer {self.name}")
        own = {id(p) for p in model.parameters()}
        if any(id(p) not in own for p in self._params()):
            raise GradlabError(f"optimizer {self.name}: its parameters must belong to the bound model")
        self.model, self.loss_fn = model, loss_fn
        self._on_bind(model)

    def _on_bind(self, model: nn.Module) -> None:
        """Subclasses: inspect the model's layers."""

    def _require_bound(self) -> None:
        if self.model is None:
            raise GradlabError(
                f"optimizer {self.name} needs the model and its loss: call opt.bind(model, loss_fn) before "
                "step (gradlab train does); it is not defined on a 2-D test function")

    def _forward(self, closure, layers: Sequence[nn.Module] = ()):
        """Evaluate the closure, watching the model's first forward pass.

        Returns ``(loss, z, seen)``: the loss with its graph, the outputs ``z`` (N, C) of the first
        forward pass with their graph, and ``seen[id(layer)] = (input, output)`` of each of
        ``layers`` in that pass (input detached, output with its graph)."""
        state = {"calls": 0, "depth": 0, "z": None}
        seen: dict = {}

        def pre(module, args):
            state["calls"] += 1
            state["depth"] += 1

        def post(module, args, output):
            state["depth"] -= 1
            if state["calls"] == 1 and state["depth"] == 0:
                state["z"] = output

        def layer_hook(module, inputs, output):
            if state["calls"] == 1 and state["depth"] > 0:
                if id(module) in seen:
                    raise GradlabError(f"optimizer {self.name}: a {type(module).__name__} layer ran twice in "
                                       "one forward pass (shared weights are not supported)")
                # under autocast a layer's input may be bf16/fp16: the factors are made in the
                # weights' dtype (float32), never in the low precision
                a = inputs[0].detach()
                w = getattr(module, "weight", None)
                if isinstance(w, Tensor) and a.is_floating_point() and a.dtype != w.dtype:
                    a = a.to(w.dtype)
                seen[id(module)] = (a, output)

        self._require_bound()
        handles = [self.model.register_forward_pre_hook(pre), self.model.register_forward_hook(post)]
        handles += [m.register_forward_hook(layer_hook) for m in layers]
        try:
            loss = self._loss(closure)
        finally:
            for h in handles:
                h.remove()
        z = state["z"]
        if not isinstance(z, Tensor):
            raise GradlabError(f"optimizer {self.name}: the closure did not run the bound model")
        check_outputs(z, f"optimizer {self.name}")
        dtype = self._params()[0].dtype
        if z.is_floating_point() and z.dtype != dtype:  # autocast: curvature in the weights' dtype
            z = z.to(dtype)
        return loss, z, seen

    def _loss(self, closure) -> Tensor:
        """The closure's loss with its graph, the model unwatched (no hooks: what a step that needs
        neither the outputs nor the layers' inputs runs)."""
        self._require_bound()
        return loss_with_graph(closure, self.name)

    def _gradients(self, loss: Tensor, params: list[Tensor], retain_graph: bool) -> list[Tensor]:
        """``d loss / d params``, loss-scaled under fp16 (:mod:`gradlab.optim.loss_scaling`: K-FAC's
        and natural-gd's gradients both come from here)."""
        return loss_scaling.gradients(self.loss_scaler, loss, params, retain_graph=retain_graph)

    @staticmethod
    def _average(tensors: list[Tensor], n_local: int) -> tuple[list[Tensor], int]:
        """Under torchrun: the tensors averaged over ranks, and the global number of examples."""
        w = world_size()
        if w == 1:
            return tensors, n_local
        *out, n = reduce_over_ranks([*tensors, torch.tensor([float(n_local)], device=tensors[0].device,
                                                            dtype=tensors[0].dtype)])
        return [t.div_(w) for t in out], int(round(n.item()))

    # -- checkpointing --------------------------------------------------------------------------
    def _extra_state(self) -> dict:
        return {}

    def _load_extra_state(self, extra: dict) -> None:
        pass

    def _gradlab_state(self) -> dict:
        return {"rng_state": self._generator.get_state(), "steps_taken": self.steps_taken,
                "events": [dict(e) for e in self.events], **self._extra_state()}

    def _load_gradlab_state(self, extra: dict) -> None:
        self._generator.set_state(extra["rng_state"])
        self.steps_taken = int(extra["steps_taken"])
        self.events = [dict(e) for e in extra.get("events", [])]
        self._load_extra_state(extra)
