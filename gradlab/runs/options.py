"""The options every run-making command takes, declared once: where its run folder goes, its
name, its seed and its device."""

from __future__ import annotations

from gradlab.core.device import DEVICES
from gradlab.core.options import Option, Options

RUNS_DIR = Option("runs_dir", str, "runs", "folder that holds run folders")
NAME = Option("name", str, None, "suffix for the run folder name (letters, digits and . _ - = , +)")
SEED = Option("seed", int, 0, "random seed: data split, initialisation, noise, random starts", low=0)
DEVICE = Option("device", str, "auto", "where to compute (auto: cuda when there is one)", choices=DEVICES)

#: runs_dir, name, seed, device.
RUN_OPTIONS = Options(RUNS_DIR, NAME, SEED, DEVICE)

__all__ = ["DEVICE", "NAME", "RUNS_DIR", "RUN_OPTIONS", "SEED"]
