"""K-FAC: gradient descent preconditioned by the Kronecker-factored Fisher, per layer.

Martens & Grosse 2015 ("Optimizing neural networks with Kronecker-factored approximate
curvature") for ``nn.Linear``; Grosse & Martens 2016 ("A Kronecker-factored approximate Fisher
matrix for convolution layers") for ``nn.Conv2d``. Each layer's block of the Fisher is
``G (x) A`` (``A`` the second moment of the layer's inputs with a bias column, ``G`` that of the
gradients at its outputs, :mod:`gradlab.curvature.kfac`, whose blocks and moments this optimizer
reuses). Per step, with the layer's gradient as a matrix ``V`` (O, K [+1])::

    every factor_every steps:  A <- e A + (1 - e) A_batch,  G <- e G + (1 - e) G_batch,
                               e = min(1 - 1/u, factor_decay) at the u-th update (paper Sec. 5)
    every inverse_every steps: eigenbases A = Q_A l_A Q_A^T, G = Q_G l_G Q_G^T   (of factors not
                               decomposed yet: unchanged ones keep theirs)
    D = (G (x) A + damping I)^-1 vec(V) = Q_G [(Q_G^T V Q_A) / (l_G l_A^T + damping)] Q_A^T
    nu = min(1, sqrt(kl_clip / (lr^2 sum D . V)))          (Ba, Grosse & Martens 2017; 0: off)
    buf <- momentum * buf + nu D + weight_decay * w;   w <- w - lr * buf

With ``damping_mode = "exact"`` (default) the damping is Tikhonov damping of the Kronecker
product itself, applied exactly through the eigenbases: four thin products per layer and step,
two eigendecompositions per layer and inverse refresh. ``"factored"`` is the paper's factored
Tikhonov damping (Sec. 6.3), ``(G + sqrt(l)/pi I) (x) (A + pi sqrt(l) I)`` with
``pi = sqrt((tr A / dim A) / (tr G / dim G))``, whose inverse is the Kronecker product of two
Cholesky inverses: ``D = (G + sqrt(l)/pi I)^-1 V (A + pi sqrt(l) I)^-1``, two products per layer
and step and no eigendecomposition (a change of ``damping`` takes effect at the next inverse
refresh). ``G_batch`` comes from output gradients at labels sampled from the model
(``fisher_type = "mc"``, the paper's estimate) or from the exact output-Hessian factors
(``"type-2"``, one column per class, all classes in one batched backward pass to the layer outputs
but on a CPU with Conv2d layers or large batches, :mod:`gradlab.curvature.kfac_backward`, which also loss-scales
fp16 outputs). The factor statistics
are gathered in the closure's own forward pass (hooks, :mod:`gradlab.optim.model_bound`); on the
other steps the model is not watched at all (no hooks) and a K-FAC step is a gradient plus a few
small matrix products per layer, with no host synchronisation (kl-clip's scale stays on the
device). Not from the paper: its adaptive damping and step rescaling by the exact quadratic model.

**Unsupported layers** (anything other than ``Linear`` and ``Conv2d`` with groups 1 and numeric
zero padding, e.g. BatchNorm's scale and shift, embeddings) are not refused: their parameters
take plain momentum-SGD steps with the same ``lr`` (``plain_params`` names them).

**torchrun**: the gradient and the new factors are all-reduced (each rank's factors weighted by
its examples), so every rank holds the factors of the global batch and takes the same step. The
``mc`` labels are drawn on the gathered outputs of the global batch
(:func:`gradlab.optim.model_bound.sampled_output_gradients`), so W processes draw what one process draws.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from gradlab.core.options import Option, Options
from gradlab.curvature.kfac import LAYERS, KroneckerBlock, output_factors
from gradlab.curvature.kfac_backward import output_moments
from gradlab.core.distributed import reduce_over_ranks
from gradlab.optim.model_bound import ModelBoundOptimizer, sampled_output_gradients, world_size
from gradlab.optim.registry import OPTIMIZERS, lr_option, weight_decay_option

FISHER_TYPES = ("mc", "type-2")
DAMPING_MODES = ("exact", "factored")

OPTIONS = Options(
    lr_option(0.05),
    Option("momentum", float, 0.9, "heavy-ball momentum on the preconditioned gradient", low=0, high=1,
           high_open=True),
    Option("damping", float, 0.01, "Tikhonov damping lambda of (G (x) A + lambda I)^-1", low=0, low_open=True,
           paper="Martens & Grosse 2015"),
    Option("factor_every", int, 10, "recompute the Kronecker factors every N steps (the closure's own "
           "forward pass plus a backward pass to the layer outputs)", low=1, paper="Martens & Grosse 2015"),
    Option("inverse_every", int, 10, "refresh the factors' eigenbases (the inverse) every M steps", low=1,
           paper="Martens & Grosse 2015"),
    Option("factor_decay", float, 0.95, "EMA coefficient of the factors, min(1 - 1/u, this) at the u-th "
           "update", low=0, high=1, high_open=True, paper="Martens & Grosse 2015"),
    Option("kl_clip", float, 0.001, "scale the step so that lr^2 D.g stays below this (0: off)", low=0,
           paper="Ba, Grosse & Martens 2017"),
    Option("fisher_type", str, "mc", "output-gradient statistics: mc (labels sampled from the model) or "
           "type-2 (exact output-Hessian factors, all classes in one batched backward)", choices=FISHER_TYPES),
    Option("damping_mode", str, "exact", "exact: (G (x) A + lambda I)^-1 through the factors' eigenbases; "
           "factored: the paper's (G + sqrt(lambda)/pi I)^-1 (x) (A + pi sqrt(lambda) I)^-1 by Cholesky "
           "(half the products per step, no eigendecomposition)", choices=DAMPING_MODES,
           paper="Martens & Grosse 2015"),
    weight_decay_option(),
)


def _supported(m: nn.Module) -> bool:
    if not isinstance(m, LAYERS):
        return False
    return not isinstance(m, nn.Conv2d) or (m.groups == 1 and m.padding_mode == "zeros"
                                            and not isinstance(m.padding, str))


class KFAC(ModelBoundOptimizer):
    """K-FAC (module docstring). Args as :data:`OPTIONS`, plus ``seed`` (the sampled labels)."""

    name = "kfac"

    def __init__(self, params, lr: float = 0.05, momentum: float = 0.9, damping: float = 0.01,
                 factor_every: int = 10, inverse_every: int = 10, factor_decay: float = 0.95,
                 kl_clip: float = 0.001, fisher_type: str = "mc", damping_mode: str = "exact",
                 weight_decay: float = 0.0, seed: int = 0):
        defaults = OPTIONS.resolve(dict(lr=lr, momentum=momentum, damping=damping, factor_every=factor_every,
                                        inverse_every=inverse_every, factor_decay=factor_decay, kl_clip=kl_clip,
                                        fisher_type=fisher_type, damping_mode=damping_mode,
                                        weight_decay=weight_decay), owner="optimizer kfac")
        super().__init__(params, defaults, seed=seed)
        self.blocks: list[KroneckerBlock] = []
        self.plain_params: list[str] = []
        self.factor_updates = 0
        self._pending = None
        self._plans: dict = {}  # block index -> prepared exact solve (:meth:`_plan`)
        self._inverses: list = []  # factored mode: per block (G_d^-1, A_d^-1 split at the bias)
        self._inverse_of = None  # (factor updates, mode, damping) the held eigenbases / inverses are of

    def _on_bind(self, model: nn.Module) -> None:
        params = self._params()
        index = {id(p): j for j, p in enumerate(params)}
        self.blocks, covered = [], set()
        for name, m in model.named_modules():
            own = {k: p for k, p in m.named_parameters(recurse=False) if id(p) in index}
            if own and _supported(m):
                w, b = own.get("weight"), own.get("bias")
                if w is None:  # a bias alone: no Kronecker structure worth having
                    continue
                self.blocks.append(KroneckerBlock(m, index[id(w)], index[id(b)] if b is not None else None))
                covered.update(id(p) for p in own.values())
        names = {id(p): n for n, p in model.named_parameters()}
        self.plain_params = [names[id(p)] for p in params if id(p) not in covered]
        if self._pending is not None:  # a state loaded before the model was bound
            self._load_extra_state(self._pending)

    # -- one step -------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        """One K-FAC step; ``closure()`` returns the loss without backward."""
        group = self.param_groups[0]
        t = self.steps_taken
        refresh = t % group["factor_every"] == 0 or self.factor_updates == 0
        params = self._params()
        batch, n_local = None, 1  # (n_local: the examples behind the factors; the gradient's mean needs none)
        with torch.enable_grad():
            if refresh:  # the model watched: its outputs and each layer's input and output
                loss, z, seen = self._forward(closure, [blk.module for blk in self.blocks])
                grads = self._gradients(loss, params, retain_graph=bool(self.blocks))
                batch, n_local = self._batch_factors(z, seen) if self.blocks else None, z.shape[0]
            else:  # no hooks at all: the closure and its gradient, as for a first-order step
                loss = self._loss(closure)
                grads = self._gradients(loss, params, retain_graph=False)
        grads, _ = self._average(grads, n_local)
        if batch is not None:
            self._update_factors(batch, n_local)
        if t % group["inverse_every"] == 0 or refresh and self.factor_updates == 1:
            self._refresh_inverses(group)
        for p, g in zip(params, grads):
            p.grad = g
        self._apply(params, grads)
        self.steps_taken += 1
        return loss.detach()

    def _refresh_inverses(self, group: dict) -> None:
        """The eigenbases (exact) or the Cholesky inverses (factored) of the current factors. Skipped
        when they are those of the factors held (and, factored, of the same damping): with
        ``inverse_every`` below ``factor_every`` an inverse step between two factor updates would
        otherwise decompose unchanged factors again, for the same result."""
        exact = group["damping_mode"] == "exact"
        key = (self.factor_updates, exact, None if exact else group["damping"])
        held = all(blk._eig is not None for blk in self.blocks) if exact else len(self._inverses) == len(self.blocks)
        if key == self._inverse_of and held:
            return
        if exact:
            for blk in self.blocks:
                blk._eig = None
                blk.eig()
        else:
            self._inverses = [self._factored_inverse(blk, group["damping"]) for blk in self.blocks]
        self._inverse_of = key

    def _batch_factors(self, z: Tensor, seen: dict) -> list[tuple[Tensor, Tensor]]:
        """This rank's ``(A, G)`` of the batch for every block (the closure's graph is freed)."""
        lik, fisher_type, zd = self.likelihood, self.param_groups[0]["fisher_type"], z.detach()
        if fisher_type == "mc":  # output_factors' "mc" with labels drawn on the global batch (torchrun)
            S = sampled_output_gradients(lik, zd, 1, self._generator) * lik.factor(zd) ** 0.5
        else:
            S = output_factors(lik, fisher_type, zd, 1, self._generator)
        outs = [seen[id(blk.module)][1] for blk in self.blocks]
        # all columns in one batched backward pass; a bf16/fp16 output's gradient (autocast) is made
        # float32 for the moment, fp16 ones loss-scaled (:mod:`gradlab.curvature.kfac_backward`)
        G = output_moments(z, outs, S, KroneckerBlock.output_moment, dtype=z.dtype)
        out = []
        with torch.autocast(z.device.type, enabled=False):  # (a step called under autocast)
            for blk, g in zip(self.blocks, G):
                o = blk.module.weight.shape[0]
                g = g if g is not None else z.new_zeros(o, o)
                out.append((blk.input_moment(seen[id(blk.module)][0]), g))
        return out

    def _update_factors(self, batch: list[tuple[Tensor, Tensor]], n_local: int) -> None:
        if world_size() > 1:  # each rank's mean factors weighted by its examples
            flat = [t * float(n_local) for pair in batch for t in pair]
            *flat, n = reduce_over_ranks([*flat, flat[0].new_tensor([float(n_local)])])
            flat = [t / n for t in flat]
            batch = [(flat[2 * j], flat[2 * j + 1]) for j in range(len(batch))]
        self.factor_updates += 1
        e = min(1 - 1 / self.factor_updates, self.param_groups[0]["factor_decay"])
        for blk, (a, g) in zip(self.blocks, batch):
            if blk._A is None:
                blk._A, blk.G = a.clone(), g.clone()
            else:
                blk._A.mul_(e).add_(a, alpha=1 - e)
                blk.G.mul_(e).add_(g, alpha=1 - e)

    def _plan(self, j: int, damping: float) -> tuple:
        """Block ``j``'s solve, prepared once per eigenbasis (and damping): ``Q_G``, ``Q_G^T``
        (contiguous), ``Q_A``'s weight rows and bias row, and ``1 / (l_G l_A^T + damping)``. A step
        without a refresh then costs four thin products per layer and one elementwise product."""
        blk, plan = self.blocks[j], self._plans.get(j)
        eig = blk.eig()
        if plan is None or plan[0] is not eig or plan[1] != damping:
            la, qa, lg, qg = eig
            bias = blk.b is not None
            qa_w, qa_b = (qa[:-1], qa[-1]) if bias else (qa, None)
            plan = (eig, damping, qg, qg.T.contiguous(), qa_w.contiguous(), qa_w.T.contiguous(),
                    None if qa_b is None else qa_b.contiguous(), torch.outer(lg, la).add_(damping).reciprocal_())
            self._plans[j] = plan
        return plan

    @staticmethod
    def _factored_inverse(blk: KroneckerBlock, damping: float) -> list[Tensor]:
        """``[G_d^-1, A_d^-1[:K, :K], A_d^-1[:K, K], A_d^-1[K, K]]`` (the last two absent without a
        bias) for the factored damping of the module docstring."""
        A, G = blk.A, blk.G
        ta, tg = float(torch.trace(A)) / A.shape[0], float(torch.trace(G)) / G.shape[0]
        pi = math.sqrt(ta / tg) if ta > 0 and tg > 0 else 1.0
        gamma = math.sqrt(damping)

        def inverse(M: Tensor, shift: float) -> Tensor:
            M = M.clone()
            M.diagonal().add_(shift)  # M + shift I, without an identity matrix
            L, info = torch.linalg.cholesky_ex(M)
            if int(info) == 0:
                return torch.cholesky_inverse(L)
            lam, Q = torch.linalg.eigh(M)  # PSD + shift not positive definite in floating point
            return (Q / lam.clamp_min(shift)) @ Q.T

        a_inv = inverse(A, pi * gamma)
        out = [inverse(G, gamma / pi)]
        if blk.b is None:
            return out + [a_inv]
        return out + [a_inv[:-1, :-1].contiguous(), a_inv[:-1, -1].contiguous(), a_inv[-1, -1].clone()]

    def preconditioned(self, grads: list[Tensor]) -> list[Tensor]:
        """``D``: each block's ``(G (x) A + damping I)^-1`` applied to its gradient; other
        parameters' gradients unchanged. Exact through the eigenbases,
        ``D = Q_G [(Q_G^T V Q_A) / (l_G l_A^T + damping)] Q_A^T``, with the bias column of ``V``
        handled as a rank-one term (no concatenated copy of the gradient)."""
        damping = self.param_groups[0]["damping"]
        out = list(grads)
        if self.param_groups[0]["damping_mode"] == "factored":
            if len(self._inverses) != len(self.blocks):  # e.g. a state saved in exact mode
                self._inverses = [self._factored_inverse(blk, damping) for blk in self.blocks]
            for blk, inv in zip(self.blocks, self._inverses):
                gw = grads[blk.w].reshape(inv[0].shape[0], -1)
                if blk.b is None:
                    out[blk.w] = (inv[0] @ (gw @ inv[1])).view_as(grads[blk.w])
                    continue
                g_inv, a_ww, a_wb, a_bb = inv
                xw = (gw @ a_ww).addr_(grads[blk.b], a_wb)  # A_d^-1 symmetric: its bias row is a_wb
                out[blk.w] = (g_inv @ xw).view_as(grads[blk.w])
                out[blk.b] = g_inv @ torch.addmv(grads[blk.b] * a_bb, gw, a_wb)
            return out
        for j, blk in enumerate(self.blocks):
            la, qa, _, _ = blk.eig()
            if qa.shape[0] != qa.shape[1]:  # a low-rank input factor: the general solve
                vs = [g.reshape(1, -1) for g in grads]
                flat = list(vs)
                blk.from_matrix(blk.solve(blk.to_matrix(vs, 1), damping), flat, 1)
                for i in (blk.w, blk.b):
                    if i is not None:
                        out[i] = flat[i].reshape(grads[i].shape)
                continue
            _, _, qg, qgT, qa_w, qa_wT, qa_b, inv = self._plan(j, damping)
            gw = grads[blk.w].reshape(qg.shape[0], -1)
            x = gw @ qa_w
            if qa_b is not None:
                x.addr_(grads[blk.b], qa_b)
            y = qg @ (qgT @ x).mul_(inv)
            out[blk.w] = (y @ qa_wT).view_as(grads[blk.w])
            if qa_b is not None:
                out[blk.b] = y @ qa_b
        return out

    def _apply(self, params: list[Tensor], grads: list[Tensor]) -> None:
        group = self.param_groups[0]
        lr, mom, wd, clip = group["lr"], group["momentum"], group["weight_decay"], group["kl_clip"]
        D = self.preconditioned(grads)
        if clip > 0:  # nu on the device (no host sync), in float64 as a Python float would be
            vg = torch.stack([torch.vdot(d.reshape(-1), g.reshape(-1)) for d, g in zip(D, grads)]).sum().double()
            nu = torch.where(vg > 0, (clip / (lr * lr * vg)).sqrt().clamp(max=1.0), torch.ones_like(vg))
            D = torch._foreach_mul(D, nu.to(D[0].dtype))
        if wd != 0:
            D = torch._foreach_add(D, params, alpha=wd)
        if mom > 0:
            bufs = [self.state[p].get("momentum_buffer") for p in params]
            if any(b is None for b in bufs):  # the first step (or a parameter added since): per tensor
                for i, (p, b, d) in enumerate(zip(params, bufs, D)):
                    bufs[i] = self.state[p]["momentum_buffer"] = d.clone() if b is None else b.mul_(mom).add_(d)
            else:
                torch._foreach_mul_(bufs, mom)
                torch._foreach_add_(bufs, D)
            D = bufs
        torch._foreach_add_(params, D, alpha=-lr)

    # -- checkpointing --------------------------------------------------------------------------
    def _extra_state(self) -> dict:
        return {"factor_updates": self.factor_updates,
                "factors": [[blk._A, blk.G] for blk in self.blocks if blk._A is not None],
                "eig": [list(blk._eig) for blk in self.blocks if blk._eig is not None],
                "inverses": [list(inv) for inv in self._inverses]}

    def _load_extra_state(self, extra: dict) -> None:
        self.factor_updates = int(extra.get("factor_updates", 0))
        self._inverse_of = None  # loaded factors: the next inverse step decomposes them
        self._pending = None if self.model is not None else extra
        factors, eig = extra.get("factors", []), extra.get("eig", [])
        for j, blk in enumerate(self.blocks):
            blk._A, blk.G = (factors[j][0].clone(), factors[j][1].clone()) if j < len(factors) else (None, None)
            blk._eig = tuple(t.clone() for t in eig[j]) if j < len(eig) else None
        self._inverses = [[t.clone() for t in inv] for inv in extra.get("inverses", [])]


def _make(params, *, seed: int, **options) -> KFAC:
    return KFAC(params, seed=seed, **options)


OPTIMIZERS.add(
    "kfac", _make, "K-FAC: Kronecker-factored natural gradient for Linear and Conv2d layers "
    "(Martens & Grosse 2015; Grosse & Martens 2016)", options=OPTIONS, paper="Martens & Grosse 2015",
)
