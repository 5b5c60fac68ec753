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
    instrument present in ``frame`` (see :func:`panels`), or ``(None, [])`` when none is. The
    figure is a plain ``matplotlib.figure.Figure`` on an Agg canvas (no pyplot), drawn by
    :func:`gradlab.training.overview_draw.draw_panels`; render it with
    :func:`~gradlab.training.overview_draw.png_bytes`."""
    from gradlab.training.overview_draw import draw_panels

    chosen = panels(frame)
    if not chosen:
        return None, []
    return draw_panels(chosen, title), [name for name, _, _ in chosen]


def probe_splits(callbacks: Sequence) -> list[str]:
    """The splits the run's probe callbacks log to (their ``split`` attribute)."""
    return [cb.split for cb in callbacks if isinstance(getattr(cb, "split", None), str)]


__all__ = ["INSTRUMENTS", "LAYER_CHARTS", "custom_scalars_layout", "overview_figure", "panels", "probe_splits"]
