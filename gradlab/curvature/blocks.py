"""Parameter blocks of a model, and the principal submatrix of an operator on chosen coordinates.

Per-layer curvature is the curvature matrix restricted to one block of parameters: the diagonal
block ``A[b, b]`` of the full matrix, which every model operator computes directly when built
with ``params=`` that block (:mod:`gradlab.curvature.params`). This module says what the blocks
are:

* :func:`parameter_blocks` with ``per_layer=True``: a :class:`~gradlab.models.base.GradlabNet`
  splits into its ``blocks.i`` and its ``head``; any other ``nn.Module`` into the modules that own
  parameters directly (``feat.1``, ``out``), in the model's order;
* with name patterns (``"fc1,fc2"``): one block per comma-separated item; an item may join
  several patterns with ``+`` (``"fc1+fc2"``) and each pattern is a glob over parameter names or
  a module prefix, as :func:`~gradlab.curvature.params.select_params` reads it. Both together:
  every item split into its layers.

:class:`CoordinateOperator` is ``P^T A P`` for a coordinate selection ``P`` (columns of the
identity): the principal submatrix of any operator on a few coordinates, small enough to be
compared with a dense matrix (``gradlab probe hessian --verify``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from gradlab.core.errors import GradlabError
from gradlab.curvature.operator import CurvatureOperator
from gradlab.curvature.params import select_params


@dataclass
class ParamBlock:
    """A named group of parameters: ``tensors`` in the model's order and their ``names``."""

    name: str
    tensors: list
    names: list

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.tensors)


def _layer_of(model: nn.Module) -> dict:
    """``{parameter name: layer name}``: a GradlabNet's blocks/head (recognised by its
    ``blocks`` ModuleList and ``head``: the engine does not import the model zoo), else the
    owning module."""
    out = {}
    if isinstance(getattr(model, "blocks", None), nn.ModuleList) and isinstance(getattr(model, "head", None), nn.Module):
        for name, _ in model.named_parameters():
            parts = name.split(".")
            out[name] = ".".join(parts[:2]) if parts[0] == "blocks" and len(parts) > 2 else parts[0]
        return out
    for mname, m in model.named_modules():
        for pname, _ in m.named_parameters(recurse=False):
            out[f"{mname}.{pname}" if mname else pname] = mname or "(model)"
    return out


def _split_layers(model: nn.Module, tensors: list, names: list) -> list[ParamBlock]:
    layer = _layer_of(model)
    groups: dict[str, ParamBlock] = {}
    for p, n in zip(tensors, names):
        key = layer.get(n, n)
        groups.setdefault(key, ParamBlock(key, [], [])).tensors.append(p)
        groups[key].names.append(n)
    return list(groups.values())


def parameter_blocks(model: nn.Module, params: Optional[str] = None, per_layer: bool = False) -> list[ParamBlock]:
    """The blocks of ``model``'s trainable parameters (module docstring), each non-empty.

    Raises:
        GradlabError: neither ``params`` nor ``per_layer``, an empty item, or a pattern that
            matches no trainable parameter (the message lists the names).
    """
    if params is None and not per_layer:
        raise GradlabError("parameter blocks need name patterns or per_layer=True")
    if params is None:
        return _split_layers(model, *select_params(model, None))
    items = [it.strip() for it in str(params).split(",")]
    if not any(items) or not all(items):
        raise GradlabError(f"invalid params {params!r}: give comma-separated name patterns, e.g. fc1,fc2 or '*.bias'")
    blocks: list[ParamBlock] = []
    for item in items:
        pats = [p.strip() for p in item.split("+") if p.strip()]
        tensors, names = select_params(model, pats)
        blocks += _split_layers(model, tensors, names) if per_layer else [ParamBlock(item, tensors, names)]
    seen, out = set(), []
    for b in blocks:  # an item repeated, or two items naming one layer: one row
        key = tuple(b.names)
        if key not in seen:
            seen.add(key)
            out.append(b)
    return out


def random_coordinates(sizes: list[int], count: int, seed: int) -> Tensor:
    """``min(count, sum(sizes))`` distinct flat indices (sorted) drawn uniformly with ``seed``."""
    n = sum(sizes)
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=gen)[: min(count, n)].sort().values


class CoordinateOperator(CurvatureOperator):
    """``A[idx][:, idx]`` of the operator ``A`` (size ``len(idx)``): each product embeds the
    vector at ``idx`` (zeros elsewhere), multiplies by ``A`` and keeps the entries at ``idx``."""

    def __init__(self, op: CurvatureOperator, idx: Tensor):
        idx = torch.as_tensor(idx, dtype=torch.long)
        if idx.ndim != 1 or idx.numel() == 0 or int(idx.min()) < 0 or int(idx.max()) >= op.n:
            raise GradlabError(f"coordinates must be a non-empty 1-D index into 0..{op.n - 1}")
        super().__init__(idx.numel(), op.dtype, op.device)
        self.op, self.idx = op, idx.to(op.device)

    def _matmat(self, V: Tensor) -> Tensor:
        full = torch.zeros(self.op.n, V.shape[1], dtype=V.dtype, device=V.device)
        full[self.idx] = V
        return self.op.matmat(full)[self.idx]

    def clear(self) -> None:
        if hasattr(self.op, "clear"):
            self.op.clear()


__all__ = ["CoordinateOperator", "ParamBlock", "parameter_blocks", "random_coordinates"]
