"""Mode connectivity: low-loss curves between two trained networks (Garipov, Izmailov, Podoprikhin,
Vetrov, Wilson, "Loss Surfaces, Mode Connectivity, and Fast Ensembling of DNNs", NeurIPS 2018).

Two endpoints ``w_a``, ``w_b`` (weight dicts of the same architecture) and one trainable bend
``theta``, initialised at the midpoint ``(w_a + w_b) / 2``:

* ``bezier`` (quadratic Bezier curve): ``phi(t) = (1-t)^2 w_a + 2t(1-t) theta + t^2 w_b``;
* ``polychain`` (two segments): ``phi(t) = w_a + 2t (theta - w_a)`` for ``t <= 1/2``, then
  ``theta + (2t - 1)(w_b - theta)``.

Training minimises ``E_{t ~ U(0,1)} L(phi(t))`` over ``theta`` (the paper's uniform-t objective,
one ``t`` per batch; ``L`` the runs' loss, cross-entropy or MSE, :mod:`gradlab.core.losses`). Evaluation recomputes BatchNorm statistics at every point (the paper's
Sec. 4) and compares the curve with the straight line ``(1-t) w_a + t w_b`` at the same ``t``.
The barrier of a path is ``max_t [L(t) - ((1-t) L(0) + t L(1))]`` (the loss above the linear
interpolation of the endpoint losses; Frankle et al. 2020's definition), reported for both.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional, Sequence

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradlab.core.errors import GradlabError
from gradlab.core.options import Option, Options
from gradlab.landscape.directions import interp_direction
from gradlab.landscape.functional import BN_BATCHES, EVAL_PRECISION, EVAL_SPLIT, LOSS, evaluate_at, train_points

CURVES = ("bezier", "polychain")

#: ``gradlab connect``'s options (Garipov et al. 2018).
CONNECT_OPTIONS = Options(
    Option("curve", str, "bezier", "bezier (quadratic Bezier) or polychain (two segments)", choices=CURVES),
    Option("epochs", int, 10, "epochs training the curve's bend", low=1),
    Option("lr", float, 0.05, "SGD learning rate (momentum 0.9, cosine schedule)", low=0, low_open=True),
    Option("batch_size", int, 128, "training batch size", low=1),
    Option("points", int, 21, "evaluated values of t in [0, 1]", low=2),
    EVAL_SPLIT,
    BN_BATCHES,
    EVAL_PRECISION,
    LOSS,
)


def curve_point(kind: str, t, w_a: Mapping[str, Tensor], w_b: Mapping[str, Tensor], bend: Mapping[str, Tensor]) -> dict:
    """The weights ``phi(t)`` on curve ``kind`` (module docstring); ``t`` a float in [0, 1]."""
    t = float(t)
    if kind == "bezier":
        ca, cb, cm = (1 - t) ** 2, t**2, 2 * t * (1 - t)
        return {n: ca * w_a[n] + cm * bend[n] + cb * w_b[n] for n in w_a}
    if kind == "polychain":
        if t <= 0.5:
            s = 2 * t
            return {n: (1 - s) * w_a[n] + s * bend[n] for n in w_a}
        s = 2 * t - 1
        return {n: (1 - s) * bend[n] + s * w_b[n] for n in w_a}
    raise GradlabError(f"unknown curve {kind!r}; choose from: {', '.join(CURVES)}")


def line_point(t, w_a: Mapping[str, Tensor], w_b: Mapping[str, Tensor]) -> dict:
    t = float(t)
    return {n: (1 - t) * w_a[n] + t * w_b[n] for n in w_a}


def barrier(ts: Sequence[float], losses: Sequence[float]) -> float:
    """``max_t [L(t) - ((1-t) L(t_0) + t L(t_1))]`` with ``t_0, t_1`` the first and last ``ts`` (0 and 1)."""
    l0, l1 = losses[0], losses[-1]
    return max(loss - ((1 - t) * l0 + t * l1) for t, loss in zip(ts, losses))


def train_curve(
    model: nn.Module,
    w_a: Mapping[str, Tensor],
    w_b: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    *,
    kind: str = "bezier",
    epochs: int = 10,
    lr: float = 0.05,
    batch_size: int = 128,
    seed: int = 0,
    device="cpu",
    on_epoch: Optional[Callable[[int, dict], None]] = None,
    loss_fn: Optional[Callable] = None,
):
    """Train the bend of a ``kind`` curve between ``w_a`` and ``w_b`` (endpoints fixed) on the
    mean batch loss ``loss_fn`` (default cross-entropy).

    Returns ``(bend, history)``: the trained bend (name -> tensor) and per-epoch records.
    """
    if kind not in CURVES:
        raise GradlabError(f"unknown curve {kind!r}; choose from: {', '.join(CURVES)}")
    interp_direction(w_a, w_b)  # same parameter names and shapes, or a GradlabError
    bend = {n: (0.5 * (w_a[n] + w_b[n])).detach().clone().requires_grad_(True) for n in w_a}
    a = {n: t.detach() for n, t in w_a.items()}
    b = {n: t.detach() for n, t in w_b.items()}

    def make_params(g: torch.Generator):
        t = float(torch.rand((), generator=g, dtype=torch.float64))
        return curve_point(kind, t, a, b, bend), 0.0, {"t": t}

    hist = train_points(model, make_params, list(bend.values()), x, y, epochs=epochs, lr=lr,
                        batch_size=batch_size, seed=seed, device=device, on_epoch=on_epoch,
                        loss_fn=loss_fn or F.cross_entropy)
    return {n: t.detach() for n, t in bend.items()}, hist


def evaluate_paths(
    model: nn.Module,
    w_a: Mapping[str, Tensor],
    w_b: Mapping[str, Tensor],
    bend: Mapping[str, Tensor],
    batches: Sequence[tuple],
    bn_batches: Sequence[tuple],
    *,
    kind: str = "bezier",
    points: int = 21,
    progress: Optional[Callable[[int, int], None]] = None,
    dist=None,
    precision: str = "fp32",
    loss_fn: Optional[Callable] = None,
) -> tuple[pd.DataFrame, dict]:
    """Loss (``loss_fn``, default cross-entropy) and accuracy along the curve and along the
    straight line at ``points`` values of ``t``.

    Returns ``(table, metrics)``: columns ``t,loss,acc,line_loss,line_acc,excess,line_excess``
    (``excess`` = loss above the endpoints' linear interpolation, whose max is the barrier) and
    ``barrier``, ``line_barrier``, the endpoints' losses, and the curve's worst accuracy. Under
    torchrun (``dist``) each rank evaluates the values ``rank, rank + W, ...`` of ``t`` and the
    rows are gathered in order.
    """
    from gradlab.core.distributed import DistInfo, gather_objects, my_share

    dist = dist or DistInfo()
    if points < 2:
        raise GradlabError(f"invalid points: {points} (must be >= 2)")
    ts = torch.linspace(0, 1, points, dtype=torch.float64).tolist()
    rows, mine = [], my_share(len(ts), dist)
    for done, i in enumerate(mine):
        t = ts[i]
        loss = {"loss_fn": loss_fn or F.cross_entropy, "precision": precision}
        cl, ca = evaluate_at(model, curve_point(kind, t, w_a, w_b, bend), batches, bn_batches=bn_batches, **loss)
        ll, la = evaluate_at(model, line_point(t, w_a, w_b), batches, bn_batches=bn_batches, **loss)
        rows.append((i, {"t": t, "loss": cl, "acc": ca, "line_loss": ll, "line_acc": la}))
        if progress is not None:
            progress(done + 1, len(mine))
    df = pd.DataFrame([r for _, r in sorted(sum(gather_objects(rows, dist), []), key=lambda ir: ir[0])])
    for col, out in (("loss", "excess"), ("line_loss", "line_excess")):
        l0, l1 = df[col].iloc[0], df[col].iloc[-1]
        df[out] = df[col] - ((1 - df["t"]) * l0 + df["t"] * l1)
    metrics = {
        "barrier": barrier(ts, df["loss"].tolist()),
        "line_barrier": barrier(ts, df["line_loss"].tolist()),
        "loss_a": float(df["loss"].iloc[0]),
        "loss_b": float(df["loss"].iloc[-1]),
        "curve_max_loss": float(df["loss"].max()),
        "line_max_loss": float(df["line_loss"].max()),
        "curve_min_acc": float(df["acc"].min()),
        "line_min_acc": float(df["line_acc"].min()),
    }
    return df, metrics
