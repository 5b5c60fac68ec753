"""What ``gradlab probe hessian`` prints: the overview table and the summary sentences (the point's
type, the learning rate against the stability bound 2/lambda_max, caveats)."""

from __future__ import annotations

from typing import Optional

# Optimizers whose step is a plain (stochastic) gradient step, for which 2/lambda_max bounds the lr.
SGD_LIKE = ("sgd", "momentum", "nesterov", "gd", "curvature-gd", "langevin")


def overview_frame(rep):
    """The terminal table of a :class:`~gradlab.probes.hessian.HessianReport`: one row per quantity (the full long table is hessian.csv)."""
    import pandas as pd

    rows = [(f"lambda_{i + 1} (top)", v, None) for i, v in enumerate(rep.top)]
    rows += [(f"lambda_min{'' if i == 0 else f'+{i}'} (bottom)", v, None) for i, v in enumerate(rep.bottom)]
    if rep.trace is not None:
        rows.append((f"trace ({rep.trace_method})", rep.trace, rep.trace_stderr))
    rows += [("gradient norm", rep.grad_norm, None), ("loss", rep.loss, None),
             ("stability bound 2/lambda_max", rep.stability_bound, None)]
    if rep.lr is not None:
        rows.append(("learning rate", rep.lr, None))
    morse = rep.morse()
    if morse:
        rows += [("Morse index (negative share)", morse["morse_index"], morse["morse_index_stderr"]),
                 ("Morse index bracket, low", morse["morse_index_low"], None),
                 ("Morse index bracket, high", morse["morse_index_high"], None)]
    rows.append((f"{'Hessian' if rep.matrix == 'hessian' else rep.matrix}-vector products", float(rep.num_matvecs), None))
    return pd.DataFrame(rows, columns=["quantity", "value", "stderr"]).astype({"stderr": float})


def summary_lines(rep, opt: Optional[str]) -> list:
    """The point's type, the learning rate against 2/lambda_max, and caveats, as sentences."""
    lines = [f"point: {rep.classification.line()}"]
    bound = rep.stability_bound
    if rep.lr is None:
        lines.append(f"stability: gradient descent is stable on this quadratic model for lr < 2/lambda_max = {bound:.4g}")
    elif rep.lr_above_bound:
        lines.append(f"WARNING: lr {rep.lr:g} is ABOVE the gradient-descent stability bound 2/lambda_max = {bound:.4g} "
                     f"(x{rep.lr / bound:.3g}): plain GD would diverge along the top eigenvector here "
                     f"(or sit at the edge of stability)")
    else:
        lines.append(f"stability: lr {rep.lr:g} is below the bound 2/lambda_max = {bound:.4g} (x{rep.lr / bound:.3g})")
    if rep.lr is not None and opt is not None and opt not in SGD_LIKE:
        lines.append(f"note: the run used --opt {opt}; 2/lambda_max bounds plain (S)GD steps, an adaptive "
                     f"optimizer's effective step differs per coordinate")
    if rep.density is not None and rep.matrix == "hessian":
        m = rep.morse_index()
        lines.append(f"Morse index: {100 * m.value:.1f}% +- {100 * m.std_error:.1f}% of directions have negative "
                     f"curvature, bracket [{100 * m.low:.1f}%, {100 * m.high:.1f}%] (Gauss-Radau SLQ over "
                     f"{m.starts} starts)")
    lines += [f"note: {n}" for n in rep.notes]
    return lines


__all__ = ["SGD_LIKE", "overview_frame", "summary_lines"]
