"""The true Fisher (Monte Carlo) and the empirical Fisher: two different matrices, named apart.

With the loss read as a negative log-likelihood ``L = c sum_n l_n``, ``l_n = -log p(y | x_n)``
(:mod:`gradlab.curvature.likelihood`), and ``g_n(y) = d l_n(y) / d theta``:

* the **Fisher information** (the "true" Fisher) averages over labels drawn from the *model*:
  ``F = c sum_n E_{y ~ p(y|x_n)}[g_n(y) g_n(y)^T]``. It is the metric of the natural gradient
  (Amari 1998) and, for cross-entropy and squared error, equals the Gauss-Newton matrix
  (Martens 2020). :class:`FisherOperator` estimates it by Monte Carlo:
  ``mc_samples`` labels per example drawn once from a seeded generator, so the operator is one
  fixed symmetric PSD matrix that every solver can use; as ``mc_samples`` grows it converges to
  the :class:`~gradlab.curvature.GGNOperator`.
* the **empirical Fisher** uses the *observed* labels: ``EF = c sum_n g_n(y_n) g_n(y_n)^T``.
  It is not the Fisher: it is a different matrix, equal to the Fisher only when the model's
  predictive distribution matches the data, and it can be a poor curvature proxy (Kunstner,
  Balles & Hennig 2019, "Limitations of the empirical Fisher approximation for natural gradient
  descent").

Both are sums of outer products of per-example gradients at given labels (``M`` labels per
example: the Fisher's samples, or the one observed label), computed one of two ways
(``backend``):

* ``"per-example"``: the gradients ``R`` (N M, n), each row ``sqrt(c / M) g_n(y_nm)``, from
  ``torch.func.vmap`` over ``grad`` in chunks (:mod:`gradlab.curvature.per_example`); then ``F v = R^T (R v)`` is two matrix products
  with no pass through the network (the default when ``M <= MAX_PER_EXAMPLE_SAMPLES``, the rows
  fit in ``MAX_PER_EXAMPLE_ENTRIES`` and the mode is eval);
* ``"jacobian"``: ``J^T Lambda J`` with ``Lambda_n = (c / M) sum_m s_nm s_nm^T`` from the output
  gradients ``s_nm = d l_n(y_nm) / d z_n`` (:class:`~gradlab.curvature.ggn.OutputCurvatureOperator`),
  two passes per product whatever ``M``.

Both backends draw the same labels from the same seed, so they are the same matrix.
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

BACKENDS = ("per-example", "jacobian")

#: The per-example backend stores ``N M x n`` gradient entries; above this it is not the default.
MAX_PER_EXAMPLE_ENTRIES = 2**26
#: Above this many labels per example the per-example gradients cost more than typical solves save.
MAX_PER_EXAMPLE_SAMPLES = 8


def _outer_product(S: Tensor, W: Tensor, factor: float) -> Tensor:
    """``factor / M * sum_m s_m (s_m . w)`` per example: S (M, N, C), W (k, N, C) -> (k, N, C)."""
    coef = torch.einsum("mnc,knc->kmn", S, W)
    return torch.einsum("kmn,mnc->knc", coef, S) * (factor / S.shape[0])


class GradientOuterProducts(OutputCurvatureOperator):
    """``c / M sum_n sum_m g_n(y_nm) g_n(y_nm)^T`` for labels given by :meth:`labels` (module docstring).

    Args:
        model, loss_fn, data, mode, params, keep_graphs, seed, jvp: see :class:`~gradlab.curvature.GGNOperator`;
            the loss must be cross-entropy (hard or soft labels) or squared error, outputs (N, C).
        backend: ``"per-example"`` or ``"jacobian"``; None chooses (module docstring). The
            per-example one needs eval mode, registered parameters and examples that the model
            treats independently.
        chunk_size: examples per vmapped gradient call (memory of that many gradients at once).
    """

    what = "the Fisher"

    def __init__(self, model: nn.Module, loss_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None, data=None, *,
                 backend: Optional[str] = None, chunk_size: int = 64, mode: str = "eval", params: ParamSpec = None,
                 keep_graphs: Optional[bool] = None, seed: int = 0, jvp: Optional[str] = None,
                 samples_per_example: int = 1):
        if backend is not None and backend not in BACKENDS:
            raise GradlabError(f"unknown {self.what} backend {backend!r}; choose from: {', '.join(BACKENDS)}")
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise GradlabError(f"invalid chunk_size: {chunk_size} (must be an integer >= 1)")
        super().__init__(model, loss_fn, data, mode=mode, params=params, keep_graphs=keep_graphs, seed=seed, jvp=jvp)
        self.likelihood = require_likelihood(self.loss_fn, self.what)
        if backend is None:
            fits = self.num_samples * samples_per_example * self.n <= MAX_PER_EXAMPLE_ENTRIES
            per_example = fits and samples_per_example <= MAX_PER_EXAMPLE_SAMPLES and mode == "eval"
            backend = "per-example" if per_example and None not in self.param_names else "jacobian"
        if backend == "per-example" and mode != "eval":
            raise GradlabError(f"per-example gradients of {self.what} need mode 'eval' (train mode couples a "
                               f"batch's examples through BatchNorm); use backend 'jacobian'")
        self.backend, self.chunk_size = backend, chunk_size
        self._labels: dict[int, tuple[Tensor, Tensor]] = {}
        self._grads: dict[int, Tensor] = {}
        self._rows: Optional[Tensor] = None

    def labels(self, i: int, z: Tensor) -> Tensor:
        """Batch ``i``'s labels (M, N) or (M, N, C), given its outputs ``z`` (N, C)."""
        raise NotImplementedError

    def batch_labels(self, i: int) -> tuple[Tensor, Tensor]:
        """``(z, labels)`` of batch ``i``, computed once (batches are first used in order)."""
        if i not in self._labels:
            with torch.no_grad(), self._batch_context(i):
                z = self.model(self.batches[i][0])
            check_outputs(z, self.what)
            self._labels[i] = (z, self.labels(i, z))
        return self._labels[i]

    def _output_product(self, i: int, z: Tensor, W: Tensor) -> Tensor:
        if i not in self._grads:
            self._grads[i] = torch.stack([self.likelihood.output_gradients(z, lab) for lab in self.batch_labels(i)[1]])
        return _outer_product(self._grads[i], W, self.likelihood.factor(z))

    def per_example_gradients(self) -> Tensor:
        """``R`` (num_samples M, n) with ``R^T R`` this matrix: rows ``sqrt(c w_i / M) g_n(y_nm)``."""
        if self._rows is None:
            self._rows = torch.cat([self._batch_rows(i) for i in range(len(self.batches))])
        return self._rows

    def _batch_rows(self, i: int) -> Tensor:
        from gradlab.curvature.per_example import per_example_grads_vmap

        names = self.registered_names(f"per-example gradients of {self.what}")
        lik = self.likelihood
        z, labels = self.batch_labels(i)
        m = labels.shape[0]
        x = self.batches[i][0].repeat(m, *([1] * (self.batches[i][0].dim() - 1)))  # (M N, ...): sample-major
        y = labels.reshape(m * z.shape[0], *labels.shape[2:])
        with self._batch_context(i):
            g = per_example_grads_vmap(self.model, lik.nll, x, y, dict(zip(names, self.params)), self.chunk_size)
        rows = torch.cat([g[nm].reshape(len(x), -1) for nm in names], dim=1)
        return rows.mul_(math.sqrt(lik.factor(z) * self.weights[i] / m))

    def _matmat(self, V: Tensor) -> Tensor:
        if self.backend == "jacobian":
            return super()._matmat(V)
        R = self.per_example_gradients()
        return R.T @ (R @ V)


class FisherOperator(GradientOuterProducts):
    """The true Fisher ``F = c sum_n E_{y ~ p(y|x_n)}[g_n g_n^T]``, Monte Carlo over model labels.

    ``F ~ (c/M) sum_n sum_m g_n(y_nm) g_n(y_nm)^T`` with ``y_nm`` drawn from the model
    (cross-entropy: ``y ~ softmax(z_n)``; squared error: ``y ~ N(z_n, I/2)``): unbiased for every
    ``mc_samples``, positive semi-definite, rank at most ``N M``. The labels are drawn once per
    batch, at its first use, from ``make_generator(seed)``, so the matrix is fixed. Module
    docstring: how it differs from :class:`EmpiricalFisherOperator`, and the backends.

    Args:
        model, loss_fn, data, mode, params, keep_graphs, jvp, backend, chunk_size: see
            :class:`GradientOuterProducts`.
        mc_samples: labels drawn per example (>= 1).
        seed: seeds the labels (and train-mode dropout).
    Paper: Amari 1998; Martens 2020 ("New insights and perspectives on the natural gradient method").
    """

    what = "the Fisher"

    def __init__(self, model: nn.Module, loss_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None, data=None, *,
                 mc_samples: int = 1, backend: Optional[str] = None, chunk_size: int = 64, mode: str = "eval",
                 params: ParamSpec = None, keep_graphs: Optional[bool] = None, seed: int = 0,
                 jvp: Optional[str] = None):
        if not isinstance(mc_samples, int) or mc_samples < 1:
            raise GradlabError(f"invalid mc_samples: {mc_samples} (must be an integer >= 1)")
        super().__init__(model, loss_fn, data, backend=backend, chunk_size=chunk_size, mode=mode, params=params,
                         keep_graphs=keep_graphs, seed=seed, jvp=jvp, samples_per_example=mc_samples)
        self.mc_samples = mc_samples
        self._generator = make_generator(seed)

    def labels(self, i: int, z: Tensor) -> Tensor:
        return self.likelihood.sample_labels(z, self.mc_samples, self._generator)


class EmpiricalFisherOperator(GradientOuterProducts):
    """The empirical Fisher ``EF = c sum_n g_n(y_n) g_n(y_n)^T`` at the observed labels.

    Not the Fisher information (module docstring; Kunstner et al. 2019): it uses the data's
    labels, not the model's, and is rank at most ``N``. Arguments: see :class:`GradientOuterProducts`.
    """

    what = "the empirical Fisher"

    def labels(self, i: int, z: Tensor) -> Tensor:
        return self.batches[i][1].unsqueeze(0)
