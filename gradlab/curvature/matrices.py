"""Curvature matrices of a model's loss by name: what ``--matrix`` of the probes chooses from.

* ``hessian``: :class:`~gradlab.curvature.HessianOperator`, ``d^2 L / d theta^2``;
* ``ggn``: :class:`~gradlab.curvature.GGNOperator`, ``J^T (d^2 L/dz^2) J`` (PSD for convex losses);
* ``fisher``: :class:`~gradlab.curvature.FisherOperator`, the true Fisher with labels drawn from
  the model (Monte Carlo, ``mc_samples`` per example, seeded);
* ``empirical-fisher``: :class:`~gradlab.curvature.EmpiricalFisherOperator`, outer products of
  the gradients at the observed labels (not the Fisher; Kunstner et al. 2019);
* ``kfac``: :class:`~gradlab.curvature.KFACOperator`, Kronecker factors per Linear/Conv2d layer.

All share the arguments of :class:`~gradlab.curvature.model_op.ModelOperator` (model, loss,
data, mode, parameter subset, seed), so a probe builds any of them the same way.
"""

from __future__ import annotations

from typing import Callable, Optional

from torch import Tensor, nn

from gradlab.core.errors import GradlabError
from gradlab.curvature.fisher import EmpiricalFisherOperator, FisherOperator
from gradlab.curvature.ggn import GGNOperator
from gradlab.curvature.hessian_op import HessianOperator
from gradlab.curvature.kfac import KFACOperator
from gradlab.curvature.model_op import ModelOperator
from gradlab.curvature.params import ParamSpec

MATRICES = {
    "hessian": "the loss Hessian",
    "ggn": "the generalised Gauss-Newton matrix J^T H_out J",
    "fisher": "the true Fisher, labels sampled from the model",
    "empirical-fisher": "the empirical Fisher, gradients at the observed labels (not the Fisher)",
    "kfac": "K-FAC, Kronecker factors per Linear/Conv2d layer",
}


def curvature_matrix(matrix: str, model: nn.Module, loss_fn: Optional[Callable[[Tensor, Tensor], Tensor]], data, *,
                     mode: str = "eval", params: ParamSpec = None, seed: int = 0, mc_samples: int = 1,
                     backend: Optional[str] = None) -> ModelOperator:
    """The operator named ``matrix`` (one of :data:`MATRICES`): ``backend`` is the Hessian's HVP
    backend, ``mc_samples`` the Fisher's labels per example; K-FAC uses its type-2 factors."""
    if matrix not in MATRICES:
        raise GradlabError(f"unknown curvature matrix {matrix!r}; choose from: {', '.join(MATRICES)}")
    common = dict(mode=mode, params=params, seed=seed)
    if matrix == "hessian":
        return HessianOperator(model, loss_fn, data, backend=backend, **common)
    if matrix == "ggn":
        return GGNOperator(model, loss_fn, data, **common)
    if matrix == "fisher":
        return FisherOperator(model, loss_fn, data, mc_samples=mc_samples, **common)
    if matrix == "empirical-fisher":
        return EmpiricalFisherOperator(model, loss_fn, data, **common)
    return KFACOperator(model, loss_fn, data, **common)
