"""Drawing the overview figure of a run's instruments cheaply (:func:`draw_panels`).

A short run's instruments cost less than their end-of-run figure when it is drawn the usual
way (one Axes per panel: each Axes builds and lays out a dozen tick objects of five artists
each, and text is the costly artist). Here the whole figure is a handful of artists placed
directly on one ``matplotlib.figure.Figure`` (no Axes, no pyplot): every panel's data curves
are paths of ONE ``LineCollection``, every frame, gridline, tick mark and reference line of
another, the isolated points (a value between two gaps) one marker line per colour, and the
text is only what a reader needs -- the panel titles, two or three value labels on each
panel's y axis, the steps under the lowest panel of each column and a legend where a panel
draws several records. The layout is fixed in inches, so nothing is measured or drawn twice.
:func:`png_bytes` renders it once and encodes it once; the same bytes go to the PNG file and
to TensorBoard.

A panel's values are drawn on a log scale when its instrument asks for one and all its finite
values are positive (on it, values that are not positive leave gaps); non-finite values leave
gaps as well. The y labels sit at evenly spaced round values (``MaxNLocator``, or powers of
ten and their 2 and 5 multiples on a log scale).
"""

from __future__ import annotations

import io
import math
from typing import Sequence

COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd")
# the layout, in inches: panel size, the margins around each panel (left: the y labels,
# top: the title, bottom: the step labels), the figure's own top (its title) and bottom (the
# "step" label)
PANEL_W, PANEL_H = 2.5, 1.35
LEFT, RIGHT, TOP, BOTTOM = 0.5, 0.12, 0.26, 0.22
FIG_TOP, FIG_BOTTOM = 0.32, 0.2
DPI = 90
LEGEND_EM = 0.6  # the mean width of a character of the legend's font, in ems (DejaVu Sans)
REFERENCE_LEVELS = {"alpha": ((-1.0, ":"), (0.0, "--"), (1.0, ":"))}  # Cockpit's: no move, minimum, other side


def _label(v: float) -> str:
    return f"{v + 0.0:.3g}"  # + 0.0: no "-0"


def _ticks(lo: float, hi: float, log: bool) -> list[float]:
    """Round values (in the drawn scale: log10 of the value on a log scale) within ``[lo, hi]``."""
    from matplotlib import ticker

    if log:
        first, last = math.floor(lo), math.ceil(hi)
        for subs in ((1.0,), (1.0, 2.0, 5.0)):
            marks = [k + math.log10(s) for k in range(first, last + 1) for s in subs]
            marks = [m for m in marks if lo - 1e-9 <= m <= hi + 1e-9]
            if len(marks) >= 2:
                return marks if len(marks) <= 4 else marks[:: math.ceil(len(marks) / 3)]
    slack = 1e-9 * (hi - lo)
    return [float(t) for t in ticker.MaxNLocator(3).tick_values(lo, hi) if lo - slack <= t <= hi + slack]


def _legend_labels(labels: Sequence[str]) -> list[str]:
    """``split/metric`` labels shortened to what tells them apart: the metric when all share the
    split, the split when all share the metric."""
    parts = [label.split("/", 1) if "/" in label else ["", label] for label in labels]
    if len({p[0] for p in parts}) == 1:
        return [p[1] for p in parts]
    if len({p[1] for p in parts}) == 1:
        return [p[0] for p in parts]
    return list(labels)


def _runs(xs: Sequence[float], ys: Sequence[float]) -> list[list[tuple[float, float]]]:
    """The maximal runs of consecutive finite points."""
    out, run = [], []
    for x, y in zip(xs, ys):
        if math.isfinite(y):
            run.append((x, y))
        elif run:
            out.append(run)
            run = []
    if run:
        out.append(run)
    return out


def _scale(lines, log: bool, extra: Sequence[float] = ()):
    """``(transformed lines, lo, hi, log)``: values in the drawn scale and their padded range."""
    finite = [v for _, _, vs in lines for v in vs if math.isfinite(v)]
    log = log and bool(finite) and min(finite) > 0
    f = (lambda v: math.log10(v) if v > 0 else math.nan) if log else (lambda v: v)
    moved = [(label, steps, [f(v) if math.isfinite(v) else math.nan for v in values]) for label, steps, values in lines]
    drawn = [v for _, _, vs in moved for v in vs if math.isfinite(v)] + list(extra)
    lo, hi = (min(drawn), max(drawn)) if drawn else (0.0, 1.0)
    if hi - lo < 1e-12 * max(1.0, abs(hi)):
        pad = 0.5 if log else max(abs(hi) * 0.05, 1e-12)
        lo, hi = lo - pad, hi + pad
    pad = 0.05 * (hi - lo)
    return moved, lo - pad, hi + pad, log


def draw_panels(chosen: Sequence, title: str = "", cols: int = 4):
    """A ``matplotlib.figure.Figure`` (Agg canvas attached) with one panel per entry of
    ``chosen`` (``[(title, [(label, steps, values), ...], log-scale), ...]``, as
    :func:`gradlab.training.overview.panels` gives them), laid out ``cols`` to a row. Its
    artists carry a ``gid``: ``curves`` (one path per run of finite points, in figure
    coordinates), ``dots`` (isolated points, one line per colour), ``guides`` and ``frames``."""
    from matplotlib import ticker
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.collections import LineCollection, PatchCollection
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Rectangle

    n = len(chosen)
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    cell_w, cell_h = LEFT + PANEL_W + RIGHT, TOP + PANEL_H + BOTTOM
    width, height = cols * cell_w, rows * cell_h + FIG_TOP + FIG_BOTTOM
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    last = max((max(steps) for _, lines, _ in chosen for _, steps, _ in lines if steps), default=1) or 1
    x_hi = last * 1.02
    x_ticks = [float(t) for t in ticker.MaxNLocator(3, integer=True).tick_values(0, last) if 0 <= t <= last]
    curves, curve_colours = [], []
    frames = []  # frames and tick marks: black
    guides, guide_styles = [], []  # gridlines and reference lines: grey
    dots: dict = {}
    texts, legends = [], []

    for k, (name, lines, log) in enumerate(chosen):
        r, c = divmod(k, cols)
        x0 = (c * cell_w + LEFT) / width
        y0 = (height - FIG_TOP - r * cell_h - TOP - PANEL_H) / height
        w, h = PANEL_W / width, PANEL_H / height
        levels = REFERENCE_LEVELS.get(name, ())
        moved, lo, hi, log = _scale(lines, log, [v for v, _ in levels])

        def px(s, x0=x0, w=w):
            return x0 + w * s / x_hi

        def py(v, y0=y0, h=h, lo=lo, hi=hi):
            return y0 + h * (v - lo) / (hi - lo)

        labels = _legend_labels([label for label, _, _ in moved])
        if len(moved) > 1:  # the legend's backing, its width estimated (no text is measured)
            wide = max(len(s) for s in labels) * LEGEND_EM * 6 / 72 + 0.08
            legends.append(Rectangle((x0 + w - (wide + 0.02) / width, y0 + h - (0.07 + 0.11 * len(moved)) / height),
                                     wide / width, (0.05 + 0.11 * len(moved)) / height))
        for j, (label, steps, values) in enumerate(moved):
            colour = COLOURS[j % len(COLOURS)]
            for run in _runs(steps, values):
                if len(run) == 1:
                    dots.setdefault(colour, []).append((px(run[0][0]), py(run[0][1])))
                else:
                    curves.append([(px(s), py(v)) for s, v in run])
                    curve_colours.append(colour)
            if len(moved) > 1:
                texts.append((x0 + w - 0.05 / width, y0 + h - (0.05 + 0.11 * j) / height, labels[j],
                              dict(ha="right", va="top", fontsize=6, color=colour)))
        frames.append([(x0, y0), (x0 + w, y0), (x0 + w, y0 + h), (x0, y0 + h), (x0, y0)])
        tick = 0.05 / width
        for t in _ticks(lo, hi, log):
            y = py(t)
            frames.append([(x0 - tick, y), (x0, y)])
            guides.append([(x0, y), (x0 + w, y)])
            guide_styles.append(("#e0e0e0", "-"))
            texts.append((x0 - 1.5 * tick, y, _label(10 ** t if log else t),
                          dict(ha="right", va="center", fontsize=7)))
        for level, style in levels:
            guides.append([(x0, py(level)), (x0 + w, py(level))])
            guide_styles.append(("grey", style))
        if k + cols >= n:  # the lowest panel of its column: the steps
            for t in x_ticks:
                frames.append([(px(t), y0), (px(t), y0 - tick * width / height)])
                texts.append((px(t), y0 - 1.5 * tick * width / height, f"{t:g}",
                              dict(ha="center", va="top", fontsize=7)))
        texts.append((x0 + w / 2, y0 + h + 0.04 / height, name, dict(ha="center", va="bottom", fontsize=9)))

    if guides:
        fig.add_artist(LineCollection(guides, colors=[s[0] for s in guide_styles],
                                      linestyles=[s[1] for s in guide_styles], linewidths=0.6,
                                      transform=fig.transFigure, gid="guides"))
    fig.add_artist(LineCollection(curves, colors=curve_colours, linewidths=1.0, transform=fig.transFigure,
                                  gid="curves"))
    for colour, points in dots.items():
        xs, ys = zip(*points)
        fig.add_artist(Line2D(xs, ys, color=colour, marker="o", markersize=2.5, linestyle="none",
                              transform=fig.transFigure, gid="dots"))
    if legends:
        fig.add_artist(PatchCollection(legends, facecolors="white", edgecolors="#d0d0d0", linewidths=0.5,
                                       alpha=0.85, zorder=2.5, transform=fig.transFigure))  # over the curves
    fig.add_artist(LineCollection(frames, colors="black", linewidths=0.7, transform=fig.transFigure,
                                  gid="frames"))
    for x, y, s, kw in texts:
        fig.text(x, y, s, **kw)
    fig.text(0.5, 0.04 / height, "step", ha="center", va="bottom", fontsize=8)
    if title:
        fig.text(0.5, 1 - 0.06 / height, title, ha="center", va="top", fontsize=10)
    return fig


def png_bytes(fig) -> tuple[bytes, int, int]:
    """``(PNG bytes, height, width)`` of ``fig``: drawn once, encoded once (fast zlib level:
    the figure is flat colour, so a higher level buys little size for much time)."""
    import numpy as np
    from PIL import Image

    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3]
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", compress_level=1)
    return buf.getvalue(), rgb.shape[0], rgb.shape[1]


def image_summary(tag: str, png: bytes, height: int, width: int):
    """A TensorBoard ``Summary`` holding the already-encoded PNG as the image ``tag`` (what
    ``SummaryWriter.add_image`` writes, without decoding and encoding the pixels again)."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    image = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=png)
    return Summary(value=[Summary.Value(tag=tag, image=image)])


__all__ = ["draw_panels", "image_summary", "png_bytes"]
