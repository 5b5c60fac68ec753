"""The true Fisher (Monte Carlo) and the empirical Fisher: two different matrices, named apart.

With the loss read as a negative log-likelihood ``L = c sum_n l_n``, ``l_n = -log p(y | x_n)``
(:mod:`gradlab.curvature.likelihood`), and ``g_n(y) = d l_n(y) / d theta``:

* the **Fisher information** (the "true" Fisher) averages over labels drawn from the *model*:
  ``F = c sum_n E_{y ~ p(y|x_n)}[g_n(y) g_n(y)^T]``. It is the metric of the natural gradient
  (Amari 1998) and, for cross-entropy and squared error, equals the Gauss-Newton matrix
  (Martens 2020, section 9.2). :class:`FisherOperator` estimates it by Monte Carlo:
  ``mc_samples`` labels per example drawn once from a seeded generator, so the operator is one
  fixed symmetric PSD matrix that every solver can use; as ``mc_samples`` grows it converges to
  the :class:`~gradlab.curvature.GGNOperator`.
* the **empirical Fisher** uses the *observed* labels: ``EF = c sum_n g_n(y_n) g_n(y_n)^T``.
  It is not the Fisher: it is a different matrix, equal to the Fisher only when the model's
  predictive distribution matches the data, and it can be a poor curvature proxy (Kunstner,
  Balles & Hennig 2019, "Limitations of the empirical Fisher approximation for natural gradient
  descent"). Adam's second moment and many "Fisher" pruning scores are this matrix.

Both are ``J^T Lambda J`` with ``Lambda_n = c * (1/M) sum_m s_m s_m^T`` built from output
gradients ``s`` (N, C) (:class:`~gradlab.curvature.ggn.OutputCurvatureOperator`). The empirical
Fisher is also computed, by default when it fits in memory, from per-example parameter gradients
``R`` (N, n) (``torch.func.vmap`` over ``grad``, in chunks): then ``EF v = R^T (R v)`` is two
matrix products with no pass through the network.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from gradlab.core.errors import GradlabError
from gradlab.curvature.ggn import OutputCurvatureOperator
from gradlab.curvature.likelihood import check_outputs, require_likelihood
from gradlab.curvature.params import ParamSpec
from gradlab.curvature.sampling import make_generator

EF_BACKENDS = ("per-example", "jacobian")

#: The per-example backend stores ``num_samples x n`` gradient entries; above this the empirical
#: Fisher falls back to products through the network (``backend="jacobian"``).
MAX_PER_EXAMPLE_ENTRIES = 2**26


def _outer_product(S: Tensor, W: Tensor, factor: float) -> Tensor:
    """``factor / M * sum_m s_m (s_m . w)`` per example: S (M, N, C), W (k, N, C) -> (k, N, C)."""
    coef = torch.einsum("mnc,knc->kmn", S, W)
    return torch.einsum("kmn,mnc->knc", coef, S) * (factor / S.shape[0])


class FisherOperator(OutputCurvatureOperator):
    """The true Fisher ``F = c sum_n E_{y ~ p(y|x_n)}[g_n g_n^T]``, Monte Carlo over model labels.

    ``F ~ J^T Lambda J`` with ``Lambda_n = c/M sum_m s_nm s_nm^T``, ``s_nm = d l_n / d z_n`` at a
    label ``y_nm`` drawn from the model (cross-entropy: ``y ~ softmax(z_n)``, ``s = p - e_y``;
    squared error: ``y ~ N(z_n, I/2)``, ``s = 2 (z - y)``). Unbiased for every ``mc_samples``;
    the labels are drawn once, at the first product, from ``make_generator(seed)``, so the
    matrix is fixed. Module docstring: how it differs from :class:`EmpiricalFisherOperator`.

    Args:
        model, loss_fn, data, mode, params, keep_graphs: see :class:`~gradlab.curvature.GGNOperator`;
            the loss must be cross-entropy or squared error and the outputs (N, C).
        mc_samples: labels drawn per example (>= 1).
        seed: seeds the labels (and train-mode dropout).
    Paper: Amari 1998; Martens 2020 ("New insights and perspectives on the natural gradient method").
    """

    def __init__(self, model: nn.Module, loss_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None, data=None, *,
                 mc_samples: int = 1, mode: str = "eval", params: ParamSpec = None,
                 keep_graphs: Optional[bool] = None, seed: int = 0):
        if not isinstance(mc_samples, int) or mc_samples < 1:
            raise GradlabError(f"invalid mc_samples: {mc_samples} (must be an integer >= 1)")
        super().__init__(model, loss_fn, data, mode=mode, params=params, keep_graphs=keep_graphs, seed=seed)
        self.likelihood = require_likelihood(self.loss_fn, "the Fisher")
        self.mc_samples = mc_samples
        self._generator = make_generator(seed)
        self._samples: dict[int, Tensor] = {}

    def sampled_output_gradients(self, i: int) -> Tensor:
        """Batch ``i``'s ``s`` (M, N, C), drawn on first use (batches are first used in order)."""
        if i not in self._samples:
            z = self.linearization(i).z.detach()
            check_outputs(z, "the Fisher")
            self._samples[i] = self.likelihood.sampled_gradients(z, self.mc_samples, self._generator)
        return self._samples[i]

    def _output_product(self, i: int, z: Tensor, W: Tensor) -> Tensor:
        return _outer_product(self.sampled_output_gradients(i), W, self.likelihood.factor(z))


class EmpiricalFisherOperator(OutputCurvatureOperator):
    """The empirical Fisher ``EF = c sum_n g_n(y_n) g_n(y_n)^T`` at the observed labels.

    Not the Fisher information (module docstring; Kunstner et al. 2019): it uses the data's
    labels, not the model's, and is rank at most ``N``.

    Args:
        model, loss_fn, data, mode, params, keep_graphs, seed: see :class:`~gradlab.curvature.GGNOperator`;
            the loss must be cross-entropy (hard or soft labels) or squared error.
        backend: ``"per-example"``: the per-example gradients ``R`` (num_samples, n), scaled by
            ``sqrt(c w_i)``, from ``torch.func.vmap(grad)`` over ``chunk_size`` examples at a
            time, so ``EF v = R^T (R v)``; needs eval mode, registered parameters and examples
            that the model treats independently. ``"jacobian"``: ``J^T Lambda J`` through the
            network with ``Lambda_n = c s_n s_n^T``, ``s_n = d l_n / d z_n``. Default: per-example
            when ``num_samples * n <= MAX_PER_EXAMPLE_ENTRIES`` and mode is eval.
        chunk_size: examples per vmapped gradient call (memory of that many gradients at once).
    """

    def __init__(self, model: nn.Module, loss_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None, data=None, *,
                 backend: Optional[str] = None, chunk_size: int = 64, mode: str = "eval", params: ParamSpec = None,
                 keep_graphs: Optional[bool] = None, seed: int = 0):
        if backend is not None and backend not in EF_BACKENDS:
            raise GradlabError(f"unknown empirical Fisher backend {backend!r}; choose from: {', '.join(EF_BACKENDS)}")
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise GradlabError(f"invalid chunk_size: {chunk_size} (must be an integer >= 1)")
        super().__init__(model, loss_fn, data, mode=mode, params=params, keep_graphs=keep_graphs, seed=seed)
        self.likelihood = require_likelihood(self.loss_fn, "the empirical Fisher")
        if backend is None:
            fits = self.num_samples * self.n <= MAX_PER_EXAMPLE_ENTRIES
            backend = "per-example" if fits and mode == "eval" and None not in self.param_names else "jacobian"
        if backend == "per-example" and mode != "eval":
            raise GradlabError("the per-example empirical Fisher needs mode 'eval' (train mode couples a batch's "
                               "examples through BatchNorm); use backend 'jacobian'")
        self.backend, self.chunk_size = backend, chunk_size
        self._rows: Optional[Tensor] = None
        self._grads: dict[int, Tensor] = {}

    def _output_product(self, i: int, z: Tensor, W: Tensor) -> Tensor:
        if i not in self._grads:
            check_outputs(z, "the empirical Fisher")
            self._grads[i] = self.likelihood.output_gradients(z, self.batches[i][1]).unsqueeze(0)  # (1, N, C)
        return _outer_product(self._grads[i], W, self.likelihood.factor(z))

    def per_example_gradients(self) -> Tensor:
        """``R`` (num_samples, n): row ``n`` is ``sqrt(c w_i) d l_n / d theta``, so ``EF = R^T R``."""
        if self._rows is None:
            self._rows = torch.cat([self._batch_rows(i) for i in range(len(self.batches))])
        return self._rows

    def _batch_rows(self, i: int) -> Tensor:
        from torch.func import functional_call, grad, vmap

        x, y = self.batches[i]
        names = self.registered_names("the per-example empirical Fisher")
        primals = {nm: p.detach() for nm, p in zip(names, self.params)}
        lik = self.likelihood

        def nll_one(pd, xi, yi):
            return lik.nll(functional_call(self.model, pd, (xi.unsqueeze(0),)), yi.unsqueeze(0))

        per_example = vmap(grad(nll_one), in_dims=(None, 0, 0))
        rows = []
        with self._batch_context(i):
            with torch.no_grad():
                z = self.model(x[: min(len(x), 2)])  # the output shape fixes the reduction factor
            check_outputs(z, "the empirical Fisher")
            factor = lik.factor(torch.empty(len(x), z.shape[1]))
            for s in range(0, len(x), self.chunk_size):
                g = per_example(primals, x[s : s + self.chunk_size], y[s : s + self.chunk_size])
                rows.append(torch.cat([g[nm].reshape(g[nm].shape[0], -1) for nm in names], dim=1))
        return torch.cat(rows).mul_(math.sqrt(factor * self.weights[i]))

    def _matmat(self, V: Tensor) -> Tensor:
        if self.backend == "jacobian":
            return super()._matmat(V)
        R = self.per_example_gradients()
        return R.T @ (R @ V)
