"""Rebuilding a trained model from its run folder, and reopening a train run to resume it (above
the model zoo and the datasets, which the run-records layer :mod:`gradlab.runs` never imports).

Everything a run folder holds is checked before any data is loaded or any code imported: its
records (:func:`gradlab.runs.records.check_run`), the names the model is rebuilt from, the
checkpoint's keys and, for a user model ``package.module:factory``, whether this user may import
it (:mod:`gradlab.runs.trust`). A damaged file is one :class:`~gradlab.runs.records.RunFolderError`
line naming it; nothing is created.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from gradlab.core.errors import GradlabError
from gradlab.runs.checkpoints import load_checkpoint
from gradlab.runs.records import REBUILT_FROM, RunFolderError, check_run, find_run, require_config_keys
from gradlab.runs.trust import is_trusted, names_code

#: What ``checkpoints/last.pt`` of a train run holds to be resumed (Trainer.state); ``callbacks``
#: is absent from checkpoints written before callbacks had state.
RESUME_KEYS = ("model", "optimizer", "scheduler", "rng", "step", "epoch", "batch_in_epoch", "epoch_sums")


@dataclass
class LoadedRun:
    path: Path
    config: dict
    model: Any
    data: Any
    checkpoint: dict


@dataclass
class ResumePoint:
    """A train run checked for ``--resume``: its folder, its config and its checkpoint."""

    path: Path
    config: dict
    checkpoint: dict


def check_code_trust(path: Path, cfg: Mapping, trust_code: bool) -> None:
    """GradlabError before a run folder's config.yaml makes gradlab import a user model that this
    user did not create the run with (:mod:`gradlab.runs.trust`), unless ``trust_code``."""
    model = cfg.get("model")
    if names_code(model) and not trust_code and not is_trusted(path, model):
        module = model.partition(":")[0]
        raise GradlabError(
            f"{Path(path) / 'config.yaml'} names user model {model!r}: rebuilding it imports module {module!r} "
            f"and runs its code, and you did not create this run with that model: pass --trust-code "
            f"if you trust this run folder"
        )


def load_run(ref: Optional[str] = "last", runs_dir: str | Path = "runs", device="cpu",
             trust_code: bool = False) -> LoadedRun:
    """Rebuild a trained run's model (eval mode, weights from ``checkpoints/last.pt``) and its data.

    Args:
        ref: a run folder, a run id under ``runs_dir``, or ``last`` (the newest trained run).
        trust_code: import a user model named by the run's config.yaml even if this user did
            not create the run with it (``--trust-code``).
    Raises:
        GradlabError: no such run; a user model not trusted.
        RunFolderError: a damaged config.yaml, summary.csv, metrics.csv or last.pt, or weights
            that do not fit the model the config names.
    """
    from gradlab.data import dataset_options_in, load_dataset
    from gradlab.models import build_model, model_options_in

    path = find_run(runs_dir, ref, require_checkpoint=True)
    cfg = check_run(path)["config"]
    require_config_keys(path, cfg, ("model", "dataset"))
    check_code_trust(path, cfg, trust_code)
    file = path / "checkpoints" / "last.pt"
    ckpt = load_checkpoint(file, keys=("model",))
    data = load_dataset(
        cfg["dataset"], seed=cfg.get("seed", 0), data_dir=cfg.get("data_dir"),
        **dataset_options_in(cfg["dataset"], cfg),
    )
    model = build_model(cfg["model"], data.spec, **model_options_in(cfg["model"], cfg))
    load_weights(model, ckpt["model"], file, cfg["model"])
    model.to(device).eval()
    return LoadedRun(path, cfg, model, data, ckpt)


def load_weights(model, state, file: Path, name: str) -> None:
    """``model.load_state_dict(state)``, or a RunFolderError naming ``file`` and the first
    missing, unexpected or misshapen tensor."""
    import torch

    def fail(problem: str):
        raise RunFolderError(file, f"its weights do not fit model {name}: {problem}", prefix="cannot read checkpoint")

    if not isinstance(state, Mapping):
        fail(f"'model' is a {type(state).__name__}, not a state dict")
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        fail("; ".join(f"{what} {_few(keys)}" for what, keys in (("missing", missing), ("unexpected", unexpected))
                       if keys))
    for k, t in own.items():
        v = state[k]
        if not isinstance(v, torch.Tensor) or v.shape != t.shape:
            got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            fail(f"{k!r} is {got}, expected {tuple(t.shape)}")
    model.load_state_dict(state)


def _few(keys: Sequence[str], n: int = 3) -> str:
    shown = ", ".join(repr(k) for k in keys[:n])
    return shown + (f" and {len(keys) - n} more" if len(keys) > n else "")


def open_resume(ref: str, runs_dir: str | Path = "runs", trust_code: bool = False) -> ResumePoint:
    """Check a train run for ``--resume``: every record readable, the names it was built from,
    the user model trusted, and ``last.pt`` holding :data:`RESUME_KEYS` of the right kinds."""
    path = find_run(runs_dir, ref)
    doc = check_run(path)
    if doc["command"] != "train":
        raise GradlabError(f"--resume {ref}: run {path.name} is a {doc['command']!r} run, not a train run")
    cfg = doc["config"]
    require_config_keys(path, cfg, REBUILT_FROM["train"])
    check_code_trust(path, cfg, trust_code)
    file = path / "checkpoints" / "last.pt"
    ckpt = load_checkpoint(file, keys=RESUME_KEYS)
    kinds = {"model": dict, "optimizer": dict, "scheduler": dict, "step": int, "epoch": int,
             "batch_in_epoch": int, "epoch_sums": (list, tuple), "callbacks": dict}
    for key, kind in kinds.items():
        if key in ckpt and (not isinstance(ckpt[key], kind) or isinstance(ckpt[key], bool)):
            raise RunFolderError(file, f"{key!r} is a {type(ckpt[key]).__name__}", prefix="cannot read checkpoint")
        if kind is int and ckpt[key] < 0:
            raise RunFolderError(file, f"{key!r} is {ckpt[key]}, below 0", prefix="cannot read checkpoint")
    return ResumePoint(path, cfg, ckpt)


def resume_trainer(point: ResumePoint, callbacks=()):
    """The :class:`~gradlab.training.loop.Trainer` of ``point``, built from its config and
    loaded with its checkpoint. A checkpoint whose states do not fit what the config builds
    (another model, optimizer or schedule) is a RunFolderError naming ``last.pt``."""
    from gradlab.training.loop import Trainer

    try:
        return Trainer(point.config, resume=point.checkpoint, callbacks=callbacks)
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
        # Only a failure while the checkpoint's states are loaded (Trainer._load_state and what it
        # calls) is the checkpoint's fault; any other error is not, and keeps its traceback.
        if not _raised_in(e, "_load_state", "gradlab.training.loop"):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RunFolderError(point.path / "checkpoints" / "last.pt", f"it does not fit this run's config: {first}",
                             prefix="cannot read checkpoint") from None


def _raised_in(exc: BaseException, function: str, module: str) -> bool:
    tb = exc.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_name == function and tb.tb_frame.f_globals.get("__name__") == module:
            return True
        tb = tb.tb_next
    return False


def legacy_callback_states(ckpt: dict) -> dict:
    """Callback states from a checkpoint written before training callbacks existed."""
    history = ckpt.get("history", {})
    states = {"events": {"events": ckpt.get("events", [])},
              "evaluation": {"last": ckpt.get("last_epoch_metrics", {}), "steps_to_target": history.get("steps_to_95")}}
    if "lambda_max" in history:
        states["probe/hessian"] = {"last": {k: history[k] for k in ("lambda_max", "trace") if k in history}}
    return states


__all__ = ["LoadedRun", "legacy_callback_states", "RESUME_KEYS", "ResumePoint", "check_code_trust", "load_run", "load_weights",
           "open_resume", "resume_trainer"]
