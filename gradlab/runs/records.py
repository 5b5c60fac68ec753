"""Finding runs in a runs folder and reading what they recorded (no model, no data: see
:mod:`gradlab.training.load` for rebuilding a trained model from a run).

Every reader checks what it reads: a damaged or foreign file raises :class:`RunFolderError`,
one line that names the file and what is wrong with it, and never a parser's traceback. The
checks are about form (a YAML mapping with ``command`` and ``config``, a two-line CSV whose
row has as many fields as its header and a known status, a UTF-8 ``metrics.csv`` with the
stock header), so they cost a read of the file and no more.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Optional

from gradlab.core.errors import GradlabError
from gradlab.runs.logging import LEGACY_METRIC_COLUMNS, METRIC_COLUMNS

STATUSES = ("completed", "diverged", "interrupted", "failed")

# The keys a run's config.yaml holds at its top level (RunDir._write_config writes them all).
CONFIG_KEYS = ("command", "config")
#: The names a run of each command is rebuilt from: its config.yaml is damaged without them
#: (checked where a run is rebuilt or listed, :func:`require_config_keys`).
REBUILT_FROM = {"train": ("model", "dataset", "opt")}
_CHUNK = 1 << 20


class RunFolderError(GradlabError):
    """A file of a run folder is damaged or foreign: ``file`` is its path, ``problem`` says
    what is wrong, in a few words (``"not valid YAML (line 3)"``)."""

    def __init__(self, file: str | Path, problem: str, prefix: str = "damaged run file"):
        self.file, self.problem = Path(file), problem
        super().__init__(f"{prefix} {file}: {problem}")


def read_config(path: str | Path) -> dict:
    """The whole ``config.yaml`` document of a run (keys run_id, command, versions, config, ...).

    Raises:
        GradlabError: no config.yaml (not a run folder).
        RunFolderError: the file is not valid YAML, not a mapping, lacks ``command`` or
            ``config``, or its ``config`` is not a mapping.
    """
    import yaml

    p = Path(path) / "config.yaml"
    if not p.is_file():
        raise GradlabError(f"not a gradlab run folder (no config.yaml): {path}")
    try:
        doc = yaml.safe_load(p.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise RunFolderError(p, "not text (binary data)") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise RunFolderError(p, f"not valid YAML{where}") from None
    if not isinstance(doc, dict):
        raise RunFolderError(p, f"not a mapping of keys to values (found {type(doc).__name__})")
    missing = [k for k in CONFIG_KEYS if k not in doc]
    if missing:
        raise RunFolderError(p, f"missing key {missing[0]!r} (it holds: {', '.join(map(str, doc)) or 'nothing'})")
    if not isinstance(doc["command"], str) or not doc["command"]:
        raise RunFolderError(p, f"'command' is {doc['command']!r}, not a command name")
    if not isinstance(doc["config"], dict):
        raise RunFolderError(p, f"'config' is a {type(doc['config']).__name__}, not a mapping")
    return doc


def require_config_keys(path: str | Path, cfg: dict, keys) -> None:
    """RunFolderError naming ``config.yaml`` unless ``cfg`` (its ``config`` mapping) holds each
    of ``keys`` as a non-empty string (the names a run is rebuilt from: model, dataset, opt)."""
    for k in keys:
        if k not in cfg:
            raise RunFolderError(Path(path) / "config.yaml", f"'config' lacks key {k!r}")
        if not isinstance(cfg[k], str) or not cfg[k]:
            raise RunFolderError(Path(path) / "config.yaml", f"'config: {k}' is {cfg[k]!r}, not a name")


def read_summary(path: str | Path) -> Optional[dict]:
    """The one row of a run's ``summary.csv`` as ``{column: text}``; None if there is none yet
    (a run still going, or killed). RunFolderError if it is not text, not one header line and
    one row of as many fields ending in a newline (written atomically, a complete file always
    does), or its status is not one of :data:`STATUSES`."""
    p = Path(path) / "summary.csv"
    if not p.is_file():
        return None
    text = _text(p)
    if not text.endswith("\n"):
        raise RunFolderError(p, "truncated (the last line is cut)")
    try:
        rows = list(csv.reader(io.StringIO(text, newline="")))
    except csv.Error as e:
        raise RunFolderError(p, f"not CSV ({e})") from None
    if len(rows) != 2:
        raise RunFolderError(p, f"{len(rows)} lines, expected a header and one row")
    header, values = rows
    if len(values) != len(header):
        raise RunFolderError(p, f"the row has {len(values)} fields for {len(header)} columns (truncated?)")
    row = dict(zip(header, values))
    if row.get("status") not in STATUSES:
        raise RunFolderError(p, f"status {row.get('status')!r} is not one of {', '.join(STATUSES)}")
    return row


def check_metrics(path: str | Path) -> None:
    """RunFolderError unless ``metrics.csv`` (if the run has one) is UTF-8 text without NUL
    bytes whose first line is the stock header ``step,epoch,split,metric,value,wall_time,grad_equivalents``
    (or, in a run made before that column, the same without it).
    An empty file (a run stopped before its first row) and a torn last line (a kill while it
    was written; ``--resume`` drops it) are not damage."""
    p = Path(path) / "metrics.csv"
    if not p.is_file() or p.stat().st_size == 0:
        return
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    first = b""
    with open(p, "rb") as f:
        while chunk := f.read(_CHUNK):
            if not first:
                first = chunk.split(b"\n", 1)[0].rstrip(b"\r")
            if b"\0" in chunk:
                raise RunFolderError(p, "not text (NUL bytes: binary data)")
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError:
                raise RunFolderError(p, "not text (invalid UTF-8: binary data)") from None
    if first.decode("utf-8", "replace") not in (",".join(METRIC_COLUMNS), ",".join(LEGACY_METRIC_COLUMNS)):
        raise RunFolderError(p, f"the header is not {','.join(METRIC_COLUMNS)}")


def check_run(path: str | Path) -> dict:
    """Read and check every record of a run folder (config.yaml, summary.csv, metrics.csv);
    the config document, or the first RunFolderError."""
    doc = read_config(path)
    read_summary(path)
    check_metrics(path)
    return doc


def _text(p: Path) -> str:
    data = p.read_bytes()
    if b"\0" in data:
        raise RunFolderError(p, "not text (NUL bytes: binary data)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise RunFolderError(p, "not text (invalid UTF-8: binary data)") from None


def list_runs(runs_dir: str | Path) -> list[Path]:
    """Run folders under ``runs_dir``, oldest first (by config.yaml's time, then name)."""
    d = Path(runs_dir)
    if not d.is_dir():
        return []
    runs = [p for p in d.iterdir() if p.is_dir() and (p / "config.yaml").is_file()]
    return sorted(runs, key=lambda p: ((p / "config.yaml").stat().st_mtime, p.name))


def has_checkpoint(path: Path) -> bool:
    return (Path(path) / "checkpoints" / "last.pt").is_file()


def find_run(runs_dir: str | Path, ref: Optional[str] = "last", require_checkpoint: bool = False) -> Path:
    """Resolve ``ref`` (a path, a run id under ``runs_dir``, or ``last``) to a run folder.

    With ``require_checkpoint``, ``last`` means the newest run that has ``checkpoints/last.pt``
    (a trained model), since probe and attack runs keep none.
    """
    if ref in (None, "", "last"):
        runs = [p for p in list_runs(runs_dir) if not require_checkpoint or has_checkpoint(p)]
        if not runs:
            what = "trained run (with checkpoints/last.pt)" if require_checkpoint else "run"
            raise GradlabError(f"no {what} found under {runs_dir}: run `gradlab train` first")
        return runs[-1]
    for cand in (Path(ref), Path(runs_dir) / ref):
        if cand.is_dir():
            if not (cand / "config.yaml").is_file():
                raise GradlabError(f"not a gradlab run folder (no config.yaml): {cand}")
            if require_checkpoint and not has_checkpoint(cand):
                raise GradlabError(f"run {cand} has no checkpoint (checkpoints/last.pt): it is not a trained model")
            return cand
    raise GradlabError(f"no run {ref!r} (looked for the folder itself and under {runs_dir})")
