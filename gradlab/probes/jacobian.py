"""Input-output and per-layer Jacobian spectra: dynamical isometry, per example.

For a batch ``x`` (B, *input_shape) the probe takes, for every example separately (never summed
over the batch):

* the end-to-end Jacobian ``J = d logits / d h0`` (shape (m, n) = (classes, input numel)), where
  ``h0 = normalize(x)`` is the input after the model's fixed normalisation layer, so the spectrum
  describes the network itself; ``pixel_space=True`` takes it w.r.t. the raw [0, 1] input
  (``J_pixel = J diag(1/std)``);
* per-layer Jacobians ``J_l = d h_{l+1} / d h_l`` of every block of a GradlabNet and its head
  (layer-to-layer maps of an MLP, block-to-block maps of a ResNet or its plain twin).

For each map it returns the singular values and the statistics of the dynamical-isometry
literature (Saxe et al. 2014, "Exact solutions to the nonlinear dynamics of learning in deep
linear networks"; Pennington, Schoenholz & Ganguli 2017, "Resurrecting the sigmoid in deep
learning through dynamical isometry"): mean and variance of the squared singular values, max
(= spectral norm) and min singular value, condition number and the fraction of singular values
within 10% of 1. Per layer it adds the spectral radius ``max |eig(J_l)|`` where ``J_l`` is
square, and the cumulative product of spectral norms ``prod_{j<=l} ||J_j||_2``: an upper bound
on the end-to-end norm that grows or shrinks exponentially with depth unless every factor is ~1
(a residual block ``I + eps*A`` keeps its factor near 1).

Every statistic is computed per example over its ``r = min(m, n)`` singular values and then
averaged over the examples. Singular values are unitless (output units per input unit).

Methods. ``dense``: ``vmap`` over a one-hot basis of a VJP (m <= n, as ``jacrev``) or a JVP
(m > n, as ``jacfwd``) of the batched map, then ``svdvals`` (or the eigenvalues of the small
Gram matrix when J is very rectangular): all r singular values. ``lanczos``: the top ``k``
singular values from the curvature engine's batched Lanczos iteration with full
reorthogonalisation (:func:`gradlab.curvature.batched.batched_lanczos`; Lanczos 1950; Golub &
Van Loan, Matrix Computations, 4th ed., sec. 10.1) on the Gram matrix ``G = J^T J`` (or
``J J^T``, whichever is smaller), applied matrix-free as a Jacobian-vector product followed by a vector-Jacobian product
of the batched map (block-diagonal over examples, so one product serves all examples at once).
In that mode the moments ``tr(G)/r`` and ``tr(G^2)/r`` are Hutchinson estimates (Hutchinson
1990) and the statistics that need the whole spectrum (min, condition number, fraction near 1,
spectral radius) are NaN. ``auto`` picks ``dense`` while ``B * m * n <= max_dense``.

The model is run in eval mode (per-example maps are only defined without batch statistics) and
its training flags are restored afterwards; no parameter or ``.grad`` is touched. In eval mode a
zoo model treats examples independently, so the batched map's Jacobian is block-diagonal: both
paths differentiate the batched map once for all examples (a model that mixes examples inside
its forward pass in eval mode is outside this probe's contract).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.func import jvp, vjp, vmap

from gradlab.curvature.batched import batched_lanczos
from gradlab.core.errors import GradlabError
from gradlab.models.base import GradlabNet
from gradlab.probes import PROBES
from gradlab.probes.gradnorm import DEFAULT_THRESHOLD, select_layers, verdict_from_rate

METHODS = ("auto", "dense", "lanczos")
INPUT_OUTPUT = "input-output"
NEAR_ONE = 0.1  # "within 10% of 1"

SUMMARY_COLUMNS = [
    "layer", "depth", "in_dim", "out_dim", "method", "n_sv", "mean_sq_sv", "var_sq_sv", "max_sv",
    "min_sv", "condition_number", "frac_near_one", "spectral_radius", "cum_spectral_norm", "converged",
]


@dataclass
class LayerSpectrum:
    """Spectra of one map for every example.

    ``singular_values`` (B, r_or_k) float64, descending; ``spectral_radius`` (B,) or None;
    ``moments`` (B, 2) = per-example (tr G / r, tr G^2 / r) Hutchinson estimates in Lanczos mode,
    None when dense; ``jacobian`` (B, m, n) only when asked for (``keep_jacobians``).
    """

    name: str
    depth: Optional[int]  # block index (head = number of blocks); None for the input-output map
    in_dim: int
    out_dim: int
    method: str
    singular_values: Tensor = field(repr=False)
    converged: bool = True
    iterations: int = 0
    spectral_radius: Optional[Tensor] = field(default=None, repr=False)
    moments: Optional[Tensor] = field(default=None, repr=False)
    jacobian: Optional[Tensor] = field(default=None, repr=False)

    @property
    def full(self) -> bool:
        return self.method == "dense"

    def stats(self) -> dict:
        """Per-example statistics averaged over examples (see the module docstring)."""
        s = self.singular_values
        nan = float("nan")
        out = {"n_sv": s.shape[1], "max_sv": float(s[:, 0].mean())}
        if self.full:
            sq = s.pow(2)
            smin = s[:, -1]
            cond = torch.where(smin > 0, s[:, 0] / smin, torch.full_like(smin, math.inf))
            out.update(
                mean_sq_sv=float(sq.mean(1).mean()),
                var_sq_sv=float(sq.var(1, unbiased=False).mean()),
                min_sv=float(smin.mean()),
                condition_number=float(cond.mean()),
                frac_near_one=float(((s - 1).abs() <= NEAR_ONE).double().mean(1).mean()),
            )
        else:
            m1, m2 = self.moments[:, 0], self.moments[:, 1]
            out.update(
                mean_sq_sv=float(m1.mean()),
                var_sq_sv=float((m2 - m1.pow(2)).clamp_min(0).mean()),
                min_sv=nan, condition_number=nan, frac_near_one=nan,
            )
        out["spectral_radius"] = nan if self.spectral_radius is None else float(self.spectral_radius.mean())
        return out


@dataclass
class JacobianReport:
    """What :func:`jacobian_probe` returns: the input-output map first, then the layers by depth."""

    layers: list[LayerSpectrum]
    space: str  # "normalized" or "pixel"
    n_examples: int
    notes: list[str] = field(default_factory=list)

    def cumulative_spectral_norm(self) -> dict[str, float]:
        """``name -> mean over examples of prod_{j <= l} ||J_j||_2`` over the probed layers."""
        out, running = {}, None
        for ls in self.layers:
            if ls.depth is None:
                continue
            top = ls.singular_values[:, 0]
            running = top if running is None else running * top
            out[ls.name] = float(running.mean())
        return out

    def summary(self):
        """``jacobian_summary.csv``: one row per map with the columns of ``SUMMARY_COLUMNS``."""
        import pandas as pd

        cum = self.cumulative_spectral_norm()
        rows = []
        for ls in self.layers:
            row = {"layer": ls.name, "depth": ls.depth, "in_dim": ls.in_dim, "out_dim": ls.out_dim,
                   "method": ls.method, "converged": ls.converged}
            row.update(ls.stats())
            row["cum_spectral_norm"] = cum.get(ls.name, float("nan"))
            rows.append(row)
        return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)

    def spectra_frame(self):
        """``jacobian.csv``: long format ``layer,example,index,singular_value`` (index 0 = largest)."""
        import pandas as pd

        parts = []
        for ls in self.layers:
            b, r = ls.singular_values.shape
            parts.append(pd.DataFrame({
                "layer": ls.name,
                "example": torch.arange(b).repeat_interleave(r).numpy(),
                "index": torch.arange(r).repeat(b).numpy(),
                "singular_value": ls.singular_values.reshape(-1).numpy(),
            }))
        return pd.concat(parts, ignore_index=True)

    def to_frames(self):
        """``(jacobian.csv frame, jacobian_summary.csv frame)``."""
        return self.spectra_frame(), self.summary()

    def gain_rate(self, threshold: float = DEFAULT_THRESHOLD) -> tuple[float, str]:
        """Typical gain per layer and its verdict: ``(rate, vanishing|exploding|stable|undetermined)``.

        ``sqrt(mean_sq_sv)`` of a layer map is the factor by which it scales the norm of a random
        direction (``mean_sq_sv`` is the mean-field ``chi_1`` of Poole et al. 2016 / Schoenholz
        et al. 2017); the rate is its geometric mean over the probed per-layer maps, and the
        verdict uses the rule of :mod:`gradlab.probes.gradnorm` (``|log rate| > log(1 + t)``).
        """
        chi = [ls.stats()["mean_sq_sv"] for ls in self.layers if ls.depth is not None]
        if not chi:
            return float("nan"), "undetermined"
        log_rate = 0.5 * sum(math.log(max(c, 1e-300)) for c in chi) / len(chi)
        return math.exp(log_rate), verdict_from_rate(log_rate, threshold)

    def metrics(self, threshold: float = DEFAULT_THRESHOLD) -> dict:
        """The input-output statistics (prefixed ``io_``), gain rate and verdict for ``summary.csv``."""
        io = self.layers[0].stats()
        keys = ["mean_sq_sv", "var_sq_sv", "max_sv", "min_sv", "condition_number", "frac_near_one"]
        out = {f"io_{k}": io[k] for k in keys}
        cum = self.cumulative_spectral_norm()
        if cum:
            out["cum_spectral_norm"] = list(cum.values())[-1]
            out["gain_rate"], out["verdict"] = self.gain_rate(threshold)
        return out


def per_example_jacobian(fn: Callable[[Tensor], Tensor], h: Tensor) -> Tensor:
    """Dense per-example Jacobians ``(B, m, n)`` of a batched map ``fn`` at ``h`` (B, ...).

    ``fn`` must treat examples independently (every zoo model in eval mode does), so the
    Jacobian of the batched map is block-diagonal. Then ``vmap`` over the one-hot basis of the
    output of one vector-Jacobian product of the *batched* map (the rows of every example's
    Jacobian at once: ``jacrev``'s construction, m products) or, when the input is the smaller
    side, over the input basis of a Jacobian-vector product (``jacfwd``'s, n products). Running
    the batched map instead of ``vmap`` over single examples keeps convolutions batched (about
    5x faster on a ResNet block on CPU).
    """
    b = h.shape[0]
    with torch.no_grad():
        out = fn(h[:1])
    m, n = out[0].numel(), h[0].numel()
    if m <= n:
        out, pullback = vjp(fn, h)
        basis = torch.eye(m, dtype=out.dtype, device=out.device).view(m, 1, *out.shape[1:])
        rows = vmap(lambda u: pullback(u)[0])(basis.expand(m, *out.shape))  # (m, B, *in)
        return rows.reshape(m, b, n).transpose(0, 1).contiguous()  # contiguous: later casts are 5x cheaper
    basis = torch.eye(n, dtype=h.dtype, device=h.device).view(n, 1, *h.shape[1:])
    cols = vmap(lambda v: jvp(fn, (h,), (v,))[1])(basis.expand(n, *h.shape))  # (n, B, *out)
    return cols.reshape(n, b, m).permute(1, 2, 0).contiguous()


def singular_values(jac: Tensor) -> Tensor:
    """Singular values (B, min(m, n)) float64, descending, of per-example Jacobians (B, m, n).

    A very rectangular Jacobian (the end-to-end map: classes x input pixels) goes through the
    float64 eigenvalues of its small Gram matrix, ~10x cheaper than an SVD; the Gram's float64
    rounding (~1e-16 of the largest squared value) is far below the float32 Jacobian's own.
    Near-square maps use ``svdvals`` directly.
    """
    m, n = jac.shape[-2:]
    if 4 * min(m, n) > max(m, n):
        return torch.linalg.svdvals(jac).double()
    j64 = jac.double()
    gram = j64 @ j64.transpose(-1, -2) if m <= n else j64.transpose(-1, -2) @ j64
    return torch.linalg.eigvalsh(gram).clamp_min(0).sqrt().flip(-1)


def jacobian_probe(
    model: nn.Module,
    x: Tensor,
    *,
    pixel_space: bool = False,
    per_layer: bool = True,
    layers: Optional[Sequence[str]] = None,
    method: str = "auto",
    k: int = 8,
    max_dense: int = 2**24,
    n_probes: int = 16,
    keep_jacobians: bool = False,
    seed: int = 0,
) -> JacobianReport:
    """Per-example Jacobian spectra of ``model`` at the inputs ``x`` (B, *input_shape) in [0, 1].

    Args:
        pixel_space: differentiate w.r.t. the raw input instead of ``normalize(x)``.
        per_layer: also probe every block and the head (GradlabNet only).
        layers: restrict the per-layer maps to these names (``blocks.0`` ... ``head``).
        method: ``auto`` | ``dense`` | ``lanczos`` (module docstring).
        k: how many top singular values Lanczos returns.
        max_dense: ``auto`` uses the dense path while ``B * m * n`` is at most this.
        n_probes: Rademacher probes of the Hutchinson moment estimates (Lanczos mode).
        keep_jacobians: keep the dense (B, m, n) Jacobians on the report (tests, small models).
        seed: seeds the Lanczos start vectors and probes.
    Raises:
        GradlabError: unknown method or layer, k < 1, an empty batch, or a model/block whose
        output is not a tensor.
    """
    if method not in METHODS:
        raise GradlabError(f"unknown method {method!r}; choose from: {', '.join(METHODS)}")
    if k < 1:
        raise GradlabError(f"invalid k: {k} (must be >= 1)")
    if x.ndim < 2 or x.shape[0] < 1:
        raise GradlabError(f"x must be a non-empty batch (B, *input_shape); got shape {tuple(x.shape)}")
    notes: list[str] = []
    gen = torch.Generator().manual_seed(seed)
    flags = [(mod, mod.training) for mod in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            _check_tensor(model(x[:1]), "model")  # one example: eval mode makes the rest alike
            is_net = isinstance(model, GradlabNet)
            if is_net and not pixel_space:
                acts = model.block_inputs(x) if per_layer else [model.normalize(x)]
                maps = [(INPUT_OUTPUT, None, lambda h: model.forward_from(h, 0), acts[0])]
            else:
                if not is_net and not pixel_space:
                    notes.append("the model is not a GradlabNet (no separate normalize layer): "
                                 "the Jacobian is taken w.r.t. the raw input")
                acts = model.block_inputs(x) if (is_net and per_layer) else None
                maps = [(INPUT_OUTPUT, None, model, x)]
            if per_layer and is_net:
                units = [(i, f"blocks.{i}", b) for i, b in enumerate(model.blocks)]
                units.append((len(model.blocks), "head", model.head))
                for depth, name, mod in select_layers(units, layers):
                    maps.append((name, depth, mod, acts[depth]))
            elif per_layer:
                notes.append("per-layer Jacobians need a GradlabNet (normalize -> blocks -> head); skipped")
            spectra = [
                _spectrum(name, depth, fn, h, method, k, max_dense, n_probes, keep_jacobians, gen)
                for name, depth, fn, h in maps
            ]
    finally:
        for mod, flag in flags:
            mod.training = flag
    return JacobianReport(spectra, "pixel" if pixel_space else "normalized", x.shape[0], notes)


def _spectrum(name, depth, fn, h, method, k, max_dense, n_probes, keep, gen) -> LayerSpectrum:
    out = _check_tensor(fn(h[:1]), name)
    b, m, n = h.shape[0], out[0].numel(), h[0].numel()
    use_dense = method == "dense" or (method == "auto" and b * m * n <= max_dense)
    if use_dense:
        jac = per_example_jacobian(fn, h)
        sv = singular_values(jac)
        radius = None
        if m == n:
            radius = torch.linalg.eigvals(jac).abs().amax(-1).double()
        return LayerSpectrum(name, depth, n, m, "dense", sv, spectral_radius=radius,
                             jacobian=jac if keep else None)
    gram, p = _gram_operator(fn, h)
    tol = max(1e-10, 1000 * torch.finfo(h.dtype).eps)  # float32: 1.2e-4; |eigenvalue error| <= residual
    v0 = torch.randn(b, p, generator=gen, dtype=torch.float64).to(h.device)
    eig = batched_lanczos(gram, v0, k, tol=tol, generator=gen)
    sv = eig.eigenvalues.clamp_min(0).sqrt()
    moments = torch.zeros(b, 2, dtype=torch.float64, device=h.device)
    for _ in range(n_probes):  # Hutchinson: E[z'Gz] = tr G, E[|Gz|^2] = tr G^2, z Rademacher
        z = (torch.randint(0, 2, (b, p), generator=gen) * 2 - 1).to(torch.float64).to(h.device)
        gz = gram(z)
        moments[:, 0] += (z * gz).sum(-1)
        moments[:, 1] += gz.pow(2).sum(-1)
    moments /= n_probes * p
    return LayerSpectrum(name, depth, n, m, "lanczos", sv.cpu(), converged=bool(eig.converged.all()),
                         iterations=eig.products, moments=moments.cpu())


def _gram_operator(fn, h: Tensor):
    """Matrix-free per-example Gram ``G`` on the smaller side, float64 in and out, and its size.

    One forward pass is recorded and reused by every product: ``J^T u`` is a backward pass, and
    ``J v`` is the derivative of the (linear in ``u``) map ``u -> J^T u`` in direction ``v``
    (the double-backward trick), which on CPU is far cheaper than re-running ``torch.func.jvp``.
    The map is block-diagonal over examples, so one product serves every example at once.
    """
    with torch.enable_grad():
        h_in = h.detach().requires_grad_(True)
        out = fn(h_in)
        dummy = torch.zeros_like(out, requires_grad=True)
        jt_dummy = torch.autograd.grad(out, h_in, dummy, create_graph=True)[0]
    b, m, n = h.shape[0], out[0].numel(), h[0].numel()
    dtype = h.dtype

    def jv(v):  # (B, n) -> (B, m)
        with torch.enable_grad():
            r = torch.autograd.grad(jt_dummy, dummy, v.to(dtype).view_as(h), retain_graph=True)[0]
        return r.reshape(b, m).double()

    def jtu(u):  # (B, m) -> (B, n)
        with torch.enable_grad():
            r = torch.autograd.grad(out, h_in, u.to(dtype).view_as(out), retain_graph=True)[0]
        return r.reshape(b, n).double()

    if n <= m:
        return (lambda v: jtu(jv(v))), n
    return (lambda u: jv(jtu(u))), m


def _check_tensor(out, what: str) -> Tensor:
    if not isinstance(out, Tensor):
        raise GradlabError(
            f"{what} output is a {type(out).__name__}, not a tensor; the Jacobian probe needs maps Tensor -> Tensor"
        )
    return out


PROBES.add("jacobian", jacobian_probe, "per-example input-output and per-layer Jacobian spectra, dynamical isometry",
           "--examples --pixel-space --method --k --layers")
