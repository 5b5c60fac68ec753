"""Curvature matrices of the form ``J^T Lambda J``: the generalised Gauss-Newton matrix and its kin.

For a batch with outputs ``z = f(x; theta)`` (N, C) and loss ``L(z)``, let ``J = dz/dtheta``
(N*C, n) and ``Lambda`` (N*C, N*C) a symmetric matrix in output space. The matrices

    M = J^T Lambda J          (n x n)

are products with ``J`` (a Jacobian-vector product), with ``Lambda``, and with ``J^T`` (a
vector-Jacobian product); ``J`` is never formed. :class:`OutputCurvatureOperator` computes
them and a subclass only says what ``Lambda`` is:

* :class:`GGNOperator`: ``Lambda = d^2 L / dz^2``, the generalised Gauss-Newton matrix
  (Schraudolph 2002, "Fast curvature matrix-vector products for second-order gradient descent";
  Martens 2010). For a convex loss it is positive semi-definite; it is the Hessian without the
  term of the network's own second derivatives, so for a model linear in its parameters it *is*
  the Hessian.
* the true and the empirical Fisher (:mod:`gradlab.curvature.fisher`), whose ``Lambda`` are
  outer products of sampled or observed output gradients.

Products: one forward pass per batch gives ``z``, and its graph is kept, so ``J^T w`` is one
backward pass. ``J v`` is either the "R-operator" by double backward (Pearlmutter 1994): with a
dummy ``u`` (shape of ``z``), ``g(u) = J^T u`` is built once with its graph; ``g`` is linear in
``u``, so ``J v = d(g(u) . v)/du`` is one backward pass through that graph and needs no
forward-mode support from the layers; or forward mode (dual tensors), cheaper for
convolutions (:func:`default_jvp`), in which the Conv/Linear/eval-BatchNorm layers replay their
outputs from the kept forward pass and compute only their tangents
(:mod:`~gradlab.curvature.tangent`). Graphs are kept for the life of the operator (at most
:data:`~gradlab.curvature.model_op.MAX_KEPT_GRAPHS` batches, else rebuilt per product);
curvlinops' ``torch.func`` product runs two forward passes, a forward-mode pass and a backward
pass per product (ratios in ``benchmarks/RESULTS.md``).

Shapes: the flat vector is the chosen parameters concatenated (``n``); products are computed in
the parameters' dtype. Several batches: the size-weighted average of the batches' matrices.
"""

from __future__ import annotations

import contextlib
from abc import abstractmethod
from typing import Callable, Optional

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn

from gradlab.core.errors import GradlabError
from gradlab.curvature.likelihood import likelihood_of
from gradlab.curvature.model_op import MAX_KEPT_GRAPHS, ModelOperator
from gradlab.curvature.params import ParamSpec
from gradlab.curvature.tangent import CachedTangents, Mismatch


JVP_METHODS = ("double-backward", "forward")


def default_jvp(model: nn.Module) -> str:
    """``"forward"`` for convolutional models, else ``"double-backward"``.

    Measured in ``benchmarks/bench_curvature_operators.py`` (CPU, batch 128): on a 3x32x32 ReLU
    CNN the forward-mode ``J v`` makes the GGN product 0.69x curvlinops' time against 0.94x by
    double backward; on the digits MLP forward mode costs ~5x more per ``J v`` (``torch.func``
    overhead on small layers); on the digits CNN the two are within 10%.
    """
    convs = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    return "forward" if any(isinstance(m, convs) for m in model.modules()) else "double-backward"


class Linearization:
    """One batch's outputs ``z`` (N, *out) with products by ``J = dz/dtheta`` and ``J^T``.

    ``J v`` by ``method``: ``"double-backward"`` (the graph of ``J^T u`` kept, module docstring)
    or ``"forward"`` (one dual-tensor pass of the model with the chosen parameters as dual inputs
    per product, no second-order graph kept; the layers that :mod:`~gradlab.curvature.tangent`
    records in the kept forward pass do not recompute their outputs)."""

    def __init__(self, op: ModelOperator, i: int, method: str = "double-backward"):
        x, _ = op.batches[i]
        self.op, self.i, self.method, self.params = op, i, method, op.params
        with torch.enable_grad():
            with op._batch_context(i):
                self.cache = CachedTangents(op.model) if method == "forward" else None
                with self.cache.record() if self.cache is not None else contextlib.nullcontext():
                    self.z = op.model(x)
            if method == "forward":
                self.names = op.registered_names("a forward-mode Jacobian-vector product")
                return
        self._transpose_graph()

    @classmethod
    def of_outputs(cls, z: Tensor, params: list[Tensor]) -> "Linearization":
        """The linearization of outputs ``z`` already computed with their graph (an optimizer's
        closure: :mod:`gradlab.optim.natural_gd`); ``J v`` by double backward."""
        lin = cls.__new__(cls)
        lin.op, lin.i, lin.method, lin.params, lin.z = None, None, "double-backward", list(params), z
        lin._transpose_graph()
        return lin

    def _transpose_graph(self) -> None:
        """``J^T u`` with its graph, for a dummy ``u`` (module docstring)."""
        with torch.enable_grad():
            self.u = torch.zeros_like(self.z, requires_grad=True)
            jt = torch.autograd.grad(self.z, self.params, self.u, create_graph=True, allow_unused=True)
        # parameters the outputs do not depend on contribute zero rows to J
        self.live = [g is not None and g.requires_grad for g in jt]
        self.jt_u = [g for g, live in zip(jt, self.live) if live]

    def jvp(self, vs: list[Tensor]) -> Tensor:
        """``J v`` for ``v`` given as one tensor per parameter: shape of ``z``."""
        if self.method == "forward":
            try:
                return self._dual_pass(vs, self.cache)
            except Mismatch:  # the model called a recorded layer differently: plain dual pass
                self.cache = None
                return self._dual_pass(vs, None)
        pairs = [v for v, live in zip(vs, self.live) if live]
        if not pairs:
            return torch.zeros_like(self.z)
        with torch.enable_grad():
            return torch.autograd.grad(self.jt_u, self.u, pairs, retain_graph=True)[0]

    def _dual_pass(self, vs: list[Tensor], cache: Optional[CachedTangents]) -> Tensor:
        """``J v`` by one dual-tensor forward pass, the cached layers replayed (:mod:`~gradlab.curvature.tangent`)."""
        from torch.func import functional_call

        x = self.op.batches[self.i][0]
        with torch.no_grad(), self.op._batch_context(self.i), fwAD.dual_level():
            duals = {nm: fwAD.make_dual(p.detach(), v) for nm, p, v in zip(self.names, self.params, vs)}
            with cache.replay() if cache is not None else contextlib.nullcontext():
                out = functional_call(self.op.model, duals, (x,))
            tangent = fwAD.unpack_dual(out).tangent
        return torch.zeros_like(self.z) if tangent is None else tangent

    def vjp(self, w: Tensor) -> list[Tensor]:
        """``J^T w`` for ``w`` of the shape of ``z``: one tensor per parameter."""
        with torch.enable_grad():
            out = torch.autograd.grad(self.z, self.params, w, retain_graph=True, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for g, p in zip(out, self.params)]


class OutputCurvatureOperator(ModelOperator):
    """``M = sum_i w_i J_i^T Lambda_i J_i`` over the batches ``i`` (module docstring).

    Subclasses write :meth:`_output_product`. Arguments as for
    :class:`~gradlab.curvature.model_op.ModelOperator`, plus ``keep_graphs`` (keep each batch's
    graphs for the life of the operator; default when there are at most ``MAX_KEPT_GRAPHS`` batches)
    and ``jvp`` (one of :data:`JVP_METHODS`, :class:`Linearization`; None = :func:`default_jvp`).
    """

    def __init__(self, model: nn.Module, loss_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None, data=None, *,
                 mode: str = "eval", params: ParamSpec = None, keep_graphs: Optional[bool] = None, seed: int = 0,
                 jvp: Optional[str] = None):
        if jvp is not None and jvp not in JVP_METHODS:
            raise GradlabError(f"unknown jvp method {jvp!r}; choose from: {', '.join(JVP_METHODS)}")
        super().__init__(model, loss_fn, data, mode=mode, params=params, seed=seed)
        if jvp is None:
            jvp = default_jvp(model) if None not in self.param_names else "double-backward"
        self.jvp_method = jvp
        self.keep_graphs = len(self.batches) <= MAX_KEPT_GRAPHS if keep_graphs is None else keep_graphs
        self._lins: dict[int, Linearization] = {}

    def linearization(self, i: int) -> Linearization:
        """Batch ``i``'s :class:`Linearization` (cached when keeping graphs)."""
        if i in self._lins:
            return self._lins[i]
        lin = Linearization(self, i, self.jvp_method)
        if self.keep_graphs:
            self._lins[i] = lin
        return lin

    def clear(self) -> None:
        """Free the kept graphs (they are rebuilt on the next product)."""
        self._lins.clear()

    @abstractmethod
    def _output_product(self, i: int, z: Tensor, W: Tensor) -> Tensor:
        """``Lambda_i w`` for each of ``k`` output-space vectors ``W`` (k, *z.shape); ``z`` detached."""

    def _matmat(self, V: Tensor) -> Tensor:
        k = V.shape[1]
        out = None
        for i, w in enumerate(self.weights):
            lin = self.linearization(i)
            JV = torch.stack([lin.jvp(self.unflatten(V[:, j])) for j in range(k)])  # (k, *z.shape)
            LJV = self._output_product(i, lin.z.detach(), JV.detach())
            cols = torch.stack([self.flatten(lin.vjp(LJV[j])) for j in range(k)], dim=1)  # (n, k)
            out = cols.mul_(w) if out is None else out.add_(cols, alpha=w)
        return out


class GGNOperator(OutputCurvatureOperator):
    """The generalised Gauss-Newton matrix ``G = J^T (d^2 L / dz^2) J`` of the mean loss.

    ``J`` (N*C, n) is the Jacobian of the outputs ``z`` (N, C) with respect to the chosen
    parameters and ``d^2 L/dz^2`` the Hessian of the loss in the outputs: block-diagonal for a
    loss that is a sum over examples, ``c (diag(p_n) - p_n p_n^T)`` per example for cross-entropy
    (``p_n = softmax(z_n)``, ``c = 1/N`` for the mean) and ``c * 2 I`` for squared error
    (``c = 1/(N C)`` for the mean: :mod:`gradlab.curvature.likelihood`), both in closed form. Any
    other loss (any output shape) gets its exact output Hessian by double backward in ``z``
    (Schraudolph 2002; Martens 2010; Martens 2020).

    Args:
        model, loss_fn, data, mode, params, seed: see :class:`~gradlab.curvature.model_op.ModelOperator`.
        keep_graphs, jvp: see :class:`OutputCurvatureOperator`.

    ``G`` is symmetric ``n x n``, positive semi-definite when the loss is convex in ``z``, and
    equal to the Hessian when ``z`` is linear in the parameters (a linear model). For
    cross-entropy and squared error it is also the true Fisher (:class:`~gradlab.curvature.FisherOperator`
    estimates that by sampling). Nothing is written to ``p.grad``.
    """

    def __init__(self, model: nn.Module, loss_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None, data=None, *,
                 mode: str = "eval", params: ParamSpec = None, keep_graphs: Optional[bool] = None, seed: int = 0,
                 jvp: Optional[str] = None):
        super().__init__(model, loss_fn, data, mode=mode, params=params, keep_graphs=keep_graphs, seed=seed, jvp=jvp)
        self.likelihood = likelihood_of(self.loss_fn)
        self._loss_grads: dict[int, tuple[Tensor, Tensor]] = {}

    def _output_product(self, i: int, z: Tensor, W: Tensor) -> Tensor:
        if self.likelihood is not None and z.dim() == 2:
            return self.likelihood.hessian_product(z, W)
        zl, gz = self._loss_gradient(i, z)
        if not gz.requires_grad:  # a loss linear in z has no output curvature
            return torch.zeros_like(W)
        with torch.enable_grad():
            return torch.stack([torch.autograd.grad(gz, zl, W[j], retain_graph=True)[0] for j in range(W.shape[0])])

    def _loss_gradient(self, i: int, z: Tensor) -> tuple[Tensor, Tensor]:
        """``(z, dL/dz)`` with the graph of ``dL/dz`` kept, for output-Hessian products."""
        if i not in self._loss_grads:
            y = self.batches[i][1]
            with torch.enable_grad():
                zl = z.detach().requires_grad_(True)
                gz = torch.autograd.grad(self.loss_fn(zl, y), zl, create_graph=True)[0]
            self._loss_grads[i] = (zl, gz)
        return self._loss_grads[i]
