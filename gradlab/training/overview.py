"""The instruments of a training run: one TensorBoard dashboard and one overview figure.

:data:`INSTRUMENTS` names each instrument once -- its dashboard category, its title, the
``(split, metric)`` records it draws (``metrics.csv`` rows, TensorBoard tags ``split/metric``)
and whether its values span decades. From it come the custom-scalars layout
(:func:`custom_scalars_layout`, for ``SummaryWriter.add_custom_scalars``) and the overview
figure in the manner of Cockpit's (:func:`overview_figure`: one panel per instrument present in
the run's records, laid out on a grid). Records of splits no instrument names (the curvature
scalars of ``--probe hessian``, any other probe's) get a panel per metric and a dashboard
category of their split; per-layer records (``update_ratio/net.0``) are dashboard charts only.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

# (category, title, ((split, metric), ...), log-scale)
INSTRUMENTS = (
    ("training", "loss", (("train-step", "loss"), ("train", "loss"), ("test", "loss")), False),
    ("training", "accuracy", (("train", "acc"), ("test", "acc")), False),
    ("training", "gradient norm", (("train-step", "grad_norm"),), True),
    ("training", "learning rate", (("train-step", "lr"),), False),
    ("step quality", "alpha", (("step_quality", "alpha"),), False),
    ("step quality", "update/weight ratio", (("step_quality", "update_ratio"),), True),
    ("step quality", "distance from init", (("step_quality", "distance_from_init"),), False),
    ("step quality", "step length", (("step_quality", "step_length"),), True),
    ("gradient statistics", "gradient SNR", (("gradstats", "snr"),), True),
    ("gradient statistics", "noise scale B_simple", (("gradstats", "b_simple"),), True),
    ("gradient statistics", "gradient variance", (("gradstats", "variance"),), True),
    ("gradient statistics", "sample-size tests", (("gradstats", "norm_test"), ("gradstats", "inner_product_test"),
                                                  ("gradstats", "orthogonality_test")), True),
)
# overview panels that join records of a split the dashboard shows as one chart of its scalars
# (title, records, log-scale), and records that get no panel of their own
_JOINED_PANELS = (("Morse index (with its bracket)", (("curvature", "morse_index"), ("curvature", "morse_index_low"),
                                                      ("curvature", "morse_index_high")), False),)
_NO_PANEL = {("curvature", "morse_index_stderr"), ("curvature", "morse_index_error")}
# per-layer charts of the dashboard: (category, title, tag regex)
LAYER_CHARTS = (
    ("step quality", "update/weight ratio per layer", r"step_quality/update_ratio/.*"),
    ("step quality", "distance from init per layer", r"step_quality/distance/.*"),
)
_OWN_SPLITS = {"train-step", "train", "test", "step_quality", "gradstats", "optimizer"}


def custom_scalars_layout(splits: Iterable[str]) -> dict:
    """The ``{category: {chart: ["Multiline", [tag regexes]]}}`` layout of the instruments;
    ``splits``: the probe splits the run logs (``gradstats``, ``step_quality``, ``curvature``,
    ...), so that only their categories appear, each other split as one chart of its scalars."""
    splits = set(splits) | {"train-step", "train", "test"}
    layout: dict = {}
    for category, title, records, _ in INSTRUMENTS:
        tags = [f"{split}/{metric}$" for split, metric in records if split in splits]
        if tags:
            layout.setdefault(category, {})[title] = ["Multiline", tags]
    for category, title, regex in LAYER_CHARTS:
        if category in layout:
            layout[category][title] = ["Multiline", [regex]]
    for split in sorted(splits - _OWN_SPLITS):
        layout.setdefault(split, {})[f"{split} scalars"] = ["Multiline", [f"{split}/[^/]*$"]]
    return layout


def panels(frame) -> list[tuple[str, list, bool]]:
    """``[(title, [(label, steps, values), ...], log-scale), ...]``: the overview's panels for a
    ``metrics.csv`` frame (columns step, split, metric, value), the instruments present first."""
    have = {(s, m) for s, m in zip(frame["split"], frame["metric"])}
    out = []

    def series(split, metric):
        rows = frame[(frame["split"] == split) & (frame["metric"] == metric)].sort_values("step")
        return f"{split}/{metric}", rows["step"].tolist(), rows["value"].astype(float).tolist()

    for _, title, records, log in INSTRUMENTS:
        lines = [series(s, m) for s, m in records if (s, m) in have]
        if lines:
            out.append((title, lines, log))
    for title, records, log in _JOINED_PANELS:
        lines = [series(s, m) for s, m in records if (s, m) in have]
        if lines:
            out.append((title, lines, log))
    drawn = {record for _, records, _ in _JOINED_PANELS for record in records} | _NO_PANEL
    others = sorted({(s, m) for s, m in have if s not in _OWN_SPLITS and "/" not in m and (s, m) not in drawn})
    for split, metric in others:
        out.append((f"{split}: {metric}", [series(split, metric)], False))
    return out


def overview_figure(frame, title: str = ""):
    """Cockpit-style overview of a run's instruments: ``(figure, panel titles)``, one panel per
    instrument present in ``frame`` (see :func:`panels`), or ``(None, [])`` when none is."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    chosen = panels(frame)
    if not chosen:
        return None, []
    cols = min(4, len(chosen))
    rows = math.ceil(len(chosen) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False)
    last = max((max(steps) for _, lines, _ in chosen for _, steps, _ in lines if steps), default=1)
    # The drawing's cost is in the tick and text artists, not the data: three ticks an axis, no
    # minor ticks, plain (non-mathtext) labels, titles at a fixed height (an automatic one
    # measures every tick label), legends at a fixed place ("best" searches the data), one
    # steps axis for all panels with its ticks on the lowest panel of each column only.
    for k, (ax, (name, lines, log)) in enumerate(zip(axes.flat, chosen)):
        for label, steps, values in lines:
            style = dict(marker=".", linestyle="-" if len(steps) > 1 else "none", markersize=3, linewidth=1)
            ax.plot(steps, values, label=label, **style)
        finite = [v for _, _, vs in lines for v in vs if math.isfinite(v)]
        if log and finite and min(finite) > 0:
            ax.set_yscale("log")
            decades = math.log10(max(finite) / min(finite))  # under two: ticks at 1, 2, 5 x 10^k
            ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0) if decades < 2 else (1.0,),
                                                         numticks=4))
            ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:.3g}"))
        else:
            ax.yaxis.set_major_locator(ticker.MaxNLocator(3))
        ax.yaxis.set_minor_locator(ticker.NullLocator())
        ax.set_xlim(0, last * 1.02)
        lowest = k + cols >= len(chosen)
        ax.xaxis.set_major_locator(ticker.MaxNLocator(3, integer=True) if lowest else ticker.NullLocator())
        ax.xaxis.set_minor_locator(ticker.NullLocator())
        if name == "alpha":  # Cockpit's reference lines: the minimum (0) and the other side (1)
            for level in (-1, 0, 1):
                ax.axhline(level, color="grey", linewidth=0.6, linestyle=":" if level else "--")
        ax.set_title(name, fontsize=9, y=1.0, pad=3)
        ax.tick_params(labelsize=7)
        if len(lines) > 1:
            ax.legend(fontsize=6, loc="upper right")
    for ax in list(axes.flat)[len(chosen):]:
        ax.axis("off")
    fig.text(0.5, 0.01, "step", ha="center", va="bottom", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    # a fixed layout: tight_layout would draw the whole figure once more
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.1 / rows + 0.04, top=1 - 0.12 / rows - 0.03,
                        wspace=0.3, hspace=0.45)
    return fig, [name for name, _, _ in chosen]


def probe_splits(callbacks: Sequence) -> list[str]:
    """The splits the run's probe callbacks log to (their ``split`` attribute)."""
    return [cb.split for cb in callbacks if isinstance(getattr(cb, "split", None), str)]


__all__ = ["INSTRUMENTS", "LAYER_CHARTS", "custom_scalars_layout", "overview_figure", "panels", "probe_splits"]
