"""Figures for attack runs: accuracy against eps, and clean / adversarial / perturbation grids.

Both return a matplotlib Figure (the caller saves it, e.g. with ``RunDir.save_figure``).
Images are ``(C, H, W)`` with C = 1 (grey) or 3 (RGB), values in [0, 1]; other shapes
(e.g. flat feature vectors) are drawn as a 1-row strip.
"""

from __future__ import annotations

from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from torch import Tensor  # noqa: E402


def accuracy_vs_eps(table: pd.DataFrame, title: Optional[str] = None):
    """Robust accuracy against eps per attack, with clean accuracy as a dashed line.

    ``table`` has the columns of :data:`gradlab.attacks.report.COLUMNS` (several attacks allowed).
    """
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    for attack, part in table.groupby("attack", sort=False):
        part = part.sort_values("eps")
        ax.plot(part["eps"], part["robust_acc"], marker="o", label=f"{attack} robust")
    clean = float(table["clean_acc"].iloc[0])
    ax.axhline(clean, color="grey", linestyle="--", linewidth=1, label=f"clean ({clean:.3f})")
    ax.set_xlabel("eps (pixel units)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "accuracy under attack")
    fig.tight_layout()
    return fig


def _as_image(t: Tensor) -> tuple[np.ndarray, Optional[str]]:
    a = t.detach().cpu().float().numpy()
    if a.ndim == 3 and a.shape[0] in (1, 3):
        return (a[0], "gray") if a.shape[0] == 1 else (np.transpose(a, (1, 2, 0)), None)
    if a.ndim == 2:
        return a, "gray"
    return a.reshape(1, -1), "gray"


def grid_examples(y: Tensor, pred_clean: Tensor, n: int) -> list[int]:
    """Indices of the examples a grid shows: the first ``n`` the model classified correctly
    before the attack (an attack on an example that was already wrong shows nothing), then,
    when fewer than ``n`` were correct, the first wrong ones."""
    ok = (pred_clean.detach().cpu().view(-1) == y.detach().cpu().view(-1)).tolist()
    right = [i for i, good in enumerate(ok) if good]
    wrong = [i for i, good in enumerate(ok) if not good]
    return (right + wrong)[: max(1, min(int(n), len(ok)))]


def adversarial_grid(
    x: Tensor,
    x_adv: Tensor,
    y: Tensor,
    pred_clean: Tensor,
    pred_adv: Tensor,
    n: int = 8,
    eps: Optional[float] = None,
    class_names: Optional[Sequence[str]] = None,
    title: Optional[str] = None,
):
    """Three rows for ``n`` examples (:func:`grid_examples`: ones the model got right before the
    attack first): clean, adversarial, perturbation.

    ``x``, ``x_adv`` (N, *input_shape), ``y``, ``pred_clean``, ``pred_adv`` (N,): pass every
    attacked example, not only the first ``n``, so that the grid can choose. Titles give the true
    label and the predictions (red when wrong; a clean column that was already wrong says so).
    The perturbation ``x_adv - x`` is drawn with a diverging colour map scaled to +-max|delta| of
    the shown examples (stated in the row label), so tiny perturbations stay visible.
    """
    idx = grid_examples(y, pred_clean, n)
    n = len(idx)
    name = (lambda c: class_names[int(c)]) if class_names else (lambda c: str(int(c)))
    delta = (x_adv[idx] - x[idx]).detach().cpu().float()
    scale = float(delta.abs().max()) or 1.0
    fig, axes = plt.subplots(3, n, figsize=(1.35 * n + 0.8, 4.6), squeeze=False)
    for col, i in enumerate(idx):
        img, cmap = _as_image(x[i])
        axes[0, col].imshow(img, cmap=cmap, vmin=0, vmax=1)
        ok = int(pred_clean[i]) == int(y[i])
        axes[0, col].set_title(f"#{i} y={name(y[i])}\npred {name(pred_clean[i])}" + ("" if ok else " (wrong)"),
                               fontsize=7, color="black" if ok else "red")
        img, cmap = _as_image(x_adv[i])
        axes[1, col].imshow(img, cmap=cmap, vmin=0, vmax=1)
        ok = int(pred_adv[i]) == int(y[i])
        axes[1, col].set_title(f"pred {name(pred_adv[i])}", fontsize=7, color="black" if ok else "red")
        d, _ = _as_image(delta[col])
        if d.ndim == 3:  # RGB perturbation: show its mean over channels
            d = d.mean(axis=2)
        axes[2, col].imshow(d, cmap="seismic", vmin=-scale, vmax=scale)
        for r in range(3):
            axes[r, col].set_xticks([])
            axes[r, col].set_yticks([])
    axes[0, 0].set_ylabel("clean", fontsize=8)
    axes[1, 0].set_ylabel("adversarial", fontsize=8)
    axes[2, 0].set_ylabel(f"delta (±{scale:.3g})", fontsize=8)
    n_right = sum(int(pred_clean[i]) == int(y[i]) for i in idx)
    shown = ("examples correct before the attack" if n_right == n
             else f"{n_right} of {n} shown correct before the attack (no more were)")
    fig.suptitle(f"{title or (f'eps = {eps:g}' if eps is not None else 'adversarial examples')}: {shown}", fontsize=9)
    fig.tight_layout()
    return fig


def robust_acc_vs_norm(curve: pd.DataFrame, median: float, norm: str, eps: Sequence[float] = (),
                       title: Optional[str] = None):
    """The robust-accuracy-vs-eps step function of a minimum-norm attack's norms (one run).

    ``curve`` has :data:`gradlab.attacks.minnorm.CURVE_COLUMNS`; the median norm is a dotted
    vertical line (left out when infinite) and the budgets ``eps`` of the sweep are marked.
    """
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    xs, ys = curve["eps"].to_numpy(), curve["robust_acc"].to_numpy()
    ax.step(xs, ys, where="post", label="robust accuracy")
    if np.isfinite(median):
        ax.axvline(median, color="grey", linestyle=":", linewidth=1, label=f"median norm {median:.3g}")
    for e in eps:
        at = ys[max(int(np.searchsorted(xs, e, side="right")) - 1, 0)]
        ax.plot([e], [at], marker="o", color="C1")
    ax.set_xlabel(f"eps ({norm}, pixel units)" if norm != "l0" else "eps (changed features)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "robust accuracy implied by the minimum norms")
    fig.tight_layout()
    return fig
