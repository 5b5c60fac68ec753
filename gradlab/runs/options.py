"""The options every run-making command takes, declared once: where its run folder goes, its
name, its seed and its device."""

from __future__ import annotations

from gradlab.core.device import DEVICES
from gradlab.core.options import Option, Options

RUNS_DIR = Option("runs_dir", str, "runs", "folder that holds run folders")
NAME = Option("name", str, None, "suffix for the run folder name (letters, digits and . _ - = , +)")
SEED = Option("seed", int, 0, "random seed: data split, initialisation, noise, random starts", low=0)
DEVICE = Option("device", str, "auto", "where to compute (auto: cuda when there is one)", choices=DEVICES)

LOGGER = Option("logger", str, "tensorboard", "records besides the run folder's own: tensorboard (none), or "
                "mlflow (also an MLflow run: parameters, metrics, CSVs and plots)", choices=("tensorboard", "mlflow"))
MLFLOW_URI = Option("mlflow_uri", str, None, "MLflow tracking store for --logger mlflow (default: "
                    "$MLFLOW_TRACKING_URI, else sqlite:///RUNS/mlflow.db)", label="mlflow-uri")

#: runs_dir, name, seed, device, logger, mlflow_uri.
RUN_OPTIONS = Options(RUNS_DIR, NAME, SEED, DEVICE, LOGGER, MLFLOW_URI)

__all__ = ["DEVICE", "LOGGER", "MLFLOW_URI", "NAME", "RUNS_DIR", "RUN_OPTIONS", "SEED"]
