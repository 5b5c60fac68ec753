"""On-manifold attacks: every step confined to a local linear model of the data manifold.

Stutz, Hein & Schiele (CVPR 2019, "Disentangling adversarial robustness and generalization")
show that regular adversarial examples leave the data manifold, and that adversarial examples
constrained to it are, in effect, hard test examples. Without a known manifold they estimate it
locally: the tangent space at ``x`` is spanned by the leading principal directions of ``x``'s
``K`` nearest training examples. :class:`LocalPCA` does that here:

* neighbours: the ``K`` training examples nearest to the clean ``x`` in pixel space (L2);
* local PCA: the SVD ``C = U S V^T`` of the neighbours centred on their mean, ``C`` ``(K, D)``;
* tangent dimension ``d``: ``dim`` if given (capped at the numerical rank of ``C``), else the
  explained-variance rule: the smallest ``d`` whose leading squared singular values hold at least
  ``variance`` of their sum (default 0.9), so ``d`` varies per example and is at most ``K - 1``;
* the tangent space ``T_x = span(V[:, :d])`` (a linear subspace of directions at ``x``) and its
  orthogonal complement, the normal space ``N_x``.

An attack built by :func:`constrained` keeps the perturbation ``delta = x_adv - x`` in ``T_x``
(``space="tangent"``: on-manifold) or in ``N_x`` (``space="normal"``: off-manifold), the way it is
applied in every step:

* the step direction is the projected gradient ``P g`` in the attack's norm (linf: divided by its
  largest entry, so a step of ``alpha`` moves no pixel by more than ``alpha``; l2: unit length),
  an ascent direction (``<P g, g> = ||P g||^2 >= 0``) that lies in the subspace;
* the feasible-set projection maps ``delta`` to ``P delta``, scales it back radially onto the eps
  ball if it lies outside (scaling keeps it in the subspace), then clamps ``x + delta`` to
  [0, 1]. The clamp is the only step that can leave the subspace (a pixel pushed past 0 or 1);
  :func:`manifold_sweep` reports how much it did (``leak``).

Supported: ``fgsm``, ``pgd`` and ``apgd`` (APGD through its ``_geometry`` hook; its random start
and momentum step are combinations of points of the subspace). Shapes: ``(B, *input_shape)`` in
[0, 1]; the training set ``(N, *input_shape)``.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import pandas as pd
import torch
from torch import Tensor

from gradlab.attacks.base import Attack, flat_norm, per_example
from gradlab.core.errors import GradlabError

#: Attacks whose steps the projection applies to.
SUPPORTED = ("fgsm", "pgd", "apgd")
SPACES = ("tangent", "normal")
COLUMNS = ["attack", "eps", "clean_acc", "robust_acc", "robust_on", "robust_off", "tangent_dim", "leak", "n"]


def parse_manifold(spec: str) -> int:
    """``"pca:K"`` -> ``K`` (GradlabError for anything else)."""
    kind, _, k = str(spec).partition(":")
    if kind != "pca" or not k.strip().isdigit() or int(k) < 2:
        raise GradlabError(f"invalid --manifold {spec!r}: expected pca:K with K >= 2 nearest training examples, "
                           f"e.g. pca:50")
    return int(k)


class LocalPCA:
    """Tangent spaces of the data manifold by local PCA of the ``k`` nearest training examples.

    Args:
        x_train: ``(N, *input_shape)``, the examples the manifold is estimated from (N >= k).
        k: neighbours per example.
        dim: tangent dimension (unset: the explained-variance rule with ``variance``).
        variance: fraction of the neighbours' variance the tangent space holds, in (0, 1].
    """

    def __init__(self, x_train: Tensor, k: int, dim: Optional[int] = None, variance: float = 0.9,
                 chunk: int = 256):
        if x_train.shape[0] < k:
            raise GradlabError(f"--manifold pca:{k} needs at least {k} training examples, there are {x_train.shape[0]}")
        if dim is not None and dim < 1:
            raise GradlabError(f"invalid tangent dimension {dim}: must be >= 1")
        if not 0 < variance <= 1:
            raise GradlabError(f"invalid tangent variance {variance}: must be in (0, 1]")
        self.ref = x_train.detach().reshape(x_train.shape[0], -1)
        self.k, self.dim, self.variance, self.chunk = int(k), dim, float(variance), int(chunk)
        self._memo: list = []  # (x, basis) of recent batches: the sweep asks again for each eps

    def neighbours(self, x: Tensor) -> Tensor:
        """Indices ``(b, k)`` of the nearest training examples of ``x`` ``(b, ...)``."""
        q = x.detach().reshape(x.shape[0], -1).to(self.ref.dtype)
        ref = self.ref.to(q.device)
        out = []
        for i in range(0, q.shape[0], self.chunk):
            d = torch.cdist(q[i:i + self.chunk], ref)
            out.append(d.topk(self.k, dim=1, largest=False).indices)
        return torch.cat(out)

    def basis(self, x: Tensor) -> Tensor:
        """Orthonormal tangent bases ``(b, D, d_max)`` at ``x`` (columns past an example's own ``d``
        are zero), in ``x``'s dtype and device."""
        for xm, u in self._memo:
            if xm.shape == x.shape and xm.device == x.device and torch.equal(xm, x):
                return u
        ref = self.ref.to(x.device)
        nb = ref[self.neighbours(x)].double()  # (b, k, D)
        c = nb - nb.mean(dim=1, keepdim=True)
        _, s, vh = torch.linalg.svd(c, full_matrices=False)  # s (b, r), vh (b, r, D)
        var = s**2
        total = var.sum(dim=1, keepdim=True).clamp_min(1e-300)
        rank = (s > s[:, :1] * max(c.shape[1:]) * torch.finfo(torch.float64).eps).sum(dim=1)
        if self.dim is not None:
            d = torch.clamp(rank, max=self.dim)
        else:
            cum = var.cumsum(dim=1) / total
            d = ((cum < self.variance - 1e-12).sum(dim=1) + 1).minimum(rank)
        d = d.clamp_min(1)  # neighbours all equal: d = 1 along an arbitrary direction of norm 1
        d_max = int(d.max())
        keep = torch.arange(d_max, device=x.device)[None, :] < d[:, None]  # (b, d_max)
        u = (vh[:, :d_max].transpose(1, 2) * keep[:, None, :]).to(x.dtype)
        self._memo = [(x.detach().clone(), u), *self._memo[:7]]
        return u


def project_onto(v: Tensor, u: Tensor, space: str = "tangent") -> Tensor:
    """``U U^T v`` (tangent) or ``v - U U^T v`` (normal) per example; ``v`` ``(b, ...)``, ``u`` ``(b, D, d)``."""
    flat = v.reshape(v.shape[0], -1)
    p = torch.bmm(u, torch.bmm(u.transpose(1, 2), flat[:, :, None]))[:, :, 0]
    return (p if space == "tangent" else flat - p).reshape(v.shape)


class _Constrained:
    """Mixin over an attack class: the perturbation stays in the tangent (or normal) space."""

    estimator: LocalPCA
    space: str = "tangent"
    single_step = False  # FGSM's step is projected too, so the call must apply project()

    def perturb(self, x: Tensor, y: Tensor) -> Tensor:
        self._basis = self.estimator.basis(x)
        try:
            return super().perturb(x, y)
        finally:
            self._basis = None

    def _basis_for(self, x0: Tensor) -> Tensor:
        if x0 is self._x0 and getattr(self, "_basis", None) is not None:
            return self._basis
        return self.estimator.basis(x0)

    def _direction(self, g: Tensor, u: Tensor) -> Tensor:
        v = project_onto(g, u, self.space)
        n = flat_norm(v, "linf" if self.norm == "linf" else "l2").to(v.dtype).clamp_min(1e-12)
        return v / per_example(n, v)

    def _constrain(self, x_adv: Tensor, x0: Tensor, u: Tensor) -> Tensor:
        delta = project_onto(x_adv - x0, u, self.space)
        n = flat_norm(delta, self.norm)
        factor = torch.where(n > self.eps, self.eps / n.clamp_min(1e-30), torch.ones_like(n))
        return (x0 + delta * per_example(factor.to(delta.dtype), delta)).clamp(0.0, 1.0)

    def step_direction(self, g: Tensor) -> Tensor:
        return self._direction(g, self._basis_for(self._x0))

    def project(self, x_adv: Tensor, x0: Optional[Tensor] = None) -> Tensor:
        x0 = self._x0 if x0 is None else x0
        return self._constrain(x_adv, x0, self._basis_for(x0))

    def _geometry(self, x: Tensor):  # APGD's hook: a run on the clean rows x
        u = self._basis_for(x)
        return (lambda v: self._constrain(v, x, u)), (lambda g: self._direction(g, u))


_CLASSES: dict = {}


def constrained(name: str, model, eps: float, estimator: LocalPCA, space: str = "tangent", **opts) -> Attack:
    """Attack ``name`` (one of :data:`SUPPORTED`) whose perturbation stays in the ``space`` of
    ``estimator``'s local tangent spaces (see the module docstring)."""
    from gradlab.attacks import ATTACKS

    if name not in SUPPORTED:
        raise GradlabError(f"--manifold works with the attacks {', '.join(SUPPORTED)}, not {name!r}")
    if space not in SPACES:
        raise GradlabError(f"invalid space {space!r}: choose from {', '.join(SPACES)}")
    base = ATTACKS.entry(name).obj
    if base not in _CLASSES:
        _CLASSES[base] = type(f"{base.__name__}OnManifold", (_Constrained, base), {})
    attack = _CLASSES[base](model, eps, **opts)
    attack.estimator, attack.space = estimator, space
    return attack


def manifold_sweep(model, x: Tensor, y: Tensor, attack_name: str, eps_list: Sequence[float], estimator: LocalPCA,
                   batch_size: int = 256, progress: Optional[Callable[[float, int, int], None]] = None,
                   **opts) -> pd.DataFrame:
    """Robust accuracy of attack ``attack_name`` unconstrained, on-manifold (tangent space) and
    off-manifold (normal space) at each eps: one row per eps with the columns :data:`COLUMNS`.

    ``tangent_dim`` is the mean tangent dimension ``d``; ``leak`` the mean over examples of
    ``||(I - U U^T) delta||_2 / ||delta||_2`` of the on-manifold perturbations (0 when the [0, 1]
    clamp never bound; examples with ``delta = 0`` count 0).
    """
    from gradlab.attacks import build_attack
    from gradlab.core.modelstate import model_state

    device = next(iter(list(model.parameters()) + list(model.buffers())), torch.zeros(0)).device
    x, y = x.detach().cpu(), y.detach().cpu().long()
    n = x.shape[0]

    def accuracy(batches) -> float:
        with torch.no_grad(), model_state(model, train=False):
            return sum(int((model(a.to(device)).argmax(1).cpu() == b).sum()) for a, b in batches) / n

    chunks = [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, n, batch_size)]
    clean = accuracy(chunks)
    dims = torch.cat([(estimator.basis(a.to(device)).abs().sum(1) > 0).sum(1).cpu() for a, _ in chunks])
    rows = []
    for eps in eps_list:
        plain = build_attack(attack_name, model, eps, **opts)
        on = constrained(attack_name, model, eps, estimator, "tangent", **opts)
        off = constrained(attack_name, model, eps, estimator, "normal", **opts)
        adv = {"plain": [], "on": [], "off": []}
        leak = []
        for j, (a, b) in enumerate(chunks):
            a, b = a.to(device), b.to(device)
            for key, attack in (("plain", plain), ("on", on), ("off", off)):
                adv[key].append((attack(a, b).cpu(), b.cpu()))
            delta = adv["on"][-1][0] - a.cpu()
            normal = project_onto(delta.to(device), estimator.basis(a), "normal").cpu()
            size = flat_norm(delta, "l2")
            leak.append(torch.where(size > 0, flat_norm(normal, "l2") / size.clamp_min(1e-30), torch.zeros_like(size)))
            if progress is not None:
                progress(eps, min((j + 1) * batch_size, n), n)
        rows.append({"attack": attack_name, "eps": float(eps), "clean_acc": clean,
                     "robust_acc": accuracy(adv["plain"]), "robust_on": accuracy(adv["on"]),
                     "robust_off": accuracy(adv["off"]), "tangent_dim": dims.double().mean().item(),
                     "leak": torch.cat(leak).mean().item(), "n": n})
    return pd.DataFrame(rows, columns=COLUMNS)


__all__ = ["COLUMNS", "LocalPCA", "SUPPORTED", "constrained", "manifold_sweep", "parse_manifold", "project_onto"]
