"""Rebuilding a trained model from its run folder (above the model zoo and the datasets, which
the run-records layer :mod:`gradlab.runs` never imports)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from gradlab.runs.checkpoints import load_checkpoint
from gradlab.runs.records import find_run, read_config


@dataclass
class LoadedRun:
    path: Path
    config: dict
    model: Any
    data: Any
    checkpoint: dict


def load_run(ref: Optional[str] = "last", runs_dir: str | Path = "runs", device="cpu") -> LoadedRun:
    """Rebuild a trained run's model (eval mode, weights from ``checkpoints/last.pt``) and its data."""
    from gradlab.data import dataset_options_in, load_dataset
    from gradlab.models import build_model, model_options_in

    path = find_run(runs_dir, ref, require_checkpoint=True)
    cfg = read_config(path)["config"]
    data = load_dataset(
        cfg["dataset"], seed=cfg.get("seed", 0), data_dir=cfg.get("data_dir"),
        **dataset_options_in(cfg["dataset"], cfg),
    )
    model = build_model(cfg["model"], data.spec, **model_options_in(cfg["model"], cfg))
    ckpt = load_checkpoint(path / "checkpoints" / "last.pt")
    model.load_state_dict(ckpt["model"])
    model.to(device).eval()
    return LoadedRun(path, cfg, model, data, ckpt)


__all__ = ["LoadedRun", "load_run"]
