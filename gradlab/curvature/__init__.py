"""The curvature engine: one operator abstraction, HVP backends, and the solvers built on them.

Every curvature consumer (the Hessian probe, AdaHessian, curvature-aware GD, landscapes,
curvature attacks, per-example Jacobian spectra) goes through this package.
"""

from gradlab.curvature.batched import BatchedEigenResult, batched_lanczos
from gradlab.curvature.density import DensityResult, slq_density
from gradlab.curvature.eigen import EigenResult, eigsh
from gradlab.curvature.gauss_newton import TRACE_METHODS, gauss_newton_trace, is_piecewise_linear, trace_auto
from gradlab.curvature.hessian_op import HessianOperator, dense_hessian, model_mode
from gradlab.curvature.jacobian_gram import JacobianGram, per_example_jacobian, singular_values
from gradlab.curvature.operator import CurvatureOperator, DenseOperator, as_operator
from gradlab.curvature.trace import (
    DiagonalResult,
    TraceResult,
    hutchinson_diag,
    hutchinson_trace,
    hutchpp_trace,
    krylov_trace,
    xtrace,
)

__all__ = [
    "CurvatureOperator", "DenseOperator", "as_operator", "HessianOperator", "dense_hessian",
    "model_mode", "EigenResult", "eigsh", "TraceResult", "DiagonalResult", "hutchinson_trace",
    "hutchpp_trace", "krylov_trace", "xtrace", "hutchinson_diag", "DensityResult", "slq_density",
    "BatchedEigenResult", "batched_lanczos", "TRACE_METHODS", "gauss_newton_trace", "trace_auto",
    "is_piecewise_linear", "JacobianGram", "per_example_jacobian", "singular_values",
]
