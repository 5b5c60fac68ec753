"""The overview figure's drawing (gradlab.training.overview_draw): where each value lands in its
panel, the gaps, the round labels, and one PNG encoding shared by the file and TensorBoard."""

from __future__ import annotations

import io
import math

import pytest


def _by_gid(fig, gid):
    return [a for a in fig.artists if a.get_gid() == gid]


def test_runs_split_at_non_finite_values_and_labels_are_shortened():
    from gradlab.training.overview_draw import _legend_labels, _runs

    assert _runs([0, 1, 2, 3, 4, 5], [1.0, 2.0, math.nan, 3.0, math.inf, 4.0]) == [[(0, 1.0), (1, 2.0)], [(3, 3.0)],
                                                                                   [(5, 4.0)]]
    assert _legend_labels(["gradstats/a", "gradstats/b"]) == ["a", "b"]
    assert _legend_labels(["train/loss", "test/loss"]) == ["train", "test"]
    assert _legend_labels(["train/loss", "test/acc"]) == ["train/loss", "test/acc"]


def test_ticks_are_round_values_inside_the_range():
    from gradlab.training.overview_draw import _ticks

    lin = _ticks(-0.07, 1.63, False)
    assert 2 <= len(lin) <= 4 and all(-0.07 <= t <= 1.63 for t in lin)
    assert all(abs(t * 10 - round(t * 10)) < 1e-9 for t in lin)  # 0, 0.5, 1, 1.5 or the like
    log = _ticks(math.log10(3e-3), math.log10(2e1), True)  # decades 1e-2 .. 1e1
    assert [round(10 ** t, 12) for t in log] == [0.01, 0.1, 1.0, 10.0]
    narrow = _ticks(math.log10(0.15), math.log10(0.9), True)  # no decade inside: 1, 2, 5 multiples
    assert [round(10 ** t, 12) for t in narrow] == [0.2, 0.5]


def test_values_land_linearly_in_their_panel_with_gaps_and_dots():
    from gradlab.training import overview_draw as D

    chosen = [("a", [("s/a", [0, 10, 20, 30, 40], [1.0, 2.0, 3.0, math.nan, 5.0])], False),
              ("b", [("s/b", [0, 40], [10.0, 1000.0])], True)]
    fig = D.draw_panels(chosen, "t")
    assert {"a", "b", "t"} <= {t.get_text() for t in fig.texts}
    (curves,) = _by_gid(fig, "curves")
    first, second = (p.vertices for p in curves.get_paths())
    width = 2 * (D.LEFT + D.PANEL_W + D.RIGHT)
    assert fig.get_size_inches()[0] == pytest.approx(width)
    x0, w = D.LEFT / width, D.PANEL_W / width
    # x: the step over 1.02 x the last step; y: linear in the value within the panel
    assert first[:, 0] == pytest.approx([x0 + w * s / 40.8 for s in (0, 10, 20)])
    dy = first[1:, 1] - first[:-1, 1]
    assert dy[0] == pytest.approx(dy[1]) and dy[0] > 0
    # the log panel: 10 and 1000 are two decades apart, so the middle of the line is 100
    assert second[:, 0] == pytest.approx([x0 + 1.0 * (D.LEFT + D.PANEL_W + D.RIGHT) / width + w * s / 40.8
                                          for s in (0, 40)])
    (dots,) = _by_gid(fig, "dots")  # the 5.0 after the gap stands alone
    assert dots.get_xdata()[0] == pytest.approx(x0 + w * 40 / 40.8)
    y1, y2 = first[0, 1], first[1, 1]
    assert dots.get_ydata()[0] == pytest.approx(y1 + 4 * (y2 - y1))
    labels = {t.get_text() for t in fig.texts}
    assert {"10", "100", "1e+03"} <= labels  # the log panel's decades


def test_png_is_drawn_once_and_the_same_bytes_reach_tensorboard(tmp_path):
    from PIL import Image
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

    from gradlab.runs.folder import RunDir
    from gradlab.training.callbacks.dashboard import Dashboard
    from gradlab.training.overview_draw import DPI, draw_panels, png_bytes

    fig = draw_panels([("a", [("s/a", [1, 2, 3], [3.0, 1.0, 2.0])], False)])
    png, h, w = png_bytes(fig)
    image = Image.open(io.BytesIO(png))
    assert image.size == (w, h) == tuple(int(v * DPI) for v in fig.get_size_inches())
    run = RunDir.create(str(tmp_path), "train", None, {"a": 1}, argv=["test"])
    Dashboard()._save(run, fig, step=7)
    run.flush_tb()
    written = (run.path / "plots" / "instruments.png").read_bytes()
    assert written == png  # the same rendering, once
    events = [e for f in run.path.glob("events.out.tfevents.*") for e in LegacyEventFileLoader(str(f)).Load()]
    images = [(e.step, v.image) for e in events for v in e.summary.value if v.tag == "plots/instruments"]
    (step, img), = images
    assert step == 7 and img.encoded_image_string == png and (img.height, img.width) == (h, w)
    run.finish("completed", {})
