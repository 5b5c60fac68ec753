"""Run folders: the contract scripts and other tools rely on.

``<runs-dir>/<YYYYmmdd-HHMMSS>-<command>[-<name>]/`` holds

* ``config.yaml``: the resolved configuration, versions and command line;
* TensorBoard event files;
* ``metrics.csv``: long format ``step,epoch,split,metric,value,wall_time,grad_equivalents``, flushed per call;
* ``summary.csv``: one row ``run_id,command,status,...``, written atomically at the end;
* ``checkpoints/`` (plain ``torch.save`` files) and ``plots/``.

A folder without ``summary.csv`` is a run that is still going or died without a word
(``gradlab runs`` shows it as ``incomplete``); one that failed says ``failed``.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import platform
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from gradlab import __version__
from gradlab.core.errors import GradlabError
from gradlab.runs.checkpoints import CheckpointWriter, atomic_write
from gradlab.runs.logging import (HISTOGRAM_BINS, METRIC_COLUMNS, MetricsCSV, NullWriter, histograms_stats,
                                  histograms_summary, open_summary_writer, scalars_summary, truncate_metrics)
from gradlab.runs.records import STATUSES, read_config
from gradlab.runs.signals import Interrupted, signal_name
from gradlab.runs.trust import names_code, record_trusted

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=,+-]*$")

__all__ = ["RunDir", "STATUSES", "METRIC_COLUMNS", "validate_run_name"]


def validate_run_name(name: Optional[str]) -> None:
    if name is None:
        return
    if "/" in name or "\\" in name or ".." in name or not _NAME_RE.match(name):
        raise GradlabError(
            f"invalid run name {name!r}: use letters, digits and . _ - = , + (no path separators or '..')"
        )


def _atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), binary=False)


class RunDir:
    """One run folder. ``enabled=False`` gives an object that writes nothing (ranks > 0)."""

    def __init__(self, path: Path, command: str, enabled: bool = True, purge_step: Optional[int] = None):
        self.path = Path(path)
        self.command = command
        self.enabled = enabled
        self.run_id = self.path.name
        self.status: Optional[str] = None
        self._finished = False
        self._tb = None
        self._purge_step = purge_step  # for the SummaryWriter of a resumed run
        self._metrics = MetricsCSV(self.path / "metrics.csv")
        self._checkpoints = CheckpointWriter()
        self.sinks: list = []  # e.g. gradlab.runs.mlflow_sink.MLflowSink: mirrors of the records
        self.sink_errors: list[str] = []  # why a mirror stopped (the run goes on without it)
        # A training run's cumulative cost in gradient-equivalents (gradlab.curvature.cost): the
        # grad_equivalents column of metrics.csv, and TensorBoard's cost/grad_equivalents.
        self.cost: Optional[Callable[[], float]] = None
        self._cost_step: Optional[int] = None

    # -- creation --------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        runs_dir: str | Path,
        command: str,
        name: Optional[str],
        config: Mapping[str, Any],
        argv: Optional[list] = None,
        enabled: bool = True,
    ) -> "RunDir":
        validate_run_name(name)
        runs_dir = Path(runs_dir)
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        base = f"{stamp}-{command}" + (f"-{name}" if name else "")
        if not enabled:
            return cls(runs_dir / base, command, enabled=False)
        try:
            runs_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise GradlabError(f"cannot create runs folder {runs_dir}: {e.strerror}") from None
        path, i = runs_dir / base, 1
        while True:
            try:
                path.mkdir()
                break
            except FileExistsError:
                i += 1
                path = runs_dir / f"{base}-{i}"
        (path / "checkpoints").mkdir()
        (path / "plots").mkdir()
        run = cls(path, command)
        run._write_config(config, argv if argv is not None else sys.argv)
        if names_code(config.get("model")):  # this user chose that code: rebuilding the run may import it
            record_trusted(path, config["model"])
        run._metrics.open()
        return run

    @classmethod
    def reopen(cls, path: Path, keep_until_step: int) -> "RunDir":
        """Continue an existing run (``--resume``) from a checkpoint at ``keep_until_step``:
        metrics.csv rows past it are dropped, TensorBoard hides the events past it (the new
        event file purges from ``keep_until_step + 1``), and summary.csv goes until the end."""
        run = cls(Path(path), read_config(path)["command"], purge_step=keep_until_step + 1)
        truncate_metrics(run.path / "metrics.csv", keep_until_step)
        (run.path / "summary.csv").unlink(missing_ok=True)
        (run.path / "checkpoints").mkdir(exist_ok=True)
        return run

    def _write_config(self, config: Mapping[str, Any], argv: list) -> None:
        import yaml

        try:
            import torch

            torch_version = str(torch.__version__)
        except ImportError:  # pragma: no cover - torch is a dependency
            torch_version = None
        doc = {
            "run_id": self.run_id,
            "command": self.command,
            "created": _dt.datetime.now().isoformat(timespec="seconds"),
            "command_line": " ".join(["gradlab"] + [str(a) for a in argv[1:]]),
            "versions": {
                "gradlab": __version__,
                "torch": torch_version,
                "python": platform.python_version(),
            },
            "config": _plain(dict(config)),
        }
        _atomic_write_text(self.path / "config.yaml", yaml.safe_dump(doc, sort_keys=False))

    # -- mirrors ---------------------------------------------------------------------------
    def attach(self, sink) -> None:
        """Mirror this folder's metric rows and, at :meth:`finish`, its files to ``sink`` (an
        object with ``log_metrics(step, {tag: value}, wall)`` and ``finish(status, folder)``)."""
        if self.enabled:
            self.sinks.append(sink)

    def _to_sinks(self, method: str, *args) -> None:
        for sink in list(self.sinks):
            try:
                getattr(sink, method)(*args)
            except Exception as e:  # a mirror that fails never stops the run: it is dropped
                self.sinks.remove(sink)
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                self.sink_errors.append(f"{type(sink).__name__} stopped: {first}")

    # -- logging ---------------------------------------------------------------------------
    @property
    def tb(self):
        """The run's ``torch.utils.tensorboard.SummaryWriter`` (a no-op stand-in when disabled)."""
        if self._tb is None:
            self._tb = NullWriter() if not self.enabled else open_summary_writer(self.path, self._purge_step)
        return self._tb

    def log_metrics(self, step: int, epoch: Optional[int], split: str, metrics: Mapping[str, float]) -> None:
        """One row of metrics.csv per metric and one TensorBoard event holding all of them
        (tags ``split/metric``, and ``cost/grad_equivalents`` once per step when :attr:`cost` is
        set), both at the same wall time."""
        if not self.enabled or not metrics:
            return
        now = time.time()
        cost = self.cost() if self.cost is not None else None
        self._metrics.write(step, epoch, split, metrics, now, cost)
        tags = [(f"{split}/{m}", v) for m, v in metrics.items()]
        if cost is not None and step != self._cost_step:  # once per step
            tags.append(("cost/grad_equivalents", cost))
            self._cost_step = step
        summary = scalars_summary(tags)
        self.tb.file_writer.add_summary(summary, step, now)
        if self.sinks:
            self._to_sinks("log_metrics", step, {f"{split}/{m}": v for m, v in metrics.items()}, now)

    def step_logger(self, split: str, metrics: list) -> Callable[..., None]:
        """``log(step, epoch, *values)``: :meth:`log_metrics` for the metric names given here."""
        names = list(metrics)
        return lambda step, epoch, *values: self.log_metrics(step, epoch, split, dict(zip(names, values)))

    def flush_tb(self) -> None:
        """Write pending TensorBoard events to the event file (the writer does it every second)."""
        if self._tb is not None:
            self._tb.flush()

    def log_histogram(self, tag: str, values, step: int, bins: int = HISTOGRAM_BINS) -> None:
        """A TensorBoard histogram of ``values`` (see :meth:`log_histograms`)."""
        self.log_histograms({tag: values}, step, bins)

    def log_histograms(self, tensors: Mapping[str, Any], step: int, bins: int = HISTOGRAM_BINS) -> None:
        """One TensorBoard event holding a histogram of each tensor: ``bins`` equal-width buckets
        from its min to its max (see :func:`gradlab.runs.logging.histogram_stats`); an empty
        tensor or one holding inf or NaN is skipped."""
        if not self.enabled:
            return
        stats = histograms_stats(tensors, bins)
        if stats:
            self.tb.file_writer.add_summary(histograms_summary(stats), step, time.time())

    def log_text(self, tag: str, text: str) -> None:
        if self.enabled:
            self.tb.add_text(tag, text)

    def log_hparams(self, hparams: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        """The run's options and final metrics for TensorBoard's HParams dashboard (``metrics``:
        scalar tags of this run, e.g. ``{"test/acc": 0.97}``)."""
        from gradlab.runs.logging import hparams_summaries

        if self.enabled:
            for summary in hparams_summaries(hparams, metrics):
                self.tb.file_writer.add_summary(summary)

    def write_csv(self, filename: str, df) -> Path:
        """Write a DataFrame atomically into the run folder."""
        path = self.path / filename
        if self.enabled:
            _atomic_write_text(path, df.to_csv(index=False))
        return path

    def save_figure(self, fig, name: str, step: int = 0) -> Path:
        """Save ``plots/<name>.png`` and log the figure as a TensorBoard image; closes it."""
        import matplotlib.pyplot as plt

        path = self.path / "plots" / f"{name}.png"
        if self.enabled:
            fig.savefig(path, dpi=110, bbox_inches="tight")
            self.tb.add_figure(f"plots/{name}", fig, global_step=step, close=False)
        plt.close(fig)
        return path

    # -- checkpoints -----------------------------------------------------------------------
    def save_checkpoint(self, obj: Any, name: str = "last.pt", wait: bool = True) -> None:
        """Write ``checkpoints/<name>`` atomically (see :mod:`gradlab.runs.checkpoints`).
        ``obj`` is cloned before this returns; with ``wait=False`` the file is written on a
        background thread (:meth:`wait_checkpoints` and :meth:`close` wait for it), so a kill
        meanwhile leaves the previous file in place."""
        if not self.enabled:
            return
        self._checkpoints.submit(obj, self.path / "checkpoints" / name)
        if wait:
            self._checkpoints.wait()

    def wait_checkpoints(self) -> None:
        """Block until checkpoints saved with ``wait=False`` are written; raise a write error."""
        self._checkpoints.wait()

    # -- ending ----------------------------------------------------------------------------
    def finish(self, status: str, metrics: Optional[Mapping[str, Any]] = None) -> None:
        """Write the one-row ``summary.csv`` atomically and close the writers."""
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}")
        self.status = status
        self._finished = True
        if self.enabled:
            row = {"run_id": self.run_id, "command": self.command, "status": status}
            row.update({k: v for k, v in (metrics or {}).items() if k not in row})
            buf = io.StringIO()
            w = csv.writer(buf, lineterminator="\n")
            w.writerow(row)
            w.writerow(_plain(v) for v in row.values())
            _atomic_write_text(self.path / "summary.csv", buf.getvalue())
            self._to_sinks("finish", status, self.path)
        self.close()

    def close(self) -> None:
        try:
            self._checkpoints.close()
        finally:
            self._metrics.close()
            if self._tb is not None:
                self._tb.close()
                self._tb = None

    def __enter__(self) -> "RunDir":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        """Finish as ``completed``, or as ``interrupted`` (Ctrl-C, or a signal that
        :class:`gradlab.runs.signals.StopOnSignals` turned into :class:`Interrupted`, which then
        names this folder among its ``runs``), or as ``failed`` with the error's first line."""
        if not self._finished:
            if exc_type is None:
                self.finish("completed")
            elif issubclass(exc_type, KeyboardInterrupt):
                signum = getattr(exc, "signum", signal.SIGINT)
                self.finish("interrupted", {"error": f"interrupted by {signal_name(signum)}"})
                if isinstance(exc, Interrupted) and self.enabled:
                    exc.runs.append(self.path)
            else:
                self.finish("failed", {"error": str(exc).splitlines()[0] if str(exc) else exc_type.__name__})
        return False


def _plain(obj: Any) -> Any:
    """Make a config YAML-safe: tuples to lists, paths to str, numpy/torch scalars to Python."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if obj is None:
        return None
    for t in (bool, int, float, str):  # exact built-ins: safe_dump rejects subclasses (TorchVersion)
        if isinstance(obj, t):
            return t(obj)
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)
