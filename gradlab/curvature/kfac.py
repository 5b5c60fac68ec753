"""K-FAC: the Fisher/Gauss-Newton matrix as one Kronecker product per layer.

For a layer ``out = W a + b`` (``nn.Linear``) with ``W`` (O, I), write ``a_bar = [a; 1]`` when the
bias is among the chosen parameters (the "bias column") and ``W_bar = [W, b]`` (O, I+1). The
layer's block of ``J^T Lambda J`` is ``c sum_n sum_k (b_nk b_nk^T) (x) (a_bar_n a_bar_n^T)`` with
``b_nk`` the gradient of the outputs' factor ``s_nk`` back at the layer's output
(``Lambda_n = c sum_k s_nk s_nk^T``). K-FAC (Martens & Grosse 2015, "Optimizing neural networks
with Kronecker-factored approximate curvature") replaces the sum of products by the product of
sums:

    block ~ G (x) A,   A = (1/R) sum_r a_bar_r a_bar_r^T   ((I+1) x (I+1)),
                       G = c sum_r sum_k b_rk b_rk^T        (O x O),

``r`` running over the ``R`` rows that share the weight: the ``N`` examples for a plain linear
layer, ``N T`` for inputs (N, T, I), and the ``N L`` output positions of a convolution, whose
``a`` are the input patches ``F.unfold`` expands, ``K = C_in kh kw`` long (Grosse & Martens 2016,
"A Kronecker-factored approximate Fisher matrix for convolution layers"; this sum over shared
rows is "K-FAC-expand" of Eschenhagen et al. 2023). Layers are independent blocks
(block-diagonal across layers). In the flat vector the layer's part is ``vec(W_bar)`` row-major,
``W`` entries then ``b``, so ``(G (x) A) vec(V) = vec(G V A)``: a product is two small matrix
products per layer and never passes through the network.

The factor ``s`` (``fisher_type``):

* ``"type-2"``: ``s_nk = sqrt(p_k) (e_k - p)`` for cross-entropy (``sqrt(2) e_k`` for squared
  error), whose outer products sum exactly to the output Hessian: K-FAC of the Gauss-Newton
  matrix = the true Fisher;
* ``"mc"``: ``mc_samples`` output gradients at labels drawn from the model, each weighted
  ``1/M``: the Monte Carlo estimate of Martens & Grosse 2015;
* ``"empirical"``: the output gradient at the observed labels (K-FAC of the empirical Fisher).

All columns ``k`` (classes or samples) go back to the layer outputs in one batched backward
pass, chunked within a memory budget and loss-scaled under fp16; on a CPU a network with Conv2d
layers or large layer outputs keeps one pass per column, which is faster there
(:mod:`gradlab.curvature.kfac_backward`).

Inverse: with ``A = Q_A diag(l_A) Q_A^T`` and ``G = Q_G diag(l_G) Q_G^T``,
``(G (x) A + lambda I)^-1 vec(V) = vec(Q_G [(Q_G^T V Q_A) / (l_G l_A^T + lambda)] Q_A^T)``, exact
for the K-FAC matrix (:meth:`KFACOperator.solve`, :meth:`KFACOperator.inverse`).

A linear layer fed fewer rows than half its input width (a wide head on a batch of 128) has an
``A`` of rank ``R``; it is kept as its ``R`` scaled rows (``A = rows^T rows``), so it is never
formed, products cost ``O(R K)`` per output instead of ``O(K^2)``, and its eigenbasis comes from
the ``R x R`` Gram matrix, with ``1/lambda`` on the null space in the damped inverse.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradlab.core.errors import GradlabError
from gradlab.curvature import conv_moments
from gradlab.curvature.kfac_backward import output_moments
from gradlab.curvature.likelihood import check_outputs, require_likelihood
from gradlab.curvature.model_op import ModelOperator
from gradlab.curvature.operator import CurvatureOperator
from gradlab.curvature.params import ParamSpec
from gradlab.curvature.sampling import make_generator

FISHER_TYPES = ("type-2", "mc", "empirical")
LAYERS = (nn.Linear, nn.Conv2d)


def _sum_outer(u: Tensor) -> Tensor:
    """``sum_n U_n U_n^T`` (K, K) for ``u`` (N, K, L).

    Batched products write ``N K^2`` partial sums, so they pay only when each has at least ``K``
    terms; otherwise one ``(K, N L)`` copy and a single product (on 128 x 288 x 64 patches 3x
    faster; on 128 x 27 x 1024 the batched products are 1.2x faster)."""
    if u.shape[2] >= u.shape[1]:
        return torch.matmul(u, u.transpose(1, 2)).sum(0)
    r = u.transpose(0, 1).reshape(u.shape[1], -1)
    return r @ r.T


#: The unfold products' size ``K^2 N L`` from which a stride-1 convolution's input moments go through
#: :mod:`gradlab.curvature.conv_moments`: its shifted correlations cost a fixed ~4 ms of small
#: operations on a CPU, more than unfolding small inputs (128 x 1 x 8 x 8: 6.2 ms against 0.7 ms;
#: 128 x 3 x 32 x 32: 14.6 ms against 23.3 ms; benchmarks/RESULTS.md).
SHIFTED_MIN_WORK = 2**26


def _shifted_pays(m: nn.Conv2d, a: Tensor) -> bool:
    (kh, kw), (ph, pw) = m.kernel_size, m.padding
    k = a.shape[1] * kh * kw
    positions = (a.shape[2] + 2 * ph - kh + 1) * (a.shape[3] + 2 * pw - kw + 1)
    return k * k * a.shape[0] * positions >= SHIFTED_MIN_WORK


class _Block:
    """One layer: its module, which of the operator's parameters are its weight and bias, and factors."""

    def __init__(self, module: nn.Module, w: Optional[int], b: Optional[int]):
        self.module, self.w, self.b = module, w, b
        self._A: Optional[Tensor] = None  # dense A
        self._rows: Optional[Tensor] = None  # or A = rows^T rows, while rows (R, K') has R <= K' / 2
        self.G: Optional[Tensor] = None
        self._eig: Optional[tuple[Tensor, Tensor, Tensor, Tensor]] = None

    @property
    def A(self) -> Tensor:
        """The input factor as a dense ``(K', K')`` matrix."""
        return self._A if self._A is not None else self._rows.T @ self._rows

    def add_input(self, a: Tensor, weight: float) -> None:
        """Add ``weight`` times this batch's input moment (:meth:`input_moment`) to ``A``.

        A linear layer with fewer rows than half its input width (a wide head: 128 examples of
        4096 features) keeps ``A`` as its scaled rows, rank ``R``: then forming ``A`` is skipped,
        a product ``V A = (V rows^T) rows`` costs ``2 R K'`` per output instead of ``K'^2``, and
        the eigenbasis comes from the ``R x R`` Gram matrix. More rows make ``A`` dense."""
        m = self.module
        if isinstance(m, nn.Conv2d) or self.w is None:
            moment = self.input_moment(a).mul_(weight)
            self._A = moment if self._A is None else self._A.add_(moment)
            return
        a = a.reshape(-1, a.shape[-1])
        if self.b is not None:
            a = torch.cat([a, a.new_ones(a.shape[0], 1)], dim=1)
        rows = a * (weight / a.shape[0]) ** 0.5  # (R, K'), rows^T rows = weight * moment
        if self._A is not None:
            self._A.addmm_(rows.T, rows)
            return
        self._rows = rows if self._rows is None else torch.cat([self._rows, rows])
        if 2 * self._rows.shape[0] > self._rows.shape[1]:
            self._A, self._rows = self._rows.T @ self._rows, None

    def times_A(self, M: Tensor) -> Tensor:
        """``M A`` for ``M`` (..., K')."""
        return M @ self._A if self._A is not None else (M @ self._rows.T) @ self._rows

    def input_moment(self, a: Tensor) -> Tensor:
        """``(1/R) sum_r a_bar_r a_bar_r^T`` of the layer input over the ``R`` rows sharing the weight.

        A convolution's rows are the patches of ``F.unfold`` (N, K, L), summed by :func:`_sum_outer`,
        or at stride 1, for inputs large enough (:data:`SHIFTED_MIN_WORK`), the same sums from
        shifted correlations of the input without forming the patches
        (:mod:`gradlab.curvature.conv_moments`); its bias column enters as the patch sums,
        not as a concatenated column (a copy of the patches)."""
        m = self.module
        if self.w is None:  # bias alone: a_bar = [1]
            return a.new_ones(1, 1)
        if isinstance(m, nn.Conv2d) and conv_moments.applies(m, a) and _shifted_pays(m, a):  # no patches formed
            core, total = conv_moments.patch_moments(a, m.kernel_size, m.padding)
            (kh, kw), (ph, pw) = m.kernel_size, m.padding
            rows = a.shape[0] * (a.shape[2] + 2 * ph - kh + 1) * (a.shape[3] + 2 * pw - kw + 1)
        elif isinstance(m, nn.Conv2d):
            u = F.unfold(a, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)  # (N, K, L)
            rows = u.shape[0] * u.shape[2]
            core, total = _sum_outer(u), u.sum((0, 2))
        else:
            a = a.reshape(-1, a.shape[-1])
            rows = a.shape[0]
            core, total = a.T @ a, a.sum(0)
        if self.b is None:
            return core / rows
        k = core.shape[0]
        out = core.new_empty(k + 1, k + 1)
        out[:k, :k], out[:k, k], out[k, :k], out[k, k] = core, total, total, rows
        return out / rows

    @staticmethod
    def output_moment(g: Tensor) -> Tensor:
        """``sum_r b_r b_r^T`` of output gradients (N, O) or (N, O, H, W) over all rows, (O, O)."""
        if g.dim() == 4:
            return _sum_outer(g.flatten(2))  # (N, O, L)
        g = g.reshape(-1, g.shape[-1])
        return g.T @ g

    def to_matrix(self, vs: list[Tensor], k: int) -> Tensor:
        """This layer's part of ``k`` vectors as ``V_bar`` (k, O, K [+1])."""
        parts = []
        if self.w is not None:
            parts.append(vs[self.w].reshape(k, self.module.weight.shape[0], -1))
        if self.b is not None:
            parts.append(vs[self.b].reshape(k, -1, 1))
        return torch.cat(parts, dim=2)

    def from_matrix(self, M: Tensor, out: list[Tensor], k: int) -> None:
        if self.w is not None:
            out[self.w] = M[:, :, : M.shape[2] - (self.b is not None)].reshape(k, -1)
        if self.b is not None:
            out[self.b] = M[:, :, -1].reshape(k, -1)

    def eig(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(l_A, Q_A, l_G, Q_G)``, eigenvalues clamped at 0 (the factors are PSD). For a low-rank
        ``A`` only its range: ``Q_A`` (K', r) with ``r <= R``, the other ``K' - r`` eigenvalues are 0."""
        if self._eig is None:
            if self._A is not None:
                la, qa = torch.linalg.eigh(self._A)
            else:  # rows^T rows = Q diag(mu) Q^T with Q = rows^T W / sqrt(mu), rows rows^T = W diag(mu) W^T
                mu, W = torch.linalg.eigh(self._rows @ self._rows.T)
                keep = mu > mu.amax().clamp_min(0) * mu.shape[0] * torch.finfo(mu.dtype).eps
                la, qa = mu[keep], (self._rows.T @ W[:, keep]) / mu[keep].sqrt()
            lg, qg = torch.linalg.eigh(self.G)
            self._eig = (la.clamp_min(0), qa, lg.clamp_min(0), qg)
        return self._eig


    def solve(self, M: Tensor, damping: float) -> Tensor:
        """``(G (x) A + damping I)^-1`` applied to ``M`` (k, O, K'), through the cached eigenbases."""
        la, qa, lg, qg = self.eig()
        out = qg @ ((qg.T @ M @ qa) / (lg[:, None] * la[None, :] + damping)) @ qa.T
        if qa.shape[1] == M.shape[2]:
            return out
        if damping == 0:
            raise GradlabError(f"K-FAC: the input factor of a {type(self.module).__name__} layer has rank "
                               f"{qa.shape[1]} < {M.shape[2]}; solve with damping > 0")
        return out + (M - (M @ qa) @ qa.T) / damping  # A's null space: eigenvalue 0, inverse 1/damping


#: One layer's Kronecker factors, their moments and damped solve (the K-FAC optimizer keeps its own).
KroneckerBlock = _Block


def output_factors(likelihood, fisher_type: str, z: Tensor, mc_samples: int, gen: torch.Generator,
                   y: Optional[Tensor] = None) -> Tensor:
    """``S`` (K, N, C) with ``Lambda_n = c sum_k S[k, n] S[k, n]^T`` for ``fisher_type`` (module
    docstring); ``z`` (N, C) detached, ``y`` the observed labels (``"empirical"`` only)."""
    c = likelihood.factor(z)
    if fisher_type == "type-2":
        S = likelihood.hessian_factor(z)
    elif fisher_type == "mc":
        S = likelihood.sampled_gradients(z, mc_samples, gen) / mc_samples ** 0.5
    else:
        S = likelihood.output_gradients(z, y).unsqueeze(0)
    return S * c ** 0.5


class KFACOperator(ModelOperator):
    """Block-diagonal Kronecker-factored curvature ``diag_l(G_l (x) A_l)`` (module docstring).

    Args:
        model, loss_fn, data, mode, params, seed: see :class:`~gradlab.curvature.model_op.ModelOperator`.
            The loss must be cross-entropy or squared error with outputs (N, C); every chosen
            parameter must be the weight or bias of an ``nn.Linear`` or ``nn.Conv2d`` (groups 1,
            zero padding) that runs once per forward pass.
        fisher_type: ``"type-2"`` (default), ``"mc"`` or ``"empirical"``.
        mc_samples: labels per example for ``"mc"`` (>= 1), drawn from ``make_generator(seed)``.

    Attributes:
        blocks: one per layer with factors ``A`` ((K [+1])^2, dense on access) and ``G`` (O x O),
            in the params' dtype.
    Papers: Martens & Grosse 2015; Grosse & Martens 2016.
    """

    def __init__(self, model: nn.Module, loss_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None, data=None, *,
                 fisher_type: str = "type-2", mc_samples: int = 1, mode: str = "eval", params: ParamSpec = None,
                 seed: int = 0):
        if fisher_type not in FISHER_TYPES:
            raise GradlabError(f"unknown K-FAC fisher_type {fisher_type!r}; choose from: {', '.join(FISHER_TYPES)}")
        if not isinstance(mc_samples, int) or mc_samples < 1:
            raise GradlabError(f"invalid mc_samples: {mc_samples} (must be an integer >= 1)")
        super().__init__(model, loss_fn, data, mode=mode, params=params, seed=seed)
        self.likelihood = require_likelihood(self.loss_fn, "K-FAC")
        self.fisher_type, self.mc_samples = fisher_type, mc_samples
        self.blocks = self._find_blocks()
        self._compute_factors()

    def _find_blocks(self) -> list[_Block]:
        index = {id(p): j for j, p in enumerate(self.params)}
        blocks, covered = [], set()
        for name, m in self.model.named_modules():
            own = [(k, p) for k, p in m.named_parameters(recurse=False) if id(p) in index]
            if not own:
                continue
            if not isinstance(m, LAYERS):
                raise GradlabError(f"K-FAC supports parameters of nn.Linear and nn.Conv2d layers; "
                                   f"{name or 'the model'} is a {type(m).__name__} (choose other params)")
            if isinstance(m, nn.Conv2d) and (m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str)):
                raise GradlabError(f"K-FAC supports Conv2d with groups=1 and numeric zero padding; {name} is not")
            ids = dict(own)
            w = index[id(ids["weight"])] if "weight" in ids else None
            b = index[id(ids["bias"])] if "bias" in ids else None
            blocks.append(_Block(m, w, b))
            covered.update(id(p) for _, p in own)
        if len(covered) != len(self.params):
            raise GradlabError("K-FAC needs every chosen parameter to be a weight or bias of a model layer")
        return blocks

    def _factors_of_outputs(self, i: int, z: Tensor, gen: torch.Generator) -> Tensor:
        """``S`` (K, N, C) with ``Lambda_n = c sum_k S[k, n] S[k, n]^T`` for ``fisher_type``."""
        return output_factors(self.likelihood, self.fisher_type, z, self.mc_samples, gen, self.batches[i][1])

    def _compute_factors(self) -> None:
        gen = make_generator(self.seed)
        for i, weight in enumerate(self.weights):
            x, _ = self.batches[i]
            seen: dict[int, tuple[Tensor, Tensor]] = {}

            def hook(module, inputs, output):
                if id(module) in seen:
                    raise GradlabError(f"K-FAC: a {type(module).__name__} layer ran twice in one forward pass "
                                       f"(shared weights are not supported)")
                a = inputs[0].detach()  # (under autocast fp16/bf16: the factors in the params' dtype)
                seen[id(module)] = (a.to(self.dtype) if a.is_floating_point() else a, output)

            handles = [blk.module.register_forward_hook(hook) for blk in self.blocks]
            try:
                with torch.enable_grad(), self._batch_context(i):
                    z = self.model(x)
            finally:
                for h in handles:
                    h.remove()
            check_outputs(z, "K-FAC")
            z = z.to(self.dtype)  # autocast: S in the params' dtype (a float16 softmax underflows)
            S = self._factors_of_outputs(i, z.detach(), gen)
            missing = [type(blk.module).__name__ for blk in self.blocks if id(blk.module) not in seen]
            if missing:
                raise GradlabError(f"K-FAC: a chosen {missing[0]} layer did not run in the forward pass")
            outs = [seen[id(blk.module)][1] for blk in self.blocks]
            # every column of S in one batched backward pass (None: the outputs do not depend on the layer)
            G = output_moments(z, outs, S, _Block.output_moment, dtype=self.dtype)
            with torch.autocast(self.device.type, enabled=False):  # the moments never in fp16/bf16
                for blk, g in zip(self.blocks, G):
                    o = blk.module.weight.shape[0]
                    g = g if g is not None else torch.zeros(o, o, dtype=self.dtype, device=self.device)
                    blk.add_input(seen[id(blk.module)][0], weight)  # in place: a wide layer's A is large
                    blk.G = g.mul_(weight) if i == 0 else blk.G.add_(g, alpha=weight)

    # ------------------------------------------------------------------ products
    def _apply(self, V: Tensor, fn) -> Tensor:
        k = V.shape[1]
        vs = [t.reshape(k, -1) for t in torch.split(V.T, [p.numel() for p in self.params], dim=1)]
        out: list[Optional[Tensor]] = [None] * len(self.params)
        for blk in self.blocks:
            blk.from_matrix(fn(blk, blk.to_matrix(vs, k)), out, k)
        return torch.cat(out, dim=1).T

    def _matmat(self, V: Tensor) -> Tensor:
        return self._apply(V, lambda blk, M: blk.times_A(blk.G @ M))

    def solve(self, V: Tensor, damping: float) -> Tensor:
        """``(K + damping I)^-1 V`` exactly for the K-FAC matrix ``K``; ``V`` (n,) or (n, k)."""
        if not damping >= 0:
            raise GradlabError(f"invalid damping: {damping} (must be >= 0)")

        W = V.unsqueeze(1) if V.ndim == 1 else V
        out = self._apply(W.to(dtype=self.dtype, device=self.device),
                          lambda blk, M: blk.solve(M, damping)).to(dtype=V.dtype, device=V.device)
        return out.squeeze(1) if V.ndim == 1 else out

    def inverse(self, damping: float) -> "KFACInverseOperator":
        """``(K + damping I)^-1`` as an operator (for the solvers, or a preconditioner)."""
        return KFACInverseOperator(self, damping)

    def eigenvalues(self) -> Tensor:
        """All ``n`` eigenvalues, float64 ascending: products ``l_G l_A`` of each block's factors."""
        vals = []
        for blk in self.blocks:
            la, qa, lg, _ = blk.eig()
            vals += [torch.outer(lg, la).reshape(-1), lg.new_zeros(lg.numel() * (qa.shape[0] - la.numel()))]
        return torch.cat(vals).double().sort().values

    def trace(self) -> float:
        """``tr K = sum_l tr(G_l) tr(A_l)``, exactly."""
        return float(sum(torch.trace(blk.G).double() * (torch.trace(blk._A) if blk._A is not None else
                                                         blk._rows.pow(2).sum()).double() for blk in self.blocks))


class KFACInverseOperator(CurvatureOperator):
    """``(K + damping I)^-1`` of a :class:`KFACOperator` ``K``, exact through the factors' eigenbases."""

    def __init__(self, kfac: KFACOperator, damping: float):
        if not damping > 0:
            raise GradlabError(f"invalid damping: {damping} (the inverse needs damping > 0)")
        super().__init__(kfac.n, kfac.dtype, kfac.device)
        self.kfac, self.damping = kfac, damping

    def _matmat(self, V: Tensor) -> Tensor:
        return self.kfac.solve(V, self.damping)
