"""The curvature engine: one operator abstraction, HVP backends, and the solvers built on them.

Every curvature consumer (the Hessian probe, AdaHessian, curvature-aware GD, landscapes,
curvature attacks, per-example Jacobian spectra) goes through this package, and each primitive
exists once:

* probe vectors: :mod:`~gradlab.curvature.sampling` (Rademacher and Gaussian, from a generator);
* Hessian-vector products: :mod:`~gradlab.curvature.hvp`, operators in
  :mod:`~gradlab.curvature.operator` and :mod:`~gradlab.curvature.hessian_op`;
* Gauss-Newton, Fisher and K-FAC operators: :mod:`~gradlab.curvature.ggn`,
  :mod:`~gradlab.curvature.fisher` (the true and the empirical Fisher), :mod:`~gradlab.curvature.kfac`,
  all on the same model/data/parameter setup (:mod:`~gradlab.curvature.model_op`, parameter
  subsets by :func:`select_params`), so every solver takes any of them;
* the Hutchinson diagonal: :mod:`~gradlab.curvature.diagonal`;
* Lanczos (one or many operators at once): :mod:`~gradlab.curvature.lanczos`, under
  :func:`eigsh`, :func:`slq_density`, :func:`krylov_trace` and :func:`batched_lanczos`.
"""

from gradlab.curvature.batched import BatchedEigenResult, batched_lanczos
from gradlab.curvature.density import DensityResult, slq_density
from gradlab.curvature.eigen import EigenResult, eigsh
from gradlab.curvature.fisher import EmpiricalFisherOperator, FisherOperator
from gradlab.curvature.ggn import GGNOperator, OutputCurvatureOperator
from gradlab.curvature.kfac import KFACInverseOperator, KFACOperator
from gradlab.curvature.matrices import MATRICES, curvature_matrix
from gradlab.curvature.model_op import ModelOperator
from gradlab.curvature.params import select_params
from gradlab.curvature.gauss_newton import TRACE_METHODS, gauss_newton_trace, is_piecewise_linear, trace_auto
from gradlab.curvature.hessian_op import HessianOperator, dense_hessian
from gradlab.curvature.jacobian_gram import JacobianGram, per_example_jacobian, singular_values
from gradlab.curvature.operator import CurvatureOperator, DenseOperator, as_operator
from gradlab.curvature.diagonal import DiagonalResult, hutchinson_diag, hutchinson_diagonal
from gradlab.curvature.lanczos import Lanczos
from gradlab.curvature.sampling import gaussian, gaussian_like, make_generator, rademacher, rademacher_like
from gradlab.curvature.trace import (
    TraceResult,
    hutchinson_trace,
    hutchpp_trace,
    krylov_trace,
    xtrace,
)

__all__ = [
    "CurvatureOperator", "DenseOperator", "as_operator", "HessianOperator", "dense_hessian",
    "EigenResult", "eigsh", "TraceResult", "DiagonalResult", "hutchinson_trace",
    "hutchpp_trace", "krylov_trace", "xtrace", "hutchinson_diag", "DensityResult", "slq_density",
    "BatchedEigenResult", "batched_lanczos", "TRACE_METHODS", "gauss_newton_trace", "trace_auto",
    "is_piecewise_linear", "hutchinson_diagonal", "Lanczos", "gaussian", "gaussian_like", "make_generator",
    "rademacher", "rademacher_like", "JacobianGram", "per_example_jacobian",
    "singular_values", "ModelOperator", "select_params", "OutputCurvatureOperator", "GGNOperator",
    "FisherOperator", "EmpiricalFisherOperator", "KFACOperator", "KFACInverseOperator",
    "MATRICES", "curvature_matrix",
]
