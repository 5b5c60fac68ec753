"""Critical points of a tiny network, found by minimising the squared gradient norm, and their
Morse index against their loss (Dauphin et al. 2014, "Identifying and attacking the saddle point
problem in high-dimensional non-convex optimization", Fig. 1; Pennington & Bahri 2017).

Starts: full-batch gradient descent from the model's weights for ``train_steps`` steps of
``lr``; start ``s`` of ``S`` is the iterate after ``round(train_steps * (s / (S-1))^2)`` steps
(dense early, where the loss falls fast) plus Gaussian noise of ``noise`` times the weights' rms,
so starts lie at every loss level from chance down to the trained one.

Search: from each start, a damped Newton iteration on the gradient ``g(theta)`` (Levenberg-
Marquardt on the residual ``g``, whose Jacobian is the Hessian ``H``): with ``H = Q diag(l) Q^T``,
the step ``-Q diag(l / (l^2 + mu)) Q^T g`` minimises ``||g + H d||^2 + mu ||d||^2``, so it
descends ``||g||^2`` and is attracted to every critical point whatever its index (Newton's
method, unlike gradient descent on the loss, is not repelled by saddles). A step that lowers
``||g||`` is taken and ``mu`` shrinks (x 0.3), else ``mu`` grows (x 10). Stops at
``||g|| <= grad_tol`` (converged) or after ``iters`` iterations. Networks' critical points are
often degenerate (zero Hessian eigenvalues from symmetries), where Newton converges only
linearly: a tolerance far below ``1e-5`` may need hundreds of iterations. ``||g||^2`` also has minima that
are not critical points (Pennington & Bahri's caveat); those end not converged and are reported,
not plotted as critical points.

Index: the exact dense Hessian in float64 (``torch.func.hessian``) and its eigenvalues
(:func:`gradlab.probes.critical.dense_eigenvalues`); an eigenvalue counts as negative (positive)
below ``-tol`` (above ``tol``), ``tol = max(solver bound, eig_tol * max|lambda|)``: at a point
known only to ``||g|| <= grad_tol`` the eigenvalues of the nearby exact critical point differ by
about ``||d^3 L|| ||H^-1 g||``, far above the solver's rounding, and networks have flat directions
(symmetries) whose eigenvalues are zero. The Morse index is ``#negative / n``.
"""

from __future__ import annotations

import copy
import math

from gradlab.core.errors import GradlabError
from gradlab.core.options import Option, Options
from gradlab.probes import PROBES
from gradlab.probes.base import Probe, ProbeContext, ProbeReport
from gradlab.probes.source import batch_options

OPTIONS = Options(
    Option("starts", int, 20, "Starts of the search (points along a gradient-descent run, plus noise)", low=1),
    Option("train_steps", int, 2000, "Full-batch gradient-descent steps that the starts are spread over", low=0),
    Option("lr", float, 0.5, "Learning rate of that gradient descent", low=0, low_open=True),
    Option("noise", float, 0.1, "Noise added to each start, relative to the weights' rms", low=0),
    Option("iters", int, 100, "Damped Newton iterations on the gradient per start", low=1),
    Option("grad_tol", float, 1e-5, "Converged (a critical point) when the gradient norm is at most this",
           low=0, low_open=True),
    Option("eig_tol", float, 1e-6, "Eigenvalues within eig_tol * max|eigenvalue| of 0 count as zero", low=0),
    Option("max_params", int, 3000, "Refuse networks with more parameters (dense n x n Hessian)", low=1),
) + batch_options(1, 256, "Batches making the full-batch loss")


def flat_problem(model, loss_fn, batches):
    """``(theta0, loss)``: the model's trainable weights as one float64 vector and ``loss(theta)``,
    the mean loss over all of ``batches`` (float64 copies of the model and the data)."""
    import torch
    from torch.func import functional_call

    m = copy.deepcopy(model).double()
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    shapes = [p.shape for n, p in m.named_parameters() if p.requires_grad]
    sizes = [math.prod(s) for s in shapes]
    theta0 = torch.cat([p.detach().reshape(-1) for n, p in m.named_parameters() if p.requires_grad])
    x = torch.cat([xb for xb, _ in batches]).double()
    y = torch.cat([yb for _, yb in batches])
    buffers = dict(m.named_buffers())
    m.eval()

    def loss(theta):
        parts = torch.split(theta, sizes)
        params = {n: t.view(s) for n, t, s in zip(names, parts, shapes)}
        return loss_fn(functional_call(m, (params, buffers), (x,)), y)

    return theta0, loss


def newton_on_gradient(loss, theta, *, iters: int = 100, grad_tol: float = 1e-5, mu: float = 1e-3):
    """Damped Newton on ``g(theta)`` (module docstring): returns ``(theta, grad_norm, iterations,
    converged)``."""
    import torch
    from torch.func import grad, hessian

    g_of, h_of = grad(loss), hessian(loss)
    g = g_of(theta)
    gn = float(g.norm())
    it = 0
    while it < iters and gn > grad_tol and math.isfinite(gn):
        it += 1
        lam, Q = torch.linalg.eigh(h_of(theta))
        c = Q.T @ g
        while True:
            step = -(Q @ (lam / (lam * lam + mu) * c))
            cand = theta + step
            g_new = g_of(cand)
            gn_new = float(g_new.norm())
            if gn_new < gn:
                theta, g, gn, mu = cand, g_new, gn_new, max(mu * 0.3, 1e-12)
                break
            mu *= 10.0
            if mu > 1e12:  # no step lowers ||g||: a minimum of ||g||^2 that is not critical
                return theta, gn, it, False
    return theta, gn, it, gn <= grad_tol


def morse_index(H, eig_tol: float = 1e-6) -> dict:
    """Signs of the eigenvalues of the dense symmetric ``H`` (module docstring): ``index``
    (#negative / n), the counts, the extreme eigenvalues and the zero tolerance used."""
    from gradlab.probes.critical import dense_eigenvalues

    ev, err = dense_eigenvalues(H)
    tol = max(err, eig_tol * float(ev.abs().max()))
    neg, pos = int((ev < -tol).sum()), int((ev > tol).sum())
    n = len(ev)
    return {"morse_index": neg / n, "n_negative": neg, "n_positive": pos, "n_zero": n - neg - pos,
            "eig_min": float(ev[0]), "eig_max": float(ev[-1]), "zero_tol": tol}


def _starts(theta0, loss, opts, seed):
    """The starts of the module docstring: ``[(gd_step, theta)]``."""
    import torch
    from torch.func import grad

    S, T = opts["starts"], opts["train_steps"]
    want = sorted({round(T * (s / max(S - 1, 1)) ** 2) for s in range(S)})
    at = [round(T * (s / max(S - 1, 1)) ** 2) for s in range(S)]
    snaps, theta, g_of = {}, theta0.clone(), grad(loss)
    for t in range(T + 1):
        if t in want:
            snaps[t] = theta.clone()
        if t == T:
            break
        theta = theta - opts["lr"] * g_of(theta)
    gen = torch.Generator().manual_seed(seed)
    rms = float(theta0.pow(2).mean().sqrt())
    return [(t, snaps[t] + opts["noise"] * rms * torch.randn(theta0.shape, generator=gen, dtype=theta0.dtype))
            for t in at]


@PROBES.register("critical-points", "critical points of a tiny network (Newton on the gradient) and their "
                 "Morse index against their loss", options=OPTIONS, paper="Dauphin et al. 2014")
class CriticalPointsProbe(Probe):
    """Critical points of a tiny network and their Morse index against their loss (Dauphin et al. 2014): from --starts points spread along a full-batch gradient-descent run (plus --noise), a damped Newton iteration on the gradient minimises the squared gradient norm until it is at most --grad-tol; at each point found, the exact dense Hessian (float64) gives the Morse index, the fraction of negative eigenvalues. critical_points.csv has one row per start (converged or not); the plot shows index against loss. For networks of at most --max-params parameters.
    """

    training = False

    def prepare(self, ctx: ProbeContext) -> dict:
        n = sum(p.numel() for p in ctx.model.parameters() if p.requires_grad)
        if n > ctx.options["max_params"]:
            raise GradlabError(f"critical-points needs a tiny network: the model has {n} parameters, more than "
                               f"--max-params {ctx.options['max_params']} (try --width 4 --depth 1)")
        return {"n_params": n}

    def run(self, ctx: ProbeContext) -> ProbeReport:
        import pandas as pd
        from torch.func import hessian

        opts = ctx.options
        theta0, loss = flat_problem(ctx.model, ctx.loss_fn, ctx.batches)
        rows = []
        starts = _starts(theta0, loss, opts, ctx.seed)
        for s, (t, theta) in enumerate(starts):
            start_loss = float(loss(theta))
            theta, gn, it, ok = newton_on_gradient(loss, theta, iters=opts["iters"], grad_tol=opts["grad_tol"])
            row = {"start": s, "gd_step": t, "start_loss": start_loss, "loss": float(loss(theta)), "grad_norm": gn,
                   "iterations": it, "converged": bool(ok)}
            if math.isfinite(gn):
                row.update(morse_index(hessian(loss)(theta), opts["eig_tol"]))
            rows.append(row)
            ctx.report_progress(s + 1, len(starts))
        table = pd.DataFrame(rows)
        return _report(table, len(theta0))


def _report(table, n: int) -> ProbeReport:
    found = table[table["converged"]] if len(table) else table
    scalars = {"critical_points": float(len(found)), "n_params": float(n)}
    lines = [f"{len(found)} of {len(table)} starts reached a critical point (|g| <= grad_tol); {n} parameters"]
    if len(found) >= 3 and found["loss"].nunique() > 1 and found["morse_index"].nunique() > 1:
        rho = float(found["loss"].rank().corr(found["morse_index"].rank()))
        scalars["spearman_loss_index"] = rho
        trend = "higher loss, more negative directions" if rho > 0.3 else (
            "no clear relation between loss and index" if rho > -0.3 else "higher loss, FEWER negative directions")
        lines.append(f"Spearman correlation of loss and Morse index {rho:.3f}: {trend}")
    elif len(found):
        lines.append("too few distinct critical points for a correlation")
    view_cols = [c for c in ("start", "gd_step", "loss", "grad_norm", "iterations", "morse_index", "n_negative",
                             "n_zero") if c in table.columns]
    return ProbeReport(table=table, view=table[view_cols], title="critical points: loss and Morse index",
                       scalars=scalars, summary_lines=lines, figures={"critical_points": index_plot(table)},
                       metrics={f"critical_{k}": v for k, v in scalars.items()})


def index_plot(table):
    """Morse index against loss: critical points filled, starts that did not converge hollow."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.6, 4.2), layout="constrained")
    if "morse_index" in table.columns:
        ok = table["converged"].astype(bool)
        ax.scatter(table.loc[ok, "loss"], table.loc[ok, "morse_index"], c="tab:blue", s=28, label="critical point")
        ax.scatter(table.loc[~ok, "loss"], table.loc[~ok, "morse_index"], facecolors="none", edgecolors="tab:grey",
                   s=28, label="not converged")
        ax.legend(fontsize=8)
    ax.set_xlabel("loss")
    ax.set_ylabel("Morse index (fraction of negative eigenvalues)")
    ax.set_title("critical points: index against loss")
    return fig


__all__ = ["CriticalPointsProbe", "flat_problem", "index_plot", "morse_index", "newton_on_gradient"]
