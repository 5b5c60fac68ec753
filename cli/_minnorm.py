"""Outputs of a minimum-norm attack run (fab, cw, deepfool, fmn) besides attack.csv.

``min_norms.csv`` (one row per example: its smallest adversarial norm, inf when none was found,
0 when the clean input was already wrong), ``norm_curve.csv`` (the robust-accuracy-vs-eps step
function those norms imply), the plot ``robust_acc_vs_norm`` (PNG and TensorBoard), TensorBoard
scalars of the quartiles, and a short terminal table.
"""

from __future__ import annotations

#: Columns the report adds for a minimum-norm attack (shown in their own terminal table).
NORM_COLUMNS = ["n_attacked", "n_found", "q25_norm", "median_norm", "q75_norm"]


def write_minimum_norms(run_dir, result, attack: str, cfg: dict, eps_list: list) -> dict:
    """Write the files of the module docstring; returns the quartile figures (for the summary)."""
    import pandas as pd

    from gradlab.attacks.minnorm import norm_curve, norm_summary
    from gradlab.attacks.plots import robust_acc_vs_norm
    import torch

    norms = result.norms
    adv_pred = result.min_pred
    run_dir.write_csv("min_norms.csv", pd.DataFrame({
        "index": range(len(norms)), "label": result.y.numpy(), "clean_pred": result.clean_pred.numpy(),
        "norm": norms.numpy(), "found": torch.isfinite(norms).numpy(), "adv_pred": adv_pred.numpy()}))
    curve = norm_curve(norms)
    run_dir.write_csv("norm_curve.csv", curve)
    figures = norm_summary(norms, result.clean_pred == result.y)
    run_dir.log_metrics(0, None, "attack", {k: float(v) for k, v in figures.items()})
    run_dir.save_figure(robust_acc_vs_norm(curve, figures["median_norm"], cfg["norm"], eps_list,
                                           title=f"{attack} minimum norms ({cfg['norm']})"), "robust_acc_vs_norm")
    return figures


def terminal_table(result, figures: dict):
    """A DataFrame within 80 columns: the quartiles, and robust accuracy at those norms."""
    import pandas as pd

    from gradlab.attacks.minnorm import robust_at

    rows = []
    for name in ("q25_norm", "median_norm", "q75_norm"):
        e = figures[name]
        rows.append({"norm quartile": name[:-5], "eps": e, "robust_acc": robust_at(result.norms, e)})
    return pd.DataFrame(rows)

