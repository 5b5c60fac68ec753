"""What a run logs as it goes: ``metrics.csv`` rows and TensorBoard events.

* ``metrics.csv`` is long format, ``step,epoch,split,metric,value,wall_time,grad_equivalents``,
  written with the :mod:`csv` module and flushed after every call, so a killed run keeps every row
  it logged. ``grad_equivalents`` is a training run's cumulative cost at the row's step in
  gradient-equivalents (:mod:`gradlab.curvature.cost`), empty in rows of other commands; a file
  of an older run (without that column) gets it, empty, when the run is resumed.
* TensorBoard goes through :class:`torch.utils.tensorboard.SummaryWriter`: the scalars of one
  call are one event (one ``Summary`` holding all of them); so are the histograms of one call,
  binned by :func:`torch.histc` into equal-width buckets (30 by default, TensorBoard's own
  default bucket count).

TensorBoard's stock writer checksums every record in pure Python on its writer thread, so the cost
of an event grows with its bytes: fewer buckets and one event per call keep it small.
"""

from __future__ import annotations

import csv
import math
import os
import time
from pathlib import Path
from typing import Any, Mapping, Optional

METRIC_COLUMNS = ["step", "epoch", "split", "metric", "value", "wall_time", "grad_equivalents"]
#: The header of runs made before the grad_equivalents column.
LEGACY_METRIC_COLUMNS = METRIC_COLUMNS[:-1]


class MetricsCSV:
    """Appends rows to ``metrics.csv`` (the header first when the file is new or empty)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._file = None
        self._writer = None

    def open(self) -> None:
        """Open for appending; a new or empty file gets the header at once (a run that stops
        before its first row still has a metrics.csv that pandas reads)."""
        if self._file is None:
            new = not self.path.exists() or self.path.stat().st_size == 0
            if not new and _header(self.path) == LEGACY_METRIC_COLUMNS:
                truncate_metrics(self.path, float("inf"))  # rewritten with the new column, empty
            self._file = open(self.path, "a", newline="")
            self._writer = csv.writer(self._file)
            if new:
                self._writer.writerow(METRIC_COLUMNS)
                self._file.flush()

    def write(self, step: int, epoch: Optional[int], split: str, metrics: Mapping[str, float], wall: float,
              cost: Optional[float] = None) -> None:
        if self._file is None:
            self.open()
        e, w = "" if epoch is None else epoch, f"{wall:.3f}"
        c = "" if cost is None else f"{cost:.6g}"
        self._writer.writerows([step, e, split, name, float(v), w, c] for name, v in metrics.items())
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = self._writer = None


def truncate_metrics(path: Path, keep_until_step: int) -> None:
    """Keep the rows of ``metrics.csv`` up to ``keep_until_step`` (and the header): those logged
    after the checkpoint a run resumes from, and a line torn by a kill, go. Rewritten atomically."""
    path = Path(path)
    if not path.exists():
        return
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(METRIC_COLUMNS)
        w.writerows([r.get(c) or "" for c in METRIC_COLUMNS] for r in rows if _step_of(r) <= keep_until_step)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _header(path: Path) -> list:
    with open(path, newline="") as f:
        return next(csv.reader(f), [])


def _step_of(row: dict) -> float:
    """A metrics row's step; a torn last line (killed mid-write) sorts after every step."""
    if any(v is None or v == "" for k, v in row.items() if k not in ("epoch", "grad_equivalents")):
        return float("inf")
    try:
        return int(row["step"])
    except (KeyError, TypeError, ValueError):
        return float("inf")


def splits_logged_at(path: Path, step: int) -> set:
    """The splits of the ``metrics.csv`` rows at ``step`` (read once, when a run resumes)."""
    path = Path(path)
    if not path.exists():
        return set()
    with open(path, newline="") as f:
        return {r["split"] for r in csv.DictReader(f) if _step_of(r) == step}


def open_summary_writer(log_dir: Path, purge_step: Optional[int] = None):
    """A ``SummaryWriter`` on ``log_dir``. With ``purge_step`` (a resumed run), TensorBoard drops
    the events of earlier files at that step and after, so each step shows once.

    TensorBoard reads a folder's event files in name order, and a name starts with the second
    the file was made, then host, process id and a counter: a file made in the same second as
    an earlier one can sort before it, and its purge would then come first and drop nothing.
    Such a file is made again in the next second (only a run resumed within a second of its
    last start ever waits)."""
    log_dir = Path(log_dir)
    before = {p.name for p in log_dir.glob("events.out.tfevents.*")}
    writer = _summary_writer(log_dir, purge_step)
    if purge_step is None or not before:
        return writer
    made = {p.name for p in log_dir.glob("events.out.tfevents.*")} - before
    if made and min(made) < max(before):
        writer.close()
        for name in made:
            (log_dir / name).unlink(missing_ok=True)
        _wait_for_the_second_after(max(before))
        writer = _summary_writer(log_dir, purge_step)
    return writer


def _summary_writer(log_dir: Path, purge_step: Optional[int]):
    from torch.utils.tensorboard import SummaryWriter

    # A large queue: the training thread never waits for the writer thread.
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step, max_queue=1000, flush_secs=1)


def _wait_for_the_second_after(event_file_name: str) -> None:
    try:
        stamp = int(event_file_name.split(".")[3])
    except (IndexError, ValueError):
        return
    deadline = time.time() + 1.1  # a file "from the future" (clock skew) does not hold us longer
    while int(time.time()) <= stamp and time.time() < deadline:
        time.sleep(0.02)


def scalars_summary(tags_values):
    """One TensorBoard ``Summary`` holding every ``(tag, value)`` as a simple scalar."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    return Summary(value=[Summary.Value(tag=t, simple_value=float(v)) for t, v in tags_values])


HISTOGRAM_BINS = 30  # tensorboard.plugins.histogram.summary_v2.DEFAULT_BUCKET_COUNT


def histogram_stats(values, bins: int = HISTOGRAM_BINS) -> Optional[dict]:
    """What ``SummaryWriter.add_histogram_raw`` takes for ``values`` (any shape): ``bins``
    equal-width buckets from its min to its max (bucket i holds ``[lo + i w, lo + (i + 1) w)``,
    the last one also ``hi``, as :func:`torch.histc`), and min, max, count, sum and sum of
    squares in float64. None for an empty tensor or one holding inf or NaN. A constant tensor
    gets a range of width ``max(|v|, 1) * 1e-6`` above its value, all of it in the first bucket."""
    return histograms_stats({"": values}, bins).get("")


def histograms_stats(tensors: Mapping[str, Any], bins: int = HISTOGRAM_BINS) -> dict:
    """:func:`histogram_stats` of each tensor (tag -> stats, tags of skipped tensors left out),
    with one read-back from the device for the min, max, sum and sum of squares of all of them."""
    import torch

    flat = {tag: v.detach().reshape(-1).to("cpu", torch.float64) for tag, v in tensors.items()}
    flat = {tag: x for tag, x in flat.items() if x.numel()}
    if not flat:
        return {}
    moments = torch.stack([torch.stack([x.min(), x.max(), x.sum(), x.dot(x)]) for x in flat.values()]).tolist()
    out = {}
    for (tag, x), (lo, hi, total, squares) in zip(flat.items(), moments):
        if not (math.isfinite(lo) and math.isfinite(hi)):
            continue
        if hi <= lo:
            hi = lo + max(abs(lo), 1.0) * 1e-6
        width = (hi - lo) / bins
        out[tag] = dict(min=lo, max=hi, num=x.numel(), sum=total, sum_squares=squares,
                        bucket_limits=[lo + width * (j + 1) for j in range(bins - 1)] + [hi],
                        bucket_counts=torch.histc(x, bins, lo, hi).tolist())
    return out


def histograms_summary(stats: Mapping[str, Mapping]):
    """One TensorBoard ``Summary`` holding a histogram per tag (``stats``: tag -> what
    :func:`histograms_stats` gives), so that a step's histograms are one event."""
    from tensorboard.compat.proto.summary_pb2 import Summary
    from torch.utils.tensorboard.summary import histogram_raw

    return Summary(value=[v for tag, h in stats.items() for v in histogram_raw(tag, **h).value])


class NullWriter:
    """Stands in for a SummaryWriter on ranks that must not write: every method does nothing."""

    def __getattr__(self, _name: str) -> Any:
        return lambda *a, **k: None


def hparams_summaries(hparams: Mapping, metrics: Mapping) -> list:
    """The three summaries of TensorBoard's HParams dashboard for one run: ``hparams`` (values
    that are not numbers, text or booleans are written as text; ``None`` as ``"none"``) and
    ``metrics`` (scalar tags of the run, e.g. ``test/acc``, with their final values)."""
    from torch.utils.tensorboard.summary import hparams as hp_summary

    clean = {k: ("none" if v is None else v if isinstance(v, (int, float, str, bool)) else str(v))
             for k, v in hparams.items()}
    return list(hp_summary(clean, {k: float(v) for k, v in metrics.items()}))
