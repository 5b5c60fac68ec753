"""gradstats and stepquality on the same steps share one pass at the updated weights: the same
numbers as each measuring alone (its own pass), one forward pass per scheduled step instead of
two, and their own passes again where sharing would change what they measure."""

from __future__ import annotations

import pandas as pd
import pytest
from torch import nn

from gradlab.training.callbacks.after_update import mode_free


def _cfg(tmp_path, **over):
    from gradlab.training.options import train_defaults, validate_train_config

    base = {**train_defaults(), "runs_dir": str(tmp_path), "name": None, "seed": 0, "device": "cpu",
            "max_train": 96, "epochs": 1, "batch_size": 32}
    if over.get("model", "mlp") == "mlp":
        base.update(width=8, depth=2)
    return validate_train_config({**base, **over})


class _Forwards:
    def __init__(self):
        from gradlab.training.callbacks import Callback

        rec = self
        self.count = 0

        class _CB(Callback):
            key = "forwards"

            def on_fit_start(cb, trainer):
                trainer.model.register_forward_pre_hook(lambda *_: setattr(rec, "count", rec.count + 1))

        self.callback = _CB()


def _metrics(tmp_path, probe, **over):
    from gradlab.runs.folder import RunDir
    from gradlab.training.loop import Trainer

    cfg = _cfg(tmp_path, probe=probe, **over)
    fwd = _Forwards()
    trainer = Trainer(cfg, callbacks=[fwd.callback])
    run = RunDir.create(cfg["runs_dir"], "train", None, cfg, argv=["gradlab", "train"])
    result = trainer.fit(run)
    run.finish(result.status, result.metrics)
    assert result.status == "completed", result.message
    m = pd.read_csv(run.path / "metrics.csv")
    m = m[m["split"].isin(["gradstats", "step_quality"])]
    return {(s, k, int(t)): v for s, k, t, v in zip(m["split"], m["metric"], m["step"], m["value"])}, fwd.count


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_shared_pass_gives_the_numbers_of_separate_passes_with_one_forward_less(tmp_path, model):
    both, n_both = _metrics(tmp_path / "both", "gradstats:every=2,stepquality:every=2", model=model)
    grad, n_grad = _metrics(tmp_path / "g", "gradstats:every=2", model=model)
    step, n_step = _metrics(tmp_path / "s", "stepquality:every=2", model=model)
    assert set(both) == set(grad) | set(step) and len(grad) >= 7 and len(step) >= 4
    for key, value in {**grad, **step}.items():
        assert both[key] == pytest.approx(value, rel=1e-12, abs=1e-300, nan_ok=True), key
    assert n_both == n_grad == n_step  # one pass at the updated weights per scheduled step, not two


def test_dropout_models_keep_separate_passes(tmp_path):
    both, n_both = _metrics(tmp_path / "both", "gradstats:every=2,stepquality:every=2", dropout=0.3)
    _, n_grad = _metrics(tmp_path / "g", "gradstats:every=2", dropout=0.3)
    assert n_both == n_grad + 1 and ("step_quality", "alpha", 2) in both


def test_mode_free():
    assert mode_free(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
    assert not mode_free(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.1)))
    assert not mode_free(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)))
