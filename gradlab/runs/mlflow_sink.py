"""An MLflow run beside a run folder (``--logger mlflow``): for sweeps that outgrow one folder.

The run folder stays the record (TensorBoard, CSVs, checkpoints); the MLflow run mirrors it:

* parameters: the run's resolved configuration (nested keys joined with ``.``);
* metrics: every row the folder logs (:meth:`gradlab.runs.folder.RunDir.log_metrics`: step rows,
  epoch rows, probe scalars), tag ``split/metric`` at the same step, batched (one request per
  :data:`FLUSH_ROWS` values or :data:`FLUSH_SECONDS`);
* artifacts at the end: ``config.yaml``, every CSV and every plot of the folder;
* tags: the gradlab command, the run folder's path and id; the status on ending (``FINISHED``
  for completed, ``KILLED`` for interrupted, ``FAILED`` otherwise).

The tracking store is ``--mlflow-uri``, else ``$MLFLOW_TRACKING_URI``, else an SQLite file in the
runs folder (``sqlite:///RUNS/mlflow.db``, artifacts in ``RUNS/mlflow-artifacts``; view with
``mlflow ui --backend-store-uri sqlite:///RUNS/mlflow.db``). ``mlflow.json`` in the run folder
holds the MLflow run's id, so ``gradlab train --resume`` goes on logging into the same run.
MLflow is an optional extra (``pip install 'gradlab[mlflow]'``).
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Mapping, Optional

from gradlab.core.errors import GradlabError

FLUSH_ROWS = 1000
FLUSH_SECONDS = 10.0
DEFAULT_EXPERIMENT = "gradlab"
RECORD = "mlflow.json"
_STATUS = {"completed": "FINISHED", "interrupted": "KILLED"}
_PARAM_CHARS = 500  # the limit of older tracking servers


def default_uri(runs_dir: str | Path) -> str:
    """``$MLFLOW_TRACKING_URI``, else an SQLite store in the runs folder."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(runs_dir).resolve() / 'mlflow.db'}"


def _key(name: str) -> str:
    """An MLflow-safe metric or parameter name (letters, digits, ``_ - . / space``)."""
    return re.sub(r"[^\w\-./ ]", "_", name)


def _flat(config: Mapping[str, Any], prefix: str = "") -> dict:
    out = {}
    for k, v in config.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[_key(f"{prefix}{k}")] = str(v)[:_PARAM_CHARS]
    return out


class MLflowSink:
    """The MLflow run of one run folder; see the module doc. Built by :meth:`start`."""

    def __init__(self, client, run_id: str):
        self.client, self.run_id = client, run_id
        self._rows: list = []
        self._last = time.monotonic()

    @classmethod
    def start(cls, folder: Path, command: str, config: Mapping[str, Any], *, uri: Optional[str] = None,
              experiment: str = DEFAULT_EXPERIMENT) -> "MLflowSink":
        """Create (or, when ``folder`` has a ``mlflow.json``, reopen) the MLflow run of a run
        folder. Raises :class:`GradlabError` when MLflow is missing or the store cannot be used."""
        try:
            from mlflow.entities import Param
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise GradlabError("--logger mlflow needs MLflow: pip install 'gradlab[mlflow]'") from None
        folder = Path(folder)
        runs_dir = folder.parent
        uri = uri or default_uri(runs_dir)
        try:
            client = MlflowClient(tracking_uri=uri)
            record = folder / RECORD
            if record.is_file():  # a resumed run: the same MLflow run goes on
                run_id = json.loads(record.read_text())["run_id"]
                client.update_run(run_id, status="RUNNING")
                return cls(client, run_id)
            found = client.get_experiment_by_name(experiment)
            if found is not None:
                exp_id = found.experiment_id
            else:
                artifacts = (runs_dir.resolve() / "mlflow-artifacts").as_uri() if uri.startswith("sqlite:") else None
                exp_id = client.create_experiment(experiment, artifact_location=artifacts)
            tags = {"gradlab.command": command, "gradlab.run_folder": str(folder.resolve()),
                    "gradlab.run_id": folder.name}
            run = client.create_run(exp_id, run_name=folder.name, tags=tags)
            params = [Param(k, v) for k, v in _flat(config).items()]
            for i in range(0, len(params), 100):  # MLflow's batch limit for parameters
                client.log_batch(run.info.run_id, params=params[i:i + 100])
        except GradlabError:
            raise
        except Exception as e:  # an unreachable server, a bad URI, a read-only store
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise GradlabError(f"--logger mlflow: cannot use the tracking store {uri}: {first}") from None
        record.write_text(json.dumps({"tracking_uri": uri, "run_id": run.info.run_id, "experiment": experiment}))
        return cls(client, run.info.run_id)

    def log_metrics(self, step: int, tags_values: Mapping[str, float], wall: float) -> None:
        from mlflow.entities import Metric

        ms = int(wall * 1000)
        for tag, value in tags_values.items():
            value = float(value)
            self._rows.append(Metric(_key(tag), value if math.isfinite(value) else float("nan"), ms, int(step)))
        if len(self._rows) >= FLUSH_ROWS or time.monotonic() - self._last > FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        rows, self._rows = self._rows, []
        self._last = time.monotonic()
        for i in range(0, len(rows), 1000):  # MLflow's batch limit for metrics
            self.client.log_batch(self.run_id, metrics=rows[i:i + 1000])

    def finish(self, status: str, folder: Path) -> None:
        """Flush, upload the folder's config, CSVs and plots, and end the MLflow run."""
        self.flush()
        folder = Path(folder)
        for path in [folder / "config.yaml", *sorted(folder.glob("*.csv"))]:
            if path.is_file():
                self.client.log_artifact(self.run_id, str(path))
        plots = folder / "plots"
        if plots.is_dir() and any(plots.iterdir()):
            self.client.log_artifacts(self.run_id, str(plots), artifact_path="plots")
        self.client.set_tag(self.run_id, "gradlab.status", status)
        self.client.set_terminated(self.run_id, _STATUS.get(status, "FAILED"))


__all__ = ["DEFAULT_EXPERIMENT", "MLflowSink", "default_uri"]
