"""The common part of every curvature operator of a model's loss: data, mode, parameters.

:class:`ModelOperator` holds what the Hessian, the Gauss-Newton, the Fisher and the K-FAC
operators share, so that each subclass writes only its product: the model and the loss, the
batches (one ``(x, y)`` or a list; the matrix is that of the loss averaged over all samples,
each batch weighted by its size), the model mode for the products, the chosen parameters
(:func:`gradlab.curvature.params.select_params`) and the flat-vector layout over them.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradlab.core.errors import GradlabError
from gradlab.core.modelstate import model_state
from gradlab.curvature.operator import CurvatureOperator
from gradlab.curvature.params import ParamSpec, select_params

MODES = ("eval", "train")

#: Above this many batches an operator rebuilds each batch's graph per product instead of
#: keeping every graph alive (memory grows with kept graphs).
MAX_KEPT_GRAPHS = 8


def split_batches(data) -> list[tuple[Tensor, Tensor]]:
    """Accept one ``(x, y)`` batch or an iterable of them; return a non-empty list of batches."""
    if data is None:
        raise GradlabError("no data given for the curvature matrix: pass one (x, y) batch or a list of batches")
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        batches = [tuple(data)]
    else:
        batches = [tuple(b) for b in data]
    if not batches:
        raise GradlabError("no data batches given for the curvature matrix")
    return batches


class ModelOperator(CurvatureOperator):
    """A symmetric ``n x n`` curvature matrix of ``loss_fn(model(x), y)`` over the chosen parameters.

    Args:
        model: the network; left unchanged (mode flags restored after every product).
        loss_fn: ``loss_fn(outputs, y) -> scalar`` (default cross-entropy, mean over the batch).
        data: one batch ``(x, y)`` or a list/iterable of batches, averaged weighted by batch size.
        mode: ``"eval"`` (dropout off, BatchNorm running statistics) or ``"train"`` (dropout with
            masks fixed per batch by ``seed``, BatchNorm batch statistics, running stats untouched).
        params: which parameters (:func:`~gradlab.curvature.params.select_params`: None for all,
            tensors, or name patterns); ``n`` is the sum of their sizes.
        seed: seeds the train-mode dropout masks (and, in subclasses, any sampling).
    """

    def __init__(self, model: nn.Module, loss_fn: Optional[Callable[[Tensor, Tensor], Tensor]], data, *,
                 mode: str = "eval", params: ParamSpec = None, seed: int = 0):
        if mode not in MODES:
            raise GradlabError(f"unknown mode {mode!r}; choose from: {', '.join(MODES)}")
        chosen, names = select_params(model, params)
        super().__init__(sum(p.numel() for p in chosen), chosen[0].dtype, chosen[0].device)
        self.model, self.params, self.param_names, self.mode, self.seed = model, chosen, names, mode, seed
        self.loss_fn = F.cross_entropy if loss_fn is None else loss_fn
        self.batches = [self._to_device(b) for b in split_batches(data)]
        sizes = torch.tensor([float(len(b[1])) for b in self.batches], dtype=torch.float64)
        self.weights = (sizes / sizes.sum()).tolist()  # batch-size weights of the mean loss
        self.num_samples = int(sizes.sum().item())

    def _to_device(self, batch):
        x, y = batch
        if x.is_floating_point():
            x = x.to(device=self.device, dtype=self.dtype)
        return x.to(self.device), y.to(self.device)

    @contextlib.contextmanager
    def _batch_context(self, i: int):
        """Model mode, and in train mode a fixed RNG seed per batch so dropout masks repeat.

        In train mode BatchNorm normalises with batch statistics but its running statistics are
        not updated (probing must not change the model; ``torch.func`` cannot update them either).
        """
        with model_state(self.model, train=self.mode == "train", keep_bn_stats=self.mode == "train"):
            if self.mode == "train":
                devices = [self.device] if self.device.type == "cuda" else []
                with torch.random.fork_rng(devices=devices):
                    torch.manual_seed(self.seed + i)
                    yield
            else:
                yield

    def unflatten(self, v: Tensor) -> list[Tensor]:
        """Flat ``(n,)`` -> one tensor per parameter (views of ``v``)."""
        return [c.view_as(p) for c, p in zip(torch.split(v, [p.numel() for p in self.params]), self.params)]

    @staticmethod
    def flatten(ts: Sequence[Tensor]) -> Tensor:
        return torch.cat([t.reshape(-1) for t in ts])

    def registered_names(self, what: str) -> list[str]:
        """The chosen parameters' names in the model (``torch.func`` needs them)."""
        if any(n is None for n in self.param_names):
            raise GradlabError(f"{what} needs params that are registered in the model")
        return list(self.param_names)
