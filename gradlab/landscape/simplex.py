"""Loss-surface simplexes (Benton, Maddox, Lotfi, Wilson, "Loss Surface Simplexes for Mode
Connecting Volumes and Fast Ensembling", ICML 2021).

A simplex with vertices ``V_0 .. V_k`` (name -> tensor dicts over the model's parameters) holds the
weights ``sum_i a_i V_i`` for every ``a`` on the probability simplex. Training (the paper's
SPRO): start from a trained network as ``V_0``; add one vertex at a time, initialised at the
centroid of the current vertices plus a small filter-normalised random offset (a new vertex AT the
centroid would give zero volume, whose log is -inf); train only the new vertex, with the earlier
ones fixed, on

    E_{a ~ Dirichlet(1)} [ CE(sum_i a_i V_i) ] - R * log Vol(V_0 .. V_k),

one Dirichlet sample per batch (drawn as normalised Exp(1) samples, which is Dirichlet(1,..,1),
i.e. uniform on the simplex). ``Vol`` is the k-volume from the Cayley-Menger determinant of the
pairwise squared distances (:func:`cayley_menger_log_volume`), so ``R > 0`` pushes the vertices
apart while the loss term keeps the whole interior low.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence

import pandas as pd
import torch
from torch import Tensor, nn

from gradlab.core.errors import GradlabError
from gradlab.core.losses import DEFAULT_LOSS, loss_fn as named_loss
from gradlab.core.options import Option, Options
from gradlab.landscape.directions import random_directions, weights_of
from gradlab.landscape.functional import BN_BATCHES, EVAL_PRECISION, EVAL_SPLIT, LOSS, evaluate_at, train_points

#: ``gradlab simplex``'s options (Benton et al. 2021's SPRO recipe). The defaults were chosen on
#: digits MLPs (``gradlab train`` defaults, seeds 0-2): the former 5 epochs at lr 0.05 with R = 0.01
#: left the new vertices below the base model (ensemble 0.964 against 0.975 on seed 0); 30 epochs
#: per vertex at lr 0.1, R = 0.3 and offset 0.3 give an ensemble of 30 points with a lower test
#: loss than the base model on all three seeds (0.118/0.058/0.090 against 0.120/0.079/0.098) and
#: an accuracy of -1, +3 and -1 of 359 test examples against it: ``gradlab simplex`` says which.
SIMPLEX_OPTIONS = Options(
    Option("vertices", int, 3, "vertices K; vertex 0 is the run's weights", low=2),
    Option("epochs", int, 30, "training epochs for each added vertex", low=1),
    Option("volume_reg", float, 0.3, "R: weight of -log(volume) in the loss (pushes vertices apart)", low=0,
           paper="Benton et al. 2021"),
    Option("lr", float, 0.1, "SGD learning rate (momentum 0.9, cosine schedule)", low=0, low_open=True),
    Option("batch_size", int, 128, "training batch size", low=1),
    Option("samples", int, 30, "M random interior points evaluated and ensembled", low=1),
    Option("init_scale", float, 0.3, "offset of a new vertex from the centroid, relative to each filter's norm",
           low=0, low_open=True),
    EVAL_SPLIT,
    BN_BATCHES,
    EVAL_PRECISION,
    LOSS,
)


def cayley_menger_log_volume(points: Tensor) -> Tensor:
    """Log of the k-dimensional volume of the simplex spanned by ``points`` (k+1, D).

    Cayley-Menger: with ``B`` the (k+2, k+2) bordered matrix of squared distances,
    ``Vol^2 = (-1)^(k+1) det(B) / (2^k (k!)^2)``. Computed in float64 from pairwise differences
    (no Gram-matrix cancellation); differentiable. A degenerate simplex gives ``-inf``.
    """
    k = points.shape[0] - 1
    if k < 1:
        raise GradlabError("a simplex needs at least 2 vertices to have a volume")
    p = points.to(torch.float64)
    d2 = ((p.unsqueeze(0) - p.unsqueeze(1)) ** 2).sum(-1)  # (k+1, k+1)
    B = torch.ones(k + 2, k + 2, dtype=torch.float64, device=p.device)
    B[0, 0] = 0.0
    B[1:, 1:] = d2
    sign, logabs = torch.linalg.slogdet(B)
    if sign.item() * (-1) ** (k + 1) <= 0:
        return torch.tensor(float("-inf"), dtype=torch.float64)
    return 0.5 * (logabs - k * math.log(2.0) - 2 * math.lgamma(k + 1))


def simplex_volume(points: Tensor) -> float:
    """The k-volume of the simplex with vertices ``points`` (k+1, D), float64."""
    return math.exp(float(cayley_menger_log_volume(points)))


def sample_dirichlet(k: int, n: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """``n`` points uniform on the simplex of ``k`` vertices: Exp(1) samples normalised, (n, k) float64."""
    e = -torch.log(1.0 - torch.rand(n, k, generator=generator, dtype=torch.float64))  # Exp(1)
    return e / e.sum(dim=1, keepdim=True)


def combine(vertices: Sequence[Mapping[str, Tensor]], weights) -> dict:
    """``sum_i weights[i] * vertices[i]`` per parameter (weights a sequence or a 1-D tensor)."""
    w = [float(a) for a in weights] if not isinstance(weights, Tensor) or not weights.requires_grad else weights
    out = {}
    for n in vertices[0]:
        acc = vertices[0][n] * w[0]
        for i in range(1, len(vertices)):
            acc = acc + vertices[i][n] * w[i]
        out[n] = acc
    return out


def flat_vertices(vertices: Sequence[Mapping[str, Tensor]]) -> Tensor:
    """(k+1, D) matrix of the flattened vertices (keeps the autograd graph)."""
    names = list(vertices[0])
    return torch.stack([torch.cat([v[n].reshape(-1) for n in names]) for v in vertices])


@dataclass
class SimplexResult:
    """``vertices``: k+1 name -> tensor dicts (detached); ``history``: per vertex and epoch."""

    vertices: list
    history: pd.DataFrame = field(default_factory=pd.DataFrame)

    @property
    def log_volume(self) -> float:
        return float(cayley_menger_log_volume(flat_vertices(self.vertices).detach()))


def train_simplex(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    vertices: int = 3,
    epochs: int = 30,
    volume_reg: float = 0.3,
    lr: float = 0.1,
    batch_size: int = 128,
    init_scale: float = 0.3,
    seed: int = 0,
    device="cpu",
    on_epoch: Optional[Callable[[int, int, dict], None]] = None,
    loss_fn: Optional[Callable] = None,
) -> SimplexResult:
    """Grow a simplex of ``vertices`` vertices around ``model``'s weights (module docstring).

    Args:
        model: the trained network: vertex 0. Never modified.
        x, y: training inputs (N, ...) and labels (N,) (moved to ``device`` batch by batch).
        vertices: total vertex count K >= 2; epochs: epochs per added vertex.
        volume_reg: R >= 0, the weight of ``-log Vol``.
        init_scale: size of a new vertex's initial offset from the centroid, in units of the
            filter-normalised direction (i.e. relative to each filter's norm).
        on_epoch: ``on_epoch(vertex_index, epoch, record)`` after each epoch.
        loss_fn: the mean batch loss of the data term (default cross-entropy).
    """
    if vertices < 2:
        raise GradlabError(f"invalid vertices: {vertices} (a simplex needs >= 2)")
    if volume_reg < 0:
        raise GradlabError(f"invalid volume_reg: {volume_reg} (must be >= 0)")
    gen = torch.Generator().manual_seed(seed)
    verts = [{n: t.detach().clone() for n, t in weights_of(model).items()}]
    rows = []
    for j in range(1, vertices):
        centroid = combine(verts, [1.0 / len(verts)] * len(verts))
        (offset,) = random_directions(model, 1, include_bn=True, generator=gen)
        new = {n: (centroid[n] + init_scale * offset[n]).detach().requires_grad_(True) for n in centroid}
        fixed = list(verts)

        def make_params(g: torch.Generator, fixed=fixed, new=new):
            allv = fixed + [new]
            a = sample_dirichlet(len(allv), 1, g)[0]
            logv = cayley_menger_log_volume(flat_vertices(allv))
            return combine(allv, a), -volume_reg * logv, {"log_volume": logv.item()}

        hist = train_points(
            model, make_params, list(new.values()), x, y, epochs=epochs, lr=lr, batch_size=batch_size,
            seed=seed + j, device=device, loss_fn=loss_fn or named_loss(DEFAULT_LOSS),
            on_epoch=None if on_epoch is None else (lambda e, r, j=j: on_epoch(j, e, r)),
        )
        rows += [{"vertex": j, "epoch": e, **r} for e, r in enumerate(hist)]
        verts.append({n: t.detach() for n, t in new.items()})
    return SimplexResult(verts, pd.DataFrame(rows))


def evaluate_simplex(
    model: nn.Module,
    vertices: Sequence[Mapping[str, Tensor]],
    batches: Sequence[tuple],
    bn_batches: Sequence[tuple],
    *,
    samples: int = 30,
    seed: int = 0,
    dist=None,
    precision: str = "fp32",
    loss: str = DEFAULT_LOSS,
) -> tuple[pd.DataFrame, dict]:
    """Loss (``loss``: cross-entropy or mse, :mod:`gradlab.core.losses`) and accuracy at each vertex,
    the centre, and ``samples`` uniform interior points, plus the ensemble of those samples against
    vertex 0 alone: for cross-entropy the mean softmax (its loss ``-log`` of the mean probability of
    the label), for MSE the mean output (its loss the squared error of that mean to the one-hot label).

    BatchNorm statistics are recomputed at each point on ``bn_batches``. Returns ``(table,
    metrics)``: the table has columns ``point,kind,loss,acc`` (plus the barycentric ``weights``),
    the metrics the simplex volume and the headline numbers. Under torchrun (``dist``, a
    :class:`~gradlab.core.distributed.DistInfo`) each rank evaluates the points ``rank, rank + W,
    ...``; the rows are gathered and the ensemble's probabilities summed over ranks.
    """
    from gradlab.core.distributed import DistInfo, gather_objects, my_share, sum_over_ranks

    dist = dist or DistInfo()
    lfn, mse = named_loss(loss), loss == "mse"
    gen = torch.Generator().manual_seed(seed)
    k = len(vertices)
    rows, probs = [], []
    labels = torch.cat([yb for _, yb in batches]).cpu()
    points = [(f"vertex_{i}", "vertex", [1.0 if j == i else 0.0 for j in range(k)]) for i in range(k)]
    points.append(("centre", "centre", [1.0 / k] * k))
    points += [(f"sample_{s}", "sample", w.tolist()) for s, w in enumerate(sample_dirichlet(k, samples, gen))]
    for i in my_share(len(points), dist):
        name, kind, w = points[i]
        lv, acc, p = evaluate_at(model, combine(vertices, w), batches, bn_batches=bn_batches, return_probs=True,
                                 loss_fn=lfn, raw_outputs=mse, precision=precision)
        rows.append((i, {"point": name, "kind": kind, "loss": lv, "acc": acc,
                         "weights": " ".join(f"{a:.4f}" for a in w)}))
        if kind == "sample":
            probs.append(p.cpu().double())
    rows = [r for _, r in sorted(sum(gather_objects(rows, dist), []), key=lambda ir: ir[0])]
    total = torch.stack(probs).sum(0) if probs else torch.zeros(labels.numel(), 0, dtype=torch.float64)
    if dist.enabled:  # a rank may hold no sample: agree on the shape, then add up
        width = max(gather_objects(total.shape[1], dist))
        total = sum_over_ranks(total if total.shape[1] else total.new_zeros(labels.numel(), width), dist)
    ens = total / samples  # (N, classes): the ensemble's predictive distribution (MSE: its mean output)
    ens_acc = float((ens.argmax(-1) == labels).double().mean())
    ens_loss = (float(lfn(ens, labels)) if mse
                else float(-torch.log(ens.gather(1, labels.view(-1, 1)).clamp_min(1e-300)).mean()))
    rows.append({"point": f"ensemble_{samples}", "kind": "ensemble", "loss": ens_loss, "acc": ens_acc, "weights": ""})
    df = pd.DataFrame(rows)
    logv = float(cayley_menger_log_volume(flat_vertices(vertices))) if k >= 2 else float("-inf")
    by = df.groupby("kind")
    metrics = {
        "log_volume": logv,
        "volume": math.exp(logv) if logv < 700 else float("inf"),
        "vertex_loss_mean": float(by.get_group("vertex")["loss"].mean()),
        "vertex_acc_mean": float(by.get_group("vertex")["acc"].mean()),
        "centre_loss": float(by.get_group("centre")["loss"].iloc[0]),
        "centre_acc": float(by.get_group("centre")["acc"].iloc[0]),
        "sample_loss_mean": float(by.get_group("sample")["loss"].mean()),
        "sample_acc_mean": float(by.get_group("sample")["acc"].mean()),
        "ensemble_acc": ens_acc,
        "ensemble_loss": ens_loss,
        "single_acc": float(df.loc[df.point == "vertex_0", "acc"].iloc[0]),
        "single_loss": float(df.loc[df.point == "vertex_0", "loss"].iloc[0]),
        "n_eval": int(labels.numel()),
    }
    metrics["ensemble_gain"] = metrics["ensemble_acc"] - metrics["single_acc"]
    metrics["ensemble_beats_base"] = bool(metrics["ensemble_acc"] > metrics["single_acc"])
    return df, metrics


def ensemble_verdict(metrics: Mapping) -> str:
    """One sentence: did the ensemble of interior points beat the model the simplex grew from?

    "Beat" means a strictly higher accuracy on the evaluation split (the comparison of Benton et
    al. 2021, Table 1); the difference is also given in examples, since on a small split (digits:
    359 test images) one example is 0.3%, and the losses are given as a second opinion.
    """
    n = metrics["n_eval"]
    gain = metrics["ensemble_gain"]
    examples = round(gain * n)
    numbers = (f"accuracy {metrics['ensemble_acc']:.4f} against {metrics['single_acc']:.4f} for the base model "
               f"(vertex 0), {examples:+d} of {n} examples; loss {metrics['ensemble_loss']:.4g} against "
               f"{metrics['single_loss']:.4g}")
    if metrics["ensemble_beats_base"]:
        return f"ensemble beat the base model: {numbers}"
    return (f"ensemble did NOT beat the base model: {numbers}. The new vertices may be under-trained "
            f"(raise --epochs or --lr) or too close together to differ (raise --volume-reg or --init-scale)")
