"""The loss as a negative log-likelihood: what the Gauss-Newton, Fisher and K-FAC operators need of it.

A loss over a batch of ``N`` outputs ``z`` (N, C) is read as ``L = c * sum_n l_n`` with
``l_n = -log p(y_n | z_n)`` up to a constant, and ``c`` the reduction factor:

* cross-entropy (``F.cross_entropy``, ``nn.CrossEntropyLoss`` without class weights or label
  smoothing): ``p = softmax(z)`` categorical, ``l_n = -log p_{y_n}``; ``c = 1/N`` for
  ``reduction="mean"``, 1 for ``"sum"``. Output gradient ``p - e_y``, output Hessian
  ``diag(p) - p p^T``.
* mean squared error (``F.mse_loss``, ``nn.MSELoss``): ``l_n = |z_n - y_n|^2``, the Gaussian
  ``N(z_n, I/2)`` up to a constant; ``c = 1/(N C)`` for ``"mean"`` (the mean runs over all
  ``N C`` entries), 1 for ``"sum"``. Output gradient ``2 (z - y)``, output Hessian ``2 I``.
  gradlab's ``--loss mse`` (:func:`gradlab.core.losses.mse_one_hot`: integer labels as one-hot
  targets, summed over classes, mean over examples) is the reduction ``"example-mean"``,
  ``c = 1/N``.

This is the convention of curvlinops and BackPACK, under which the true Fisher equals the
Gauss-Newton matrix for both losses (canonical links; Martens 2020, "New insights and
perspectives on the natural gradient method"), so the operators can be compared.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradlab.core.errors import GradlabError
from gradlab.core.losses import mse_one_hot, one_hot_target

KINDS = ("cross-entropy", "mse")
SUPPORTED = ("F.cross_entropy, nn.CrossEntropyLoss, F.mse_loss, nn.MSELoss or gradlab's mse_one_hot "
             "(reduction mean or sum)")


@dataclass(frozen=True)
class Likelihood:
    """One of :data:`KINDS` with its reduction (``"mean"`` or ``"sum"``)."""

    kind: str
    reduction: str

    def factor(self, z: Tensor) -> float:
        """The reduction factor ``c`` for outputs ``z`` (N, C)."""
        if self.reduction == "sum":
            return 1.0
        if self.reduction == "example-mean":
            return 1.0 / z.shape[0]
        return 1.0 / (z.shape[0] * (z.shape[1] if self.kind == "mse" else 1))

    def nll(self, z: Tensor, y: Tensor) -> Tensor:
        """``sum_n l_n`` (no reduction factor) for outputs ``z`` (N, C); soft labels allowed for
        cross-entropy (float ``y`` of shape (N, C))."""
        if self.kind == "cross-entropy":
            return F.cross_entropy(z, y, reduction="sum")
        return (z - one_hot_target(z, y)).pow(2).sum()

    def output_gradients(self, z: Tensor, y: Tensor) -> Tensor:
        """``d l_n / d z_n`` for the given labels, (N, C)."""
        if self.kind == "cross-entropy":
            p = z.softmax(-1)
            target = y if y.is_floating_point() else F.one_hot(y, z.shape[1]).to(z.dtype)
            return p - target
        return 2 * (z - one_hot_target(z, y))

    def sample_labels(self, z: Tensor, mc_samples: int, generator: torch.Generator) -> Tensor:
        """Labels drawn from the model, ``y ~ p(y | z_n)``: (M, N) classes for cross-entropy,
        (M, N, C) targets ``z + eps``, ``eps ~ N(0, I/2)``, for squared error.

        Draws on the generator's device (CPU unless given a CUDA generator), so a seed gives
        the same labels on every device."""
        zc = z.detach().to(generator.device)
        if self.kind == "cross-entropy":
            labels = torch.multinomial(zc.softmax(-1), mc_samples, replacement=True, generator=generator).T
        else:
            eps = torch.randn((mc_samples, *zc.shape), generator=generator, dtype=zc.dtype, device=zc.device)
            labels = zc.unsqueeze(0) + math.sqrt(0.5) * eps
        return labels.to(z.device)

    def sampled_gradients(self, z: Tensor, mc_samples: int, generator: torch.Generator) -> Tensor:
        """``d l_n / d z_n`` at labels from :meth:`sample_labels`: (M, N, C)."""
        labels = self.sample_labels(z, mc_samples, generator)
        return torch.stack([self.output_gradients(z, lab) for lab in labels])

    def hessian_factor(self, z: Tensor) -> Tensor:
        """``S`` (K, N, C) with ``sum_k S[k, n] S[k, n]^T = d^2 l_n / d z_n^2`` (no factor ``c``).

        Cross-entropy: ``S[k, n] = sqrt(p_k) (e_k - p)``, so ``sum_k`` gives ``diag(p) - p p^T``;
        MSE: ``S[k] = sqrt(2) e_k``."""
        c = z.shape[1]
        eye = torch.eye(c, dtype=z.dtype, device=z.device)
        if self.kind == "cross-entropy":
            p = z.softmax(-1)
            return p.T.sqrt().unsqueeze(2) * (eye.unsqueeze(1) - p.unsqueeze(0))
        return math.sqrt(2.0) * eye.unsqueeze(1).expand(c, z.shape[0], c)

    def hessian_product(self, z: Tensor, w: Tensor) -> Tensor:
        """``c * (d^2 l_n / d z_n^2) w_n`` for every example, (N, C): the Hessian of ``L`` in ``z``."""
        if self.kind == "cross-entropy":
            p = z.softmax(-1)
            out = p * w - p * (p * w).sum(-1, keepdim=True)
        else:
            out = 2 * w
        return out * self.factor(z)


def likelihood_of(loss_fn) -> Optional[Likelihood]:
    """The :class:`Likelihood` of a supported loss function, else None."""
    reduction = "mean"
    if isinstance(loss_fn, functools.partial) and not loss_fn.args and set(loss_fn.keywords) <= {"reduction"}:
        reduction = loss_fn.keywords.get("reduction", "mean")
        loss_fn = loss_fn.func
    if loss_fn is mse_one_hot:
        return Likelihood("mse", "example-mean" if reduction == "mean" else reduction) if reduction in ("mean", "sum") else None
    if loss_fn is F.cross_entropy or loss_fn is F.mse_loss:
        kind = "cross-entropy" if loss_fn is F.cross_entropy else "mse"
    elif isinstance(loss_fn, nn.CrossEntropyLoss) and loss_fn.weight is None and loss_fn.label_smoothing == 0:
        kind, reduction = "cross-entropy", loss_fn.reduction
    elif isinstance(loss_fn, nn.MSELoss):
        kind, reduction = "mse", loss_fn.reduction
    else:
        return None
    return Likelihood(kind, reduction) if reduction in ("mean", "sum") else None


def require_likelihood(loss_fn, what: str) -> Likelihood:
    """:func:`likelihood_of` or a :class:`GradlabError` naming the supported losses."""
    lik = likelihood_of(loss_fn)
    if lik is None:
        name = getattr(loss_fn, "__name__", type(loss_fn).__name__)
        raise GradlabError(f"{what} needs a loss that is a log-likelihood; got {name}; use {SUPPORTED}")
    return lik


def check_outputs(z: Tensor, what: str) -> None:
    """The Fisher and K-FAC operators read the outputs as (N, C)."""
    if z.dim() != 2:
        raise GradlabError(f"{what} needs model outputs of shape (N, C), got {tuple(z.shape)}")
