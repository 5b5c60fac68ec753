"""Dense references of the curvature matrices on a few coordinates, built apart from the operators.

:func:`dense_at` returns ``A[idx][:, idx]`` for a :class:`~gradlab.curvature.model_op.ModelOperator`
``op`` (its model, loss, batches, mode and parameters) without calling its products: the chosen
coordinates become one leaf vector ``x`` (the other parameters fixed) and

* ``hessian``: ``d^2 L / dx^2`` column by column, by double backward through ``torch.func.functional_call``;
* ``ggn``: the output Jacobian ``J = dz/dx`` by one forward-mode pass per coordinate, then
  ``J^T (d^2 L/dz^2) J`` with one output-space Hessian product per coordinate (exact for any loss);
* ``fisher`` / ``empirical-fisher``: the per-example losses at the operator's labels (the Fisher's
  sampled labels, the data's labels) differentiated by forward mode, ``c/M sum g g^T``;
* ``kfac``: the entries ``G[o, o'] A[k, k']`` of each layer's Kronecker product ``G (x) A``
  from the operator's factors (the K-FAC matrix is defined by them), never multiplying a vector.

Each costs about one pass per coordinate, so it is meant for a few hundred coordinates
(``gradlab probe hessian --verify``). In eval mode the reference is computed in float64 on a copy
of the model; in train mode in the model's dtype (dropout masks are drawn per dtype).
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import Tensor

from gradlab.core.errors import GradlabError
from gradlab.core.modelstate import model_state


class _Coordinates:
    """The operator's model as a function of the coordinates ``idx`` of its flat vector."""

    def __init__(self, op, idx: Tensor, dtype):
        self.op, self.names = op, op.registered_names("a dense reference matrix")
        self.model = op.model if dtype == op.dtype else copy.deepcopy(op.model).to(dtype)
        self.base = torch.cat([p.detach().reshape(-1) for p in op.params]).to(dtype)
        self.idx = idx.to(self.base.device)
        self.shapes = [p.shape for p in op.params]
        self.sizes = [p.numel() for p in op.params]
        self.x0 = self.base[self.idx].clone()
        self.batches = [(x.to(dtype) if x.is_floating_point() else x, y) for x, y in op.batches]

    def params_of(self, xs: Tensor) -> dict:
        flat = self.base.index_put((self.idx,), xs)
        return {n: c.view(s) for n, c, s in zip(self.names, torch.split(flat, self.sizes), self.shapes)}

    @contextlib.contextmanager
    def context(self, i: int):
        train = self.op.mode == "train"
        with model_state(self.model, train=train, keep_bn_stats=train), torch.random.fork_rng():
            torch.manual_seed(self.op.seed + i)
            yield

    def outputs(self, i: int, xs: Tensor) -> Tensor:
        from torch.func import functional_call

        with self.context(i):
            return functional_call(self.model, self.params_of(xs), (self.batches[i][0],))

    def jvp_columns(self, fn) -> Tensor:
        """``d fn(x) / dx_j`` for every coordinate ``j``: (m, *fn(x).shape), forward mode."""
        from torch.func import jvp

        eye = torch.eye(self.x0.numel(), dtype=self.x0.dtype, device=self.x0.device)
        return torch.stack([jvp(fn, (self.x0,), (eye[j],))[1].detach() for j in range(len(eye))])


def dense_at(matrix: str, op, idx: Tensor) -> Tensor:
    """``A[idx][:, idx]`` of the matrix ``matrix`` of ``op`` (module docstring), float64 in eval mode."""
    dtype = torch.float64 if op.mode == "eval" else op.dtype
    c = _Coordinates(op, torch.as_tensor(idx, dtype=torch.long), dtype)
    if matrix == "kfac":
        return _kfac(op, c.idx)
    m = c.x0.numel()
    out = torch.zeros(m, m, dtype=dtype, device=c.x0.device)
    for i, w in enumerate(op.weights):
        y = c.batches[i][1]
        if matrix == "hessian":
            xs = c.x0.clone().requires_grad_(True)
            with torch.enable_grad():
                g = torch.autograd.grad(op.loss_fn(c.outputs(i, xs), y), xs, create_graph=True)[0]
                cols = [torch.autograd.grad(g[j], xs, retain_graph=j < m - 1, allow_unused=True)[0] for j in range(m)]
            H = torch.stack([torch.zeros_like(xs) if col is None else col for col in cols], dim=1)
            out += w * (H + H.T) / 2
        elif matrix == "ggn":
            J = c.jvp_columns(lambda xs: c.outputs(i, xs))  # (m, N, C)
            z = c.outputs(i, c.x0).detach().requires_grad_(True)
            with torch.enable_grad():
                gz = torch.autograd.grad(op.loss_fn(z, y), z, create_graph=True)[0]
                HJ = torch.stack([torch.autograd.grad(gz, z, J[j], retain_graph=True)[0] for j in range(m)])
            out += w * J.reshape(m, -1) @ HJ.reshape(m, -1).T
        elif matrix in ("fisher", "empirical-fisher"):
            lik = op.likelihood
            z0, labels = op.batch_labels(i)
            M = labels.shape[0]

            def losses(xs):
                z = c.outputs(i, xs)
                lab = labels.to(z.dtype) if labels.is_floating_point() else labels
                if lik.kind == "cross-entropy":
                    zz = z.unsqueeze(0).expand(M, *z.shape).reshape(-1, z.shape[-1])
                    return torch.nn.functional.cross_entropy(zz, lab.reshape(-1), reduction="none")
                return (z.unsqueeze(0) - lab).pow(2).sum(-1).reshape(-1)

            R = c.jvp_columns(losses)  # (m, N M): d l_n(y_nm) / dx_j
            out += w * (lik.factor(z0) / M) * (R @ R.T)
        else:
            raise GradlabError(f"no dense reference for matrix {matrix!r}")
    return out


def _kfac(op, idx: Tensor) -> Tensor:
    """Entries of ``diag_l(G_l (x) A_l)`` at ``idx``: coordinate -> (layer, output row, input column)."""
    offsets = torch.tensor([0] + [p.numel() for p in op.params]).cumsum(0)
    n_idx = idx.numel()
    layer = torch.full((n_idx,), -1, dtype=torch.long)
    row = torch.zeros(n_idx, dtype=torch.long)
    col = torch.zeros(n_idx, dtype=torch.long)
    ix = idx.cpu()
    for bi, blk in enumerate(op.blocks):
        o = blk.G.shape[0]
        kp = blk.A.shape[0]
        for which, is_bias in ((blk.w, False), (blk.b, True)):
            if which is None:
                continue
            lo, hi = int(offsets[which]), int(offsets[which + 1])
            sel = (ix >= lo) & (ix < hi)
            local = ix[sel] - lo
            layer[sel] = bi
            if is_bias:
                row[sel], col[sel] = local, kp - 1
            else:
                k = (hi - lo) // o
                row[sel], col[sel] = local // k, local % k
    out = torch.zeros(n_idx, n_idx, dtype=torch.float64)
    for bi, blk in enumerate(op.blocks):
        sel = (layer == bi).nonzero().reshape(-1)
        if sel.numel():
            G, A = blk.G.double().cpu(), blk.A.double().cpu()
            r, k = row[sel], col[sel]
            out[sel[:, None], sel[None, :]] = G[r[:, None], r[None, :]] * A[k[:, None], k[None, :]]
    return out.to(op.device)


__all__ = ["dense_at"]
