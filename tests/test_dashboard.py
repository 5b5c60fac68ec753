"""The instruments' dashboard: the custom-scalars layout read back from the event file, and the
overview PNG with one panel per instrument present in the run's records."""

from __future__ import annotations

import pandas as pd
import pytest


def _cfg(tmp_path, **over):
    from gradlab.training.options import train_defaults, validate_train_config

    base = {**train_defaults(), "runs_dir": str(tmp_path), "name": None, "seed": 0, "device": "cpu",
            "max_train": 96, "epochs": 1, "batch_size": 32, "width": 8, "depth": 2, "log_every_steps": 1}
    return validate_train_config({**base, **over})


def _fit(cfg):
    from gradlab.runs.folder import RunDir
    from gradlab.training.loop import Trainer

    trainer = Trainer(cfg)
    run = RunDir.create(cfg["runs_dir"], "train", None, cfg, argv=["gradlab", "train"])
    result = trainer.fit(run)
    run.finish(result.status, result.metrics)
    return trainer, result, run


def _layout(path):
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.custom_scalar import layout_pb2

    layouts = []
    for events in sorted(path.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(events)).Load():
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "custom_scalars":
                    layouts.append(layout_pb2.Layout.FromString(value.tensor.string_val[0]))
    return layouts


def test_layout_and_overview_of_a_run_with_instruments(tmp_path):
    trainer, result, run = _fit(_cfg(tmp_path, probe="gradstats:every=1,stepquality:every=1"))
    assert result.status == "completed"
    (layout,) = _layout(run.path)
    charts = {cat.title: {ch.title: list(ch.multiline.tag) for ch in cat.chart} for cat in layout.category}
    assert set(charts) == {"training", "step quality", "gradient statistics"}
    assert charts["step quality"]["alpha"] == ["step_quality/alpha$"]
    assert charts["gradient statistics"]["noise scale B_simple"] == ["gradstats/b_simple$"]
    assert "test/loss$" in charts["training"]["loss"]
    assert charts["step quality"]["update/weight ratio per layer"] == [r"step_quality/update_ratio/.*"]

    png = run.path / "plots" / "instruments.png"
    assert png.exists() and png.stat().st_size > 1000
    (dash,) = [cb for cb in trainer.callbacks if type(cb).__name__ == "Dashboard"]
    expected = ["loss", "accuracy", "gradient norm", "learning rate", "alpha", "update/weight ratio",
                "distance from init", "step length", "gradient SNR", "noise scale B_simple", "gradient variance",
                "sample-size tests"]
    assert dash.panels == expected
    from matplotlib.image import imread

    assert imread(png).shape[1] > imread(png).shape[0]  # a grid of 4 columns and 3 rows


def test_panels_follow_the_records_present():
    from gradlab.training.overview import custom_scalars_layout, overview_figure

    frame = pd.DataFrame({"step": [1, 2, 2, 2], "split": ["train-step", "train-step", "curvature", "step_quality"],
                          "metric": ["loss", "loss", "lambda_max", "update_ratio/net.0"],
                          "value": [2.0, 1.5, 3.0, 0.01]})
    fig, titles = overview_figure(frame)
    assert titles == ["loss", "curvature: lambda_max"]
    assert {"loss", "curvature: lambda_max"} <= {t.get_text() for t in fig.texts}  # one titled panel each
    assert overview_figure(frame.iloc[:0]) == (None, [])
    layout = custom_scalars_layout(["curvature"])
    assert layout["curvature"] == {"curvature scalars": ["Multiline", ["curvature/[^/]*$"]]}
    assert "step quality" not in layout


def test_no_probe_no_dashboard(tmp_path):
    trainer, _, run = _fit(_cfg(tmp_path))
    assert not any(type(cb).__name__ == "Dashboard" for cb in trainer.callbacks)
    assert not (run.path / "plots" / "instruments.png").exists()
    assert _layout(run.path) == []
