"""Directions in weight space for landscape plots.

A direction is a ``dict`` mapping each parameter name of the model (``model.named_parameters()``)
to a tensor of that parameter's shape, so ``theta + x * d`` is formed per parameter without ever
flattening the model. Four kinds:

* :func:`random_directions`: Gaussian directions with filter normalisation (Li, Xu, Taylor,
  Studer, Goldstein, "Visualizing the Loss Landscape of Neural Nets", NeurIPS 2018, Sec. 4):
  each filter ``d_i`` (a row of a Linear weight, an output-channel slice of a conv weight) is
  rescaled to ``||theta_i||``, so a step of 1 along ``d`` is as large as the weights themselves,
  filter by filter, and scale-invariant networks compare fairly. Biases and BatchNorm/LayerNorm
  parameters (every 1-D parameter) are left at zero, as in the paper; ``include_bn=True`` gives
  them a Gaussian direction rescaled to the whole parameter's norm.
* :func:`pca_directions`: the first two principal directions of the training trajectory
  ``theta_t - theta_T`` (Li et al. Sec. 7), orthonormal in the flattened parameter space, with the
  trajectory's coordinates in that plane.
* :func:`eigen_directions`: the top Hessian eigenvectors (unit norm), from the curvature engine.
* :func:`interp_direction`: ``theta_B - theta_A``, the straight line of Goodfellow, Vinyals &
  Saxe, "Qualitatively characterizing neural network optimization problems", ICLR 2015.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from gradlab.core.errors import GradlabError
from gradlab.curvature.sampling import gaussian_like

Direction = dict  # name -> Tensor, the shapes of model.named_parameters()


def weights_of(model: nn.Module) -> dict:
    """The model's parameters as a name -> detached tensor dict (shares storage; no copy)."""
    return {n: p.detach() for n, p in model.named_parameters()}


def flatten(d: Mapping[str, Tensor], names: Sequence[str], dtype=torch.float64) -> Tensor:
    """Concatenate ``d[n]`` for ``n`` in ``names`` into one flat vector (float64 by default)."""
    return torch.cat([d[n].reshape(-1).to(dtype) for n in names])


def unflatten(v: Tensor, like: Mapping[str, Tensor]) -> dict:
    """Split a flat vector into tensors shaped (and typed) like ``like`` (in its key order)."""
    out, i = {}, 0
    for n, t in like.items():
        out[n] = v[i : i + t.numel()].view(t.shape).to(t.dtype)
        i += t.numel()
    if i != v.numel():
        raise ValueError(f"vector of {v.numel()} entries for parameters of {i} entries")
    return out


def dot(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> float:
    """Inner product of two directions, accumulated in float64 (float32 sums drift on big models)."""
    return float(sum((a[n].double() * b[n].double()).sum() for n in a))


def norm(a: Mapping[str, Tensor]) -> float:
    return dot(a, a) ** 0.5


def filter_normalize(direction: Mapping[str, Tensor], weights: Mapping[str, Tensor], include_bn: bool = False) -> dict:
    """Li et al.'s filter normalisation of ``direction`` against ``weights`` (new tensors).

    For a parameter with ``ndim >= 2``, filter ``i`` is ``[i, ...]`` and is rescaled to
    ``||w_i|| / ||d_i||``. A 1-D parameter (bias, BN scale/shift) becomes zero, or with
    ``include_bn`` is rescaled as one filter to the parameter's norm. Norms in float64.
    """
    out = {}
    for n, w in weights.items():
        d = direction[n]
        if w.ndim <= 1:
            if not include_bn:
                out[n] = torch.zeros_like(w)
                continue
            scale = w.double().norm() / d.double().norm().clamp_min(1e-300)
            out[n] = (d.double() * scale).to(w.dtype)
            continue
        wf = w.double().reshape(w.shape[0], -1)
        df = d.double().reshape(d.shape[0], -1)
        scale = wf.norm(dim=1, keepdim=True) / df.norm(dim=1, keepdim=True).clamp_min(1e-300)
        out[n] = (df * scale).reshape(w.shape).to(w.dtype)
    return out


def random_directions(
    model: nn.Module, k: int = 2, *, include_bn: bool = False, generator: Optional[torch.Generator] = None
) -> list:
    """``k`` filter-normalised Gaussian directions for ``model`` (module docstring).

    Sampling uses ``generator`` (CPU) when given, so results do not depend on the global RNG.
    """
    weights = weights_of(model)
    dirs = []
    for _ in range(k):
        g = dict(zip(weights, gaussian_like(list(weights.values()), generator, dtype=torch.float64)))
        dirs.append(filter_normalize(g, weights, include_bn))
    return dirs


def orthogonalize(d: Mapping[str, Tensor], against: Mapping[str, Tensor], *, rescale_to: Optional[float] = None) -> dict:
    """``d`` minus its projection on ``against`` (Gram-Schmidt), optionally rescaled to a norm."""
    coef = dot(d, against) / max(dot(against, against), 1e-300)
    out = {n: (d[n].double() - coef * against[n].double()) for n in d}
    if rescale_to is not None:
        s = rescale_to / max(norm(out), 1e-300)
        out = {n: t * s for n, t in out.items()}
    return {n: t.to(d[n].dtype) for n, t in out.items()}


def interp_direction(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> dict:
    """``b - a`` per parameter: ``a + t * d`` runs from ``a`` (t=0) to ``b`` (t=1)."""
    missing = set(a) ^ set(b)
    if missing:
        raise GradlabError(f"the two weight sets differ in parameters: {sorted(missing)[:5]}")
    for n in a:
        if a[n].shape != b[n].shape:
            raise GradlabError(f"parameter {n!r} has shape {tuple(a[n].shape)} vs {tuple(b[n].shape)}: not the same model")
    return {n: (b[n] - a[n].to(b[n].device)).to(a[n].dtype) for n in a}


def pca_directions(trajectory: Sequence[Mapping[str, Tensor]], final: Mapping[str, Tensor], k: int = 2):
    """Principal directions of ``theta_t - theta_final`` (Li et al. 2018, Sec. 7).

    Args:
        trajectory: saved weight dicts ``theta_0 .. theta_T`` (at least ``k + 1`` distinct).
        final: the weights the plot is centred on.
    Returns:
        ``(directions, coords, explained)``: ``k`` orthonormal directions (float64 SVD, in the
        flattened space), ``coords`` of shape ``(T+1, k)`` = the trajectory projected on them
        (units: parameter-space distance from ``final``), and each direction's share of the
        variance of the (centred) differences.
    """
    names = list(final)
    if len(trajectory) < k + 1:
        raise GradlabError(f"PCA directions need at least {k + 1} saved checkpoints, found {len(trajectory)}")
    M = torch.stack([flatten(t, names) - flatten(final, names) for t in trajectory])  # (T+1, P)
    centred = M - M.mean(dim=0, keepdim=True)
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    if s.numel() < k or s[k - 1] <= 1e-12 * max(float(s[0]), 1e-300):
        raise GradlabError("the saved checkpoints span fewer than 2 directions; keep more checkpoints during training")
    V = vh[:k]  # (k, P), orthonormal rows
    coords = M @ V.T  # (T+1, k)
    explained = (s[:k] ** 2 / (s**2).sum()).tolist()
    like = {n: final[n].double() for n in names}
    dirs = [{n: t.to(final[n].dtype) for n, t in unflatten(V[i], like).items()} for i in range(k)]
    return dirs, coords, explained


def plane_through(vertices: Sequence[Mapping[str, Tensor]]):
    """An orthonormal plane through three weight sets (e.g. three simplex vertices).

    Returns ``(centre, (d1, d2), coords)``: the centroid of the three, an orthonormal basis of the
    plane they span (Gram-Schmidt of ``v1 - v0`` and ``v2 - v0``) and the (3, 2) coordinates of
    the vertices relative to the centroid, in units of parameter-space distance.
    """
    if len(vertices) != 3:
        raise GradlabError(f"a plane needs exactly 3 vertices, got {len(vertices)}")
    names = list(vertices[0])
    flat = [flatten(v, names) for v in vertices]
    centre = (flat[0] + flat[1] + flat[2]) / 3
    u, w = flat[1] - flat[0], flat[2] - flat[0]
    if float(u.norm()) == 0.0:
        raise GradlabError("the first two vertices coincide; no plane through them")
    e1 = u / u.norm()
    w = w - (w @ e1) * e1
    if float(w.norm()) <= 1e-12 * float(u.norm()):
        raise GradlabError("the three vertices are collinear; no plane through them")
    e2 = w / w.norm()
    coords = torch.stack([torch.stack([(f - centre) @ e1, (f - centre) @ e2]) for f in flat])
    ref = {n: vertices[0][n] for n in names}
    to_dict = lambda v: {n: t.to(ref[n].dtype) for n, t in unflatten(v, {n: ref[n].double() for n in names}).items()}  # noqa: E731
    return to_dict(centre), (to_dict(e1), to_dict(e2)), coords


def eigen_directions(model: nn.Module, batches, k: int = 2, *, seed: int = 0, loss_fn=None):
    """The top-``k`` (largest algebraic) Hessian eigenvectors of ``loss_fn`` (default
    cross-entropy), as unit directions.

    Uses the curvature engine (:class:`gradlab.curvature.hessian_op.HessianOperator`, eval mode,
    and its Lanczos ``eigsh``). Returns ``(directions, eigenvalues)``.
    """
    from gradlab.curvature.eigen import eigsh
    from gradlab.curvature.hessian_op import HessianOperator

    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    op = HessianOperator(model, loss_fn, data=list(batches), params=[p for _, p in params])
    res = eigsh(op, k=k, which="LA", seed=seed, return_vectors=True, tol=1e-4)
    vals, vecs = res.values, res.vectors  # (k,), (n, k)
    if not res.converged:
        raise GradlabError("the Hessian eigenvectors did not converge; try more batches or another seed")
    weights = weights_of(model)
    dirs = []
    for i in range(k):
        flat = unflatten(vecs[:, i].to(torch.float64), {n: weights[n].double() for n, _ in params})
        dirs.append({n: flat[n].to(w.dtype) if n in flat else torch.zeros_like(w) for n, w in weights.items()})
    return dirs, [float(v) for v in vals]
