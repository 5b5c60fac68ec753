"""Finding runs in a runs folder and reading what they recorded (no model, no data: see
:mod:`gradlab.training.load` for rebuilding a trained model from a run)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from gradlab.core.errors import GradlabError


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
