"""Per-layer gradient norms and the backward signal: is the gradient vanishing or exploding?

For each layer the probe measures, over one or more batches,

* ``grad_norm``: the L2 norm of the loss gradient over all of the layer's parameters (weights and
  biases together), mean and standard deviation (population, ddof=0) over the batches;
* ``weight_norm``: the L2 norm of the same parameters, and ``ratio = grad_norm / weight_norm``
  (the relative size of one SGD step per unit learning rate);
* ``signal_norm``: the norm of the backward signal ``dL/dh`` where ``h`` is the layer's output,
  per example (see below), averaged over the examples of all batches.

The verdict follows the classic analysis of Bengio et al. (1994) and Glorot & Bengio (2010): the
backward signal is multiplied by one layer Jacobian per layer, so its norm changes geometrically
with depth. A least-squares fit ``log signal_norm(l) = a + b * l`` over the probed layers' depth
indices ``l`` gives the backward growth factor per layer ``rate = exp(-b)`` (the factor the signal
norm is multiplied by each layer it travels towards the input). With threshold ``t``:
``vanishing`` if ``rate < 1 / (1 + t)``, ``exploding`` if ``rate > 1 + t``, else ``stable``
(``undetermined`` when fewer than two layers are probed).

The verdict states its evidence (how many layers the fit used, its ``R^2``, the slope's
standard error) and is ``inconclusive`` instead when

* the fit rests on :data:`MIN_FIT_LAYERS` - 1 = 3 layers or fewer (two free parameters on three
  points leave one degree of freedom: any three norms fit some line, the trend is not tested);
* a trend verdict (vanishing/exploding) has ``R^2 <`` :data:`MIN_R2` ``= 0.5``: depth explains
  less of the variance of ``log signal_norm`` than the layer-to-layer scatter does;
* a ``stable`` verdict has a slope whose 2-standard-error band reaches beyond ``log(1 + t)``:
  the data do not rule out a trend past the threshold (``R^2`` is no test of a flat line, whose
  explained variance is zero by definition).

Per-example signal: ``loss_fn(logits, y)`` returns the batch loss. If it averages over the batch
(``reduction == "mean"``, torch's default and what is assumed for a plain function), the row of
``dL/dh`` for example ``n`` is ``1/B`` times the gradient of that example's own loss, so it is
rescaled by ``B``; with ``reduction == "sum"`` rows are taken as they are.

"Layer" means a block of a :class:`~gradlab.models.base.GradlabNet` that has parameters (index
= block index) and its head (index = number of blocks); for any other model, every leaf module
with parameters, in registration order.

The probe is cheap (one forward and one backward per batch) and leaves the model as it found
it (:func:`gradlab.core.modelstate.model_state`): every module's training flag, the running
statistics of norm layers (``running_mean``, ``running_var``, ``num_batches_tracked``), the
``requires_grad`` flags and the parameters' ``.grad`` are all untouched, so a training loop may
call it every N steps. (A custom module that writes other buffers of its own in ``forward`` keeps
what it wrote.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import Tensor, nn

from gradlab.core.errors import GradlabError
from gradlab.core.modelstate import model_state
from gradlab.core.options import Option, Options
from gradlab.models.base import GradlabNet
from gradlab.probes import PROBES
from gradlab.probes.base import Probe, ProbeContext, ProbeReport
from gradlab.probes.signal_fit import (  # noqa: F401  (re-exported: the verdict rule of this probe)
    MIN_FIT_LAYERS,
    MIN_R2,
    VERDICTS,
    SignalFit,
    fit_rate,
    fit_signal,
    verdict_from_fit,
    verdict_from_rate,
)
from gradlab.probes.source import LAYER_OPTIONS, batch_options, parse_layers

DEFAULT_THRESHOLD = 0.1

_FRAME_COLUMNS = ["layer", "name", "grad_norm", "grad_norm_std", "weight_norm", "ratio", "signal_norm"]


@dataclass
class LayerGrad:
    """Statistics of one layer; norms are float64 L2 norms, see the module docstring."""

    layer: int
    name: str
    grad_norm: float
    grad_norm_std: float
    weight_norm: float
    ratio: float
    signal_norm: float
    signal_norm_per_example: Tensor = field(repr=False)  # (total examples,) float64


@dataclass
class GradnormReport:
    """What :func:`gradnorm_probe` returns.

    ``rate`` is the fitted backward growth factor of the signal norm per layer, ``log_rate`` its
    natural log, ``threshold`` the ``t`` of the verdict rule (module docstring).
    """

    layers: list[LayerGrad]
    rate: float
    log_rate: float
    threshold: float
    verdict: str
    loss: float
    n_batches: int
    n_examples: int
    fit: Optional[SignalFit] = None

    def to_frame(self):
        """One row per layer: ``layer,name,grad_norm,grad_norm_std,weight_norm,ratio,signal_norm``."""
        import pandas as pd

        rows = [{c: getattr(lg, c) for c in _FRAME_COLUMNS} for lg in self.layers]
        return pd.DataFrame(rows, columns=_FRAME_COLUMNS)

    def metrics(self) -> dict:
        """Scalar summary for ``summary.csv`` and TensorBoard."""
        return {
            "verdict": self.verdict,
            "signal_rate": self.rate,
            "threshold": self.threshold,
            "loss": self.loss,
            "n_layers": len(self.layers),
            "fit_layers": self.fit.n_layers if self.fit else 0,
            "fit_r2": self.fit.r2 if self.fit else float("nan"),
            "fit_slope_stderr": self.fit.slope_stderr if self.fit else float("nan"),
        }


def probe_layers(model: nn.Module) -> list[tuple[int, str, nn.Module]]:
    """``(depth index, name, module)`` for every layer the probes study (see module docstring)."""
    if isinstance(model, GradlabNet):
        out = [(i, f"blocks.{i}", b) for i, b in enumerate(model.blocks) if _has_params(b)]
        if _has_params(model.head):
            out.append((len(model.blocks), "head", model.head))
        return out
    leaves = [(n, m) for n, m in model.named_modules() if not list(m.children()) and _has_params(m)]
    return [(i, n, m) for i, (n, m) in enumerate(leaves)]


def select_layers(available: Sequence[tuple], names: Optional[Sequence[str]]) -> list[tuple]:
    """Keep the layers named in ``names`` (all when ``None``); unknown name -> GradlabError."""
    if names is None:
        return list(available)
    by_name = {entry[1]: entry for entry in available}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise GradlabError(f"unknown layer {unknown[0]!r}; choose from: {', '.join(by_name)}")
    if not names:
        raise GradlabError("no layers selected; choose from: " + ", ".join(by_name))
    wanted = set(names)
    return [entry for entry in available if entry[1] in wanted]  # keep depth order


def gradnorm_probe(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    batches: Iterable[tuple[Tensor, Tensor]],
    *,
    layers: Optional[Sequence[str]] = None,
    threshold: float = DEFAULT_THRESHOLD,
    train_mode: bool = True,
    dist=None,
) -> GradnormReport:
    """Measure per-layer gradient, weight and backward-signal norms over ``batches``.

    Args:
        model: any ``nn.Module``; a GradlabNet is probed block by block.
        loss_fn: ``loss_fn(logits, y) -> scalar`` batch loss (e.g. ``nn.CrossEntropyLoss()``).
        batches: iterable of ``(x, y)``; ``x`` (B, *input_shape) on the model's device.
        layers: names (``blocks.3``, ``head``, ...) to probe; all by default.
        threshold: ``t`` in the verdict rule (default 0.1, i.e. 10% per layer).
        train_mode: run the forward pass in training mode (what the optimiser sees: BatchNorm
            uses batch statistics, dropout is active); the model's own flags and buffers are
            restored afterwards either way.
        dist: under torchrun (:class:`~gradlab.core.distributed.DistInfo`): every rank passes the
            same batches, measures the batches ``rank, rank + W, ...`` and the per-batch results are
            gathered in batch order, so every rank returns the one-process report.
    Returns:
        A :class:`GradnormReport`.
    Raises:
        GradlabError: no batches, an unknown layer name, a model without parameterised layers, a
        model whose output is not a tensor, or a loss that is not a scalar.
    """
    if threshold <= 0:
        raise GradlabError(f"invalid threshold: {threshold} (must be > 0)")
    chosen = select_layers(probe_layers(model), layers)
    if not chosen:
        raise GradlabError("the model has no layers with parameters to probe")
    scale_by_batch = getattr(loss_fn, "reduction", "mean") == "mean"

    grad_sq: list[list[float]] = [[] for _ in chosen]  # per layer, per batch: ||grad||^2
    signals: list[list[Tensor]] = [[] for _ in chosen]
    losses: list[float] = []
    n_examples = 0
    split = dist is not None and dist.enabled
    if split:
        from gradlab.core.distributed import my_share

        batches = list(batches)
        order = my_share(len(batches), dist)
        batches = [batches[i] for i in order]
    # requires_grad on so frozen layers are measured too; keep_bn_stats because a training-mode
    # forward would move the running statistics (BatchNorm's and any other norm layer's). The
    # gradients come from autograd.grad, so no parameter's .grad is written.
    with model_state(model, train=train_mode, requires_grad=True, keep_bn_stats=True):
        params = [list(m.parameters()) for _, _, m in chosen]
        for batch in batches:
            x, y = batch
            outputs: dict[int, Tensor] = {}
            hooks = [
                m.register_forward_hook(_capture(outputs, j)) for j, (_, _, m) in enumerate(chosen)
            ]
            try:
                with torch.enable_grad():
                    logits = model(x)
            finally:
                for h in hooks:
                    h.remove()
            if not isinstance(logits, Tensor):
                raise GradlabError(
                    f"model output is a {type(logits).__name__}, not a tensor of logits; "
                    "the gradient probe needs model(x) -> Tensor"
                )
            with torch.enable_grad():  # the caller may sit inside torch.no_grad()
                loss = loss_fn(logits, y)
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                raise GradlabError("loss_fn(logits, y) must return a scalar tensor")
            flat_params = [p for ps in params for p in ps]
            out_idx = sorted(outputs)
            grads = torch.autograd.grad(
                loss, flat_params + [outputs[j] for j in out_idx], allow_unused=True
            )
            pgrads, ograds = grads[: len(flat_params)], dict(zip(out_idx, grads[len(flat_params):]))
            pos = 0
            batch_size = x.shape[0]
            for j, ps in enumerate(params):
                sq = 0.0
                for g in pgrads[pos : pos + len(ps)]:
                    if g is not None:  # None: the parameter did not take part in this loss
                        sq += float(g.detach().double().pow(2).sum())
                pos += len(ps)
                grad_sq[j].append(sq)
                g_out = ograds.get(j)
                if g_out is None:
                    per_ex = torch.full((batch_size,), float("nan"), dtype=torch.float64)
                else:
                    # (B, ...) -> (B,), float64 so long rows do not lose digits
                    per_ex = g_out.detach().double().flatten(1).norm(dim=1).cpu()
                    if scale_by_batch:
                        per_ex = per_ex * batch_size
                signals[j].append(per_ex)
            losses.append(float(loss.detach()))
            n_examples += batch_size
        if split:
            grad_sq, signals, losses, n_examples = _gathered(order, grad_sq, signals, losses, dist)
        if not losses:
            raise GradlabError("no batches to probe (batches must be >= 1)")
        weight_norms = [
            math.sqrt(sum(float(p.detach().double().pow(2).sum()) for p in ps)) for ps in params
        ]

    layer_stats = []
    for j, (depth, name, _) in enumerate(chosen):
        norms = torch.tensor(grad_sq[j], dtype=torch.float64).sqrt()
        sig = torch.cat(signals[j])
        gmean = float(norms.mean())
        layer_stats.append(
            LayerGrad(
                layer=depth,
                name=name,
                grad_norm=gmean,
                grad_norm_std=float(norms.std(unbiased=False)),
                weight_norm=weight_norms[j],
                ratio=gmean / weight_norms[j] if weight_norms[j] > 0 else float("inf"),
                signal_norm=float(sig.mean()),
                signal_norm_per_example=sig,
            )
        )
    fit = fit_signal([lg.layer for lg in layer_stats], [lg.signal_norm for lg in layer_stats])
    log_rate = fit.log_rate
    return GradnormReport(
        layers=layer_stats,
        rate=math.exp(log_rate) if not math.isnan(log_rate) else float("nan"),
        log_rate=log_rate,
        threshold=threshold,
        verdict=verdict_from_fit(fit, threshold),
        loss=sum(losses) / len(losses),
        n_batches=len(losses),
        n_examples=n_examples,
        fit=fit,
    )


def _gathered(order: list, grad_sq: list, signals: list, losses: list, dist) -> tuple:
    """Every rank's per-batch results, put back in batch order (the one-process lists)."""
    from gradlab.core.distributed import gather_objects

    parts = gather_objects((order, grad_sq, [[s.cpu() for s in per] for per in signals], losses), dist)
    at = {i: (r, k) for r, part in enumerate(parts) for k, i in enumerate(part[0])}
    ranked = [at[i] for i in sorted(at)]
    grad_sq = [[parts[r][1][j][k] for r, k in ranked] for j in range(len(grad_sq))]
    signals = [[parts[r][2][j][k] for r, k in ranked] for j in range(len(signals))]
    losses = [parts[r][3][k] for r, k in ranked]
    return grad_sq, signals, losses, sum(len(s) for s in signals[0]) if signals else 0


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _capture(store: dict, j: int):
    def hook(_module, _inputs, output):
        if isinstance(output, Tensor) and output.requires_grad:
            store[j] = output  # a module called twice keeps its last output

    return hook


def verdict_line(rep: GradnormReport) -> str:
    """The verdict sentence printed after the table (module docstring for the rule)."""
    t = rep.threshold
    if rep.verdict == "undetermined":
        return "verdict: undetermined (a growth rate needs at least two layers)"
    fit = rep.fit
    evidence = (f"log-linear fit over {fit.n_layers} layers, R^2 = {fit.r2:.3f}"
                + (f", slope standard error {fit.slope_stderr:.2g}" if fit.slope_stderr == fit.slope_stderr else ""))
    band = f"threshold t={t:g}: vanishing below {1 / (1 + t):.3g}, exploding above {1 + t:.3g}"
    if rep.verdict == "inconclusive":
        if fit.n_layers < MIN_FIT_LAYERS:
            why = f"{fit.n_layers} layers are too few to test a trend (at least {MIN_FIT_LAYERS} needed)"
        elif verdict_from_rate(fit.log_rate, t) == "stable":
            why = "the slope's 2-standard-error band reaches past the threshold"
        else:
            why = f"R^2 below {MIN_R2:g}: the layer-to-layer scatter is larger than the trend"
        return (f"verdict: inconclusive: backward signal norm x{rep.rate:.3g} per layer towards the input, but "
                f"{why} ({evidence}; {band})")
    return (f"verdict: {rep.verdict}: backward signal norm x{rep.rate:.3g} per layer towards the input "
            f"({evidence}; {band})")


OPTIONS = batch_options(4, 128, "Batches to average over; the spread across them is grad_norm_std") + LAYER_OPTIONS + Options(
    Option("threshold", float, DEFAULT_THRESHOLD, "Verdict threshold t: the signal norm's fitted growth factor per "
           "layer (towards the input) below 1/(1+t) is 'vanishing', above 1+t 'exploding', else 'stable'",
           low=0, low_open=True),
    Option("train_mode", bool, True, "Run the model in training mode (BatchNorm batch statistics, dropout on: what "
           "the optimiser sees) or eval mode; the model is restored either way"),
)


@PROBES.register("gradnorm", "per-layer gradient, weight and backward-signal norms; vanishing/exploding verdict",
                 options=OPTIONS, paper="Bengio et al. 1994; Glorot & Bengio 2010")
class GradnormProbe(Probe):
    """Per-layer gradient norm, weight norm, their ratio and the backward signal norm ||dL/dh|| (per example).

    Verdict: a least-squares fit of log(signal norm) against depth gives the factor by which the backward signal is multiplied per layer on its way to the input; below 1/(1+t) it is 'vanishing', above 1+t 'exploding', else 'stable' (t = --threshold, default 0.1, i.e. 10% per layer).

    Writes gradnorm.csv, TensorBoard scalars (x axis = depth) and histograms, and plots/gradnorm.png.
    """

    flag_off_names = {"train_mode": "--eval-mode"}

    def prepare(self, ctx: ProbeContext) -> dict:
        select_layers(probe_layers(ctx.model), parse_layers(ctx.options["layers"]))  # unknown layer: fail now
        return {}

    def run(self, ctx: ProbeContext) -> ProbeReport:
        from gradlab.probes.spectra_plots import gradnorm_figure

        o = ctx.options
        rep = gradnorm_probe(ctx.model, ctx.loss_fn, ctx.batches, layers=parse_layers(o["layers"]), dist=ctx.dist,
                             threshold=o["threshold"], train_mode=o["train_mode"])
        line = verdict_line(rep)
        title = ""
        if ctx.source is not None:
            title = (f"gradient norms: {ctx.source.where}, {rep.n_batches} batches x {ctx.batches[0][0].shape[0]} "
                     f"({ctx.source.split_name} split)")
        keys = ("grad_norm", "weight_norm", "ratio", "signal_norm")
        return ProbeReport(
            table=rep.to_frame(), title=title,
            scalars={"signal_rate": rep.rate, "loss": rep.loss},
            series={f"gradnorm/{k}": [(lg.layer, getattr(lg, k)) for lg in rep.layers] for k in keys},
            histograms={f"signal_norm_per_example/{lg.name}": lg.signal_norm_per_example for lg in rep.layers},
            figures={"gradnorm": gradnorm_figure(rep)},
            summary_lines=[line], text={"gradnorm/verdict": line}, metrics=rep.metrics(),
        )

    def scalars(self, model, loss_fn, batch, **options) -> dict:
        """``layer<depth>_grad_norm`` and ``layer<depth>_signal_norm`` of every layer on one batch."""
        o = self.options.resolve(options, owner="probe gradnorm")
        rep = gradnorm_probe(model, loss_fn, [tuple(batch)], layers=parse_layers(o["layers"]),
                             threshold=o["threshold"], train_mode=o["train_mode"])
        out = {}
        for lg in rep.layers:
            out[f"layer{lg.layer}_grad_norm"] = lg.grad_norm
            out[f"layer{lg.layer}_signal_norm"] = lg.signal_norm
        return out
