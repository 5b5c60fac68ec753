"""Run folders: the contract scripts and other tools rely on.

``<runs-dir>/<YYYYmmdd-HHMMSS>-<command>[-<name>]/`` holds

* ``config.yaml``: the resolved configuration, versions and command line;
* TensorBoard event files;
* ``metrics.csv``: long format ``step,epoch,split,metric,value,wall_time``, flushed per row;
* ``summary.csv``: one row ``run_id,command,status,...``, written atomically at the end;
* ``checkpoints/`` and ``plots/``.

A folder without ``summary.csv`` is a run that is still going or died without a word
(``gradlab runs`` shows it as ``incomplete``); one that failed says ``failed``.
"""

from __future__ import annotations

import csv
import datetime as _dt
import math
import os
import platform
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from gradlab import __version__
from gradlab.core.errors import GradlabError

STATUSES = ("completed", "diverged", "interrupted", "failed")
METRIC_COLUMNS = ["step", "epoch", "split", "metric", "value", "wall_time"]
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=,+-]*$")


def validate_run_name(name: Optional[str]) -> None:
    if name is None:
        return
    if "/" in name or "\\" in name or ".." in name or not _NAME_RE.match(name):
        raise GradlabError(
            f"invalid run name {name!r}: use letters, digits and . _ - = , + (no path separators or '..')"
        )


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_checkpoint(obj: Any, path: Path) -> None:
    """What ``torch.save`` writes (see :mod:`gradlab._serialize`), to a temporary file then
    renamed, so a kill never leaves half a checkpoint."""
    from gradlab._serialize import dumps

    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write_bytes(path, dumps(obj))


def _atomic_write_snapshot(path: Path, snap) -> None:
    from gradlab._serialize import write_snapshot

    tmp = path.with_name(f".{path.name}.tmp")
    try:
        if not tmp.parent.is_dir():  # as open() would say it (torch's writer raises RuntimeError)
            raise FileNotFoundError(2, "No such file or directory", str(tmp))
        write_snapshot(str(tmp), snap)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class _BackgroundWriter:
    """Writes files atomically on one thread, in order, one at a time. The write and the rename
    release the GIL; on ext4 the rename of a new file over an old one also starts writeback of
    the new one, 0.3-1.5 ms here, so the training loop does not wait for it."""

    def __init__(self):
        self._pool = None
        self._pending = None

    def submit(self, fn, *args) -> None:
        """Run ``fn(*args)`` on the writer thread, after the previous call has finished."""
        self.wait()  # one write in flight: memory stays bounded, and a failure surfaces here
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(1, thread_name_prefix="gradlab-checkpoint")
        self._pending = self._pool.submit(fn, *args)

    def wait(self) -> None:
        """Block until the last submitted file is in place; re-raise its error, if any."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown()
                self._pool = None


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    """Load a checkpoint with ``weights_only=True``: tensors and plain containers, never code."""
    import torch

    if not Path(path).is_file():
        raise GradlabError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which one
        raise GradlabError(f"cannot read checkpoint {path}: {str(e).splitlines()[0]}") from None


class RunDir:
    """One run folder. ``enabled=False`` gives an object that writes nothing (ranks > 0)."""

    def __init__(self, path: Path, command: str, enabled: bool = True):
        self.path = Path(path)
        self.command = command
        self.enabled = enabled
        self.run_id = self.path.name
        self._tb = None
        self._metrics_file = None
        self._finished = False
        self.status: Optional[str] = None
        self._writer = _BackgroundWriter()
        self._checkpoint_dir_made = False
        self._snapshots = None  # gradlab._serialize.Snapshots, made at the first checkpoint
        self._segments = None  # see _histogram_segments

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
        return run

    @classmethod
    def reopen(cls, path: Path, keep_until_step: int) -> "RunDir":
        """Continue an existing run (``--resume``): drop metric rows past the checkpoint."""
        run = cls(Path(path), read_config(path)["command"])
        mpath = run.path / "metrics.csv"
        if mpath.exists():
            with open(mpath, newline="") as f:
                rows = list(csv.DictReader(f))
            kept = [r for r in rows if _step_of(r) <= keep_until_step]
            buf = [",".join(METRIC_COLUMNS)] + [",".join(str(r[c]) for c in METRIC_COLUMNS) for r in kept]
            _atomic_write_text(mpath, "\n".join(buf) + "\n")
        summary = run.path / "summary.csv"
        if summary.exists():
            summary.unlink()
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

    # -- logging ---------------------------------------------------------------------------
    @property
    def tb(self):
        if self._tb is None:
            if not self.enabled:
                self._tb = _NullWriter()
            else:
                from gradlab._tbwriter import BufferedSummaryWriter

                self._tb = BufferedSummaryWriter(log_dir=str(self.path))
        return self._tb

    def log_metrics(self, step: int, epoch: Optional[int], split: str, metrics: Mapping[str, float]) -> None:
        """Each metric to TensorBoard (``split/metric``) and as one row of metrics.csv, written
        straight to the file (one write per call)."""
        if not self.enabled:
            return
        if self._metrics_file is None:
            self._open_metrics()
        now = time.time()
        key = (split, *metrics)
        layout = _ROW_LAYOUTS.get(key)
        if layout is None:
            layout = _ROW_LAYOUTS[key] = _row_layout(split, list(metrics))
        tags, rows = layout
        values = [float(v) for v in metrics.values()]
        self.tb.add_scalar_values(list(zip(tags, values)), step, now)
        self._metrics_file.write(rows.format(step, "" if epoch is None else epoch, f"{now:.3f}", *values).encode())

    def _open_metrics(self) -> None:
        if self._metrics_file is None:
            mpath = self.path / "metrics.csv"
            new = not mpath.exists() or mpath.stat().st_size == 0
            self._metrics_file = open(mpath, "ab", buffering=0)
            if new:
                self._metrics_file.write((",".join(METRIC_COLUMNS) + "\r\n").encode())

    def step_logger(self, split: str, metrics: list) -> Callable[..., None]:
        """``log(step, epoch, *values)``: what ``log_metrics(step, epoch, split, dict(zip(metrics,
        values)))`` does (same metrics.csv rows, same TensorBoard event), for float values, with
        the per-call work done once here. For the per-step scalars of training, where each call
        runs right after a training step with cold caches (~40 us for log_metrics there, ~7 us
        in a loop of it alone). Valid until :meth:`close`."""
        if not self.enabled:
            return lambda *a: None
        self._open_metrics()
        tags, rows = _row_layout(split, list(metrics), wall="{2:.3f}")  # the wall time formatted by format()
        add_event, write, now = self.tb.scalar_adder(tags), self._metrics_file.write, time.time

        def log(step, epoch, *values):
            wall = now()
            add_event(step, wall, values)
            write(rows.format(step, epoch, wall, *values).encode())

        return log

    def flush_tb(self) -> None:
        """Write buffered TensorBoard events to the event file (it happens at least once a
        second anyway, see :mod:`gradlab._tbwriter`)."""
        if self._tb is not None:
            self._tb.flush()

    def log_histogram(self, tag: str, values, step: int, bins: int = 64) -> None:
        """A TensorBoard histogram of ``values`` (see :meth:`log_histograms`)."""
        self.log_histograms({tag: values}, step, bins)

    def log_histograms(self, tensors: Mapping[str, Any], step: int, bins: int = 64) -> None:
        """A TensorBoard histogram of each tensor: ``bins`` equal-width buckets from its min to
        its max (one holding inf or NaN is skipped).

        All the tensors go through one pass of ~20 torch calls rather than ~12 calls each, and
        the events are encoded when written (see :mod:`gradlab._tbwriter`): the per-layer
        gradient histograms of the default model cost ~0.3 ms instead of ~1.5 ms. (SummaryWriter.
        add_histogram bins with numpy into ~1,500 exponential buckets: 2.5 ms for one 16k-value
        tensor.)
        """
        if not self.enabled:
            return
        import torch

        items = [(tag, t.detach().reshape(-1)) for tag, t in tensors.items() if t.numel() > 0]
        if not items:
            return
        n = len(items)
        lengths = [t.numel() for _, t in items]
        x = torch.cat([t for _, t in items]).to("cpu", torch.float64)  # a copy: scaled in place below
        parts = list(x.split(lengths))
        bucket_base, segment_ends = self._histogram_segments(lengths, bins)
        if hasattr(torch, "_foreach_max"):
            maxima = torch._foreach_max(parts)
            torch._foreach_neg_(parts)
            neg_minima = torch._foreach_max(parts)
            torch._foreach_neg_(parts)
        else:  # pragma: no cover - torch < 2.4
            maxima, neg_minima = [p.max() for p in parts], [-p.min() for p in parts]
        stats = torch.stack([*maxima, *neg_minima, *torch._foreach_norm(parts)]).tolist()
        his, los, norms = stats[:n], [-v for v in stats[n:2 * n]], stats[2 * n:]
        finite = [math.isfinite(lo) and math.isfinite(hi) for lo, hi in zip(los, his)]
        if not all(finite):  # zeroed, so that they neither spoil the running sums nor get binned
            torch._foreach_zero_([p for p, ok in zip(parts, finite) if not ok])
        ends = x.cumsum(0)[segment_ends].tolist()  # running sums at each tensor's last value
        sums = [b - a for a, b in zip([0.0] + ends[:-1], ends)]
        # A constant tensor gets one bucket that holds everything.
        his = [hi if hi > lo else lo + max(abs(lo), 1.0) * 1e-6 for lo, hi in zip(los, his)]
        torch._foreach_sub_(parts, [lo if ok else 0.0 for lo, ok in zip(los, finite)])
        torch._foreach_mul_(parts, [bins / (hi - lo) if ok else 1.0 for lo, hi, ok in zip(los, his, finite)])
        # Bucket i holds [lo + i w, lo + (i + 1) w), the last one also hi, as torch.histc.
        counts = torch.bincount(x.long().clamp_(0, bins - 1).add_(bucket_base), minlength=n * bins).tolist()
        wall = time.time()
        for i, (tag, _) in enumerate(items):
            if finite[i]:
                lo, hi = los[i], his[i]
                width = (hi - lo) / bins
                limits = [lo + width * (j + 1) for j in range(bins - 1)] + [hi]
                self.tb.add_histogram_values(tag, step, wall, min=lo, max=hi, num=lengths[i], sum=sums[i],
                                             sum_squares=norms[i] ** 2, bucket_limit=limits,
                                             bucket=counts[i * bins:(i + 1) * bins])

    def _histogram_segments(self, lengths: list, bins: int):
        """For each value the index of its tensor's first bucket, and the position of each
        tensor's last value (kept for the next call: the layers' shapes repeat)."""
        import torch

        key = (tuple(lengths), bins)
        if self._segments is None or self._segments[0] != key:
            segment = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
            self._segments = (key, segment * bins, torch.tensor(lengths).cumsum(0) - 1)
        return self._segments[1], self._segments[2]

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

    def log_text(self, tag: str, text: str) -> None:
        if self.enabled:
            self.tb.add_text(tag, text)

    def save_checkpoint(self, obj: Any, name: str = "last.pt", wait: bool = True) -> None:
        """Write ``checkpoints/<name>`` atomically. ``obj``'s values are frozen before this
        returns; with ``wait=False`` the file is written on a background thread
        (:meth:`wait_checkpoints` and :meth:`close` wait for it), so a kill meanwhile leaves the
        previous file in place.

        Plain CPU tensors are copied into reused flat buffers (a snapshot, see
        :mod:`gradlab._serialize`) and the pickling and writing happen on that thread: for the
        default model with Adam state ~0.1 ms here instead of ~1.2 ms, for an MLP 2x512 ~0.3
        instead of ~3 ms. Anything else is serialised here with ``dumps``."""
        if not self.enabled:
            return
        from gradlab._serialize import Snapshots, dumps

        path = self.path / "checkpoints" / name
        if not self._checkpoint_dir_made:
            path.parent.mkdir(exist_ok=True)
            self._checkpoint_dir_made = True
        self._writer.wait()  # the previous write may still read the snapshot buffers
        if self._snapshots is None:
            self._snapshots = Snapshots()
        snap = self._snapshots.take(obj)
        if snap is not None:
            self._writer.submit(_atomic_write_snapshot, path, snap)
        else:
            self._writer.submit(_atomic_write_bytes, path, dumps(obj))
        if wait:
            self._writer.wait()

    def wait_checkpoints(self) -> None:
        """Block until checkpoints saved with ``wait=False`` are written; raise a write error."""
        self._writer.wait()

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
            buf = [",".join(row), ",".join(_csv_cell(v) for v in row.values())]
            _atomic_write_text(self.path / "summary.csv", "\n".join(buf) + "\n")
        self.close()

    def close(self) -> None:
        try:
            self._writer.close()
        finally:
            self.flush_tb()
            if self._metrics_file is not None:
                self._metrics_file.close()
                self._metrics_file = None
            if self._tb is not None:
                self._tb.close()
                self._tb = None

    def __enter__(self) -> "RunDir":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if not self._finished:
            if exc_type is None:
                self.finish("completed")
            else:
                self.finish("interrupted" if issubclass(exc_type, KeyboardInterrupt) else "failed",
                            {"error": str(exc).splitlines()[0] if str(exc) else exc_type.__name__})
        return False


class _NullWriter:
    """Stands in for a SummaryWriter on ranks that must not write."""

    def __getattr__(self, _name):
        return lambda *a, **k: None


def _step_of(row: dict) -> float:
    """A metrics row's step; a torn last line (killed mid-write) sorts after every step."""
    if any(v is None or v == "" for k, v in row.items() if k != "epoch"):
        return float("inf")
    try:
        return int(row["step"])
    except (KeyError, TypeError, ValueError):
        return float("inf")


_ROW_LAYOUTS: dict = {}  # (split, metric, ...) -> what _row_layout returns


def _row_layout(split: str, metrics: list, wall: str = "{2}") -> tuple[list, str]:
    """TensorBoard tags, and a format string for the metrics.csv rows of one log_metrics call
    (``{0}`` step, ``{1}`` epoch, ``{2}`` wall time, ``{3}...`` the values), as csv.writer would
    write them (excel dialect: names quoted when they hold a comma, quote or newline)."""
    tags = [f"{split}/{m}" for m in metrics]
    cells = [_csv_cell(str(x)).replace("{", "{{").replace("}", "}}") for x in [split, *metrics]]
    rows = "".join(f"{{0}},{{1}},{cells[0]},{cell},{{{i + 3}!r}},{wall}\r\n" for i, cell in enumerate(cells[1:]))
    return tags, rows


def _csv_cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v)
    s = str(v)
    return '"' + s.replace('"', '""') + '"' if any(c in s for c in ',"\r\n') else s


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


# -- finding and loading runs ---------------------------------------------------------------
def read_config(path: str | Path) -> dict:
    """The whole ``config.yaml`` document of a run (keys run_id, command, versions, config, ...)."""
    import yaml

    p = Path(path) / "config.yaml"
    if not p.is_file():
        raise GradlabError(f"not a gradlab run folder (no config.yaml): {path}")
    try:
        doc = yaml.safe_load(p.read_text())
    except yaml.YAMLError:
        raise GradlabError(f"corrupt config.yaml in run folder {path}") from None
    if not isinstance(doc, dict) or "config" not in doc:
        raise GradlabError(f"corrupt config.yaml in run folder {path}")
    return doc


def list_runs(runs_dir: str | Path) -> list[Path]:
    """Run folders under ``runs_dir``, oldest first (folder names start with a timestamp)."""
    d = Path(runs_dir)
    if not d.is_dir():
        return []
    runs = [p for p in d.iterdir() if p.is_dir() and (p / "config.yaml").is_file()]
    return sorted(runs, key=lambda p: ((p / "config.yaml").stat().st_mtime, p.name))


def find_run(runs_dir: str | Path, ref: Optional[str] = "last", require_checkpoint: bool = False) -> Path:
    """Resolve ``ref`` (a path, a run id under ``runs_dir``, or ``last``) to a run folder.

    With ``require_checkpoint``, ``last`` means the newest run that has ``checkpoints/last.pt``
    (a trained model), since probe and attack runs keep none.
    """
    ckpt = lambda p: (p / "checkpoints" / "last.pt").is_file()  # noqa: E731
    if ref in (None, "", "last"):
        runs = [p for p in list_runs(runs_dir) if not require_checkpoint or ckpt(p)]
        if not runs:
            what = "trained run (with checkpoints/last.pt)" if require_checkpoint else "run"
            raise GradlabError(f"no {what} found under {runs_dir}: run `gradlab train` first")
        return runs[-1]
    for cand in (Path(ref), Path(runs_dir) / ref):
        if cand.is_dir():
            if not (cand / "config.yaml").is_file():
                raise GradlabError(f"not a gradlab run folder (no config.yaml): {cand}")
            if require_checkpoint and not ckpt(cand):
                raise GradlabError(f"run {cand} has no checkpoint (checkpoints/last.pt): it is not a trained model")
            return cand
    raise GradlabError(f"no run {ref!r} (looked for the folder itself and under {runs_dir})")


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
