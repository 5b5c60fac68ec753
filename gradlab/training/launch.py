"""Where the runs of ``gradlab run`` execute: child processes on this machine, or a job array on
a cluster through submitit.

* ``--jobs N`` (this machine): N combinations at once, each ``python -m gradlab ...`` in a
  process of its own. :func:`job_environment` splits the CPU threads between them (each gets
  ``cpus // N`` intra-op threads through ``OMP_NUM_THREADS``/``MKL_NUM_THREADS``, unless the
  user set those) and gives each its own GPU through ``CUDA_VISIBLE_DEVICES`` when there are
  several.
* ``--launcher slurm`` (or ``submitit-local``, submitit's local executor: the same code path on
  one machine, which is how it is tested): the combinations of a stage go out as one submitit
  job array; each job runs :func:`run_gradlab`, which runs the same command line as a local run
  and records its state next to submitit's own files, so ``gradlab runs`` can show queued,
  running and ended jobs of a detached sweep (:func:`sweep_jobs`).

The scheduling itself is submitit's and Slurm's; nothing here queues work of its own.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

from gradlab.core.errors import GradlabError
from gradlab.core.options import Option, Options

LAUNCHERS = ("local", "submitit-local", "slurm")
#: The folder of a runs folder that holds the records of submitted sweeps.
SWEEPS_DIR = ".sweeps"

#: What a cluster job asks for; flags of ``gradlab run`` or a ``launcher:`` mapping in the file.
LAUNCHER_OPTIONS = Options(
    Option("launcher", str, "local", "where the runs execute: local (child processes here, --jobs at once), "
           "slurm (a submitit job array), submitit-local (submitit's local executor)", choices=LAUNCHERS),
    Option("partition", str, None, "Slurm partition"),
    Option("time", int, 60, "time limit per job, minutes", low=1),
    Option("gpus_per_job", int, 0, "GPUs per job", low=0, label="gpus-per-job"),
    Option("cpus_per_job", int, 1, "CPUs per job", low=1, label="cpus-per-job"),
    Option("mem_gb", float, None, "memory per job, GB (default: the cluster's)", low=0, low_open=True, label="mem-gb"),
    Option("array_parallelism", int, 256, "at most this many jobs of the array run at once", low=1,
           label="array-parallelism"),
)


def job_environment(slot: int, jobs: int, base: Optional[dict] = None, *, cpus: Optional[int] = None,
                    gpus: int = 0) -> dict:
    """The environment of the child in ``slot`` (0..jobs-1) when ``jobs`` run at once.

    >>> env = job_environment(1, 2, {}, cpus=8, gpus=4)
    >>> env["OMP_NUM_THREADS"], env["CUDA_VISIBLE_DEVICES"]
    ('4', '1')
    """
    env = dict(os.environ if base is None else base)
    if jobs <= 1:
        return env
    cpus = cpus or os.cpu_count() or 1
    threads = str(max(1, cpus // jobs))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(var, threads)  # a user's own setting wins
    if gpus > 1 and "CUDA_VISIBLE_DEVICES" not in (base if base is not None else os.environ):
        env["CUDA_VISIBLE_DEVICES"] = str(slot % gpus)
    return env


def gradlab_command(argv: list) -> list:
    """The process one combination runs: this Python's ``-m gradlab ARGV --quiet``."""
    return [sys.executable, "-m", "gradlab", *[str(a) for a in argv], "--quiet"]


def parse_child_output(code: int, out: str, err: str) -> tuple[str, Optional[str], str]:
    """``(status, run folder or None, last error line)`` of a finished child: the status is its
    run's ``summary.csv`` status where it made a run (``completed``, ``diverged``...), else
    ``completed``/``failed`` from the exit code."""
    from gradlab.training.experiment import run_status

    path = None
    for line in out.splitlines():
        if line.startswith("run: "):
            path = line[5:].strip()
    last = err.strip().splitlines()[-1] if err.strip() else ""
    status = "completed" if code == 0 else "failed"
    if path:
        status = run_status(Path(path)) or status
    return status, path, last


# -- submitit ----------------------------------------------------------------------------------
def _state_file(folder: Path, job_id: str) -> Path:
    return Path(folder) / f"{job_id}_gradlab.json"


def _write_state(folder: Path, job_id: str, doc: dict) -> None:
    path = _state_file(folder, job_id)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)


def run_gradlab(argv: list, folder: str) -> dict:
    """The body of one cluster job: run ``gradlab ARGV`` here and return ``{"status", "path",
    "error", "code"}``. Its state (running, then how it ended) goes to ``folder`` for
    :func:`sweep_jobs`."""
    job_id = os.environ.get("SUBMITIT_JOB_ID") or os.environ.get("SLURM_JOB_ID") or str(os.getpid())
    try:
        import submitit

        job_id = submitit.JobEnvironment().job_id
    except (ImportError, RuntimeError):  # run outside a submitit job (tests of this function)
        pass
    started = _dt.datetime.now().isoformat(timespec="seconds")
    _write_state(Path(folder), job_id, {"state": "running", "started": started, "argv": argv})
    proc = subprocess.run(gradlab_command(argv), capture_output=True, text=True)
    status, path, err = parse_child_output(proc.returncode, proc.stdout, proc.stderr)
    result = {"status": status, "path": path, "error": err, "code": proc.returncode}
    _write_state(Path(folder), job_id, {"state": status, "started": started, "argv": argv, "path": path,
                                        "ended": _dt.datetime.now().isoformat(timespec="seconds")})
    return result


def make_executor(folder: Path, opts: dict):
    """A submitit executor for ``opts`` (:data:`LAUNCHER_OPTIONS`, resolved): Slurm's, or the
    local one (``submitit-local``)."""
    try:
        import submitit
    except ImportError:
        raise GradlabError("--launcher slurm needs submitit: pip install 'gradlab[cluster]'") from None
    cluster = "slurm" if opts["launcher"] == "slurm" else "local"
    try:
        executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    except RuntimeError as e:  # submitit's "Could not detect srun": not a Slurm machine
        raise GradlabError(f"--launcher {opts['launcher']}: {e}") from None
    params: dict[str, Any] = {"timeout_min": opts["time"], "cpus_per_task": opts["cpus_per_job"],
                              "gpus_per_node": opts["gpus_per_job"], "name": "gradlab",
                              "slurm_array_parallelism": opts["array_parallelism"]}
    if opts.get("mem_gb") is not None:
        params["mem_gb"] = opts["mem_gb"]
    if opts.get("partition"):
        params["slurm_partition"] = opts["partition"]
    executor.update_parameters(**params)
    return executor


def new_sweep_folder(runs_dir: Path, file: Path) -> Path:
    """``RUNS/.sweeps/<time>-<file stem>``: submitit's logs and pickles, and the sweep record."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(runs_dir) / SWEEPS_DIR / f"{stamp}-{Path(file).stem}"
    path, i = base, 1
    while path.exists():
        i += 1
        path = base.with_name(f"{base.name}-{i}")
    path.mkdir(parents=True)
    return path


def write_sweep_record(folder: Path, file: Path, launcher: str, jobs: list) -> None:
    """``sweep.json``: the experiment file, the launcher and ``[{"job_id", "what"}]``."""
    doc = {"file": str(file), "launcher": launcher, "submitted": _dt.datetime.now().isoformat(timespec="seconds"),
           "jobs": jobs}
    (Path(folder) / "sweep.json").write_text(json.dumps(doc, indent=1))


def sweep_jobs(runs_dir: Path) -> list[dict]:
    """Every job of the sweeps submitted into ``runs_dir``: ``{"sweep", "job_id", "what",
    "state", "path"}``, ``state`` one of queued, running, or the run's status. A Slurm job's
    queue state comes from Slurm (through submitit) when this machine can ask it."""
    rows = []
    for record in sorted((Path(runs_dir) / SWEEPS_DIR).glob("*/sweep.json")):
        try:
            doc = json.loads(record.read_text())
        except (OSError, ValueError):
            continue
        for job in doc.get("jobs", []):
            state_doc = {}
            try:
                state_doc = json.loads(_state_file(record.parent, str(job["job_id"])).read_text())
            except (OSError, ValueError):
                pass
            state = state_doc.get("state") or _cluster_state(doc.get("launcher"), record.parent, str(job["job_id"]))
            rows.append({"sweep": record.parent.name, "job_id": str(job["job_id"]), "what": job.get("what", ""),
                         "state": state, "path": state_doc.get("path") or ""})
    return rows


def _cluster_state(launcher: Optional[str], folder: Path, job_id: str) -> str:
    """``queued`` for a job that has not started, or Slurm's word for it (e.g. ``cancelled``)."""
    if launcher == "slurm":
        try:
            import submitit

            state = submitit.SlurmJob(folder=str(folder), job_id=job_id).state
        except Exception:  # no sacct on this machine, or submitit missing: the record decides
            return "queued"
        return {"PENDING": "queued", "RUNNING": "running", "UNKNOWN": "queued"}.get(state, state.lower())
    return "queued"


__all__ = ["LAUNCHERS", "LAUNCHER_OPTIONS", "SWEEPS_DIR", "gradlab_command", "job_environment", "make_executor",
           "new_sweep_folder", "parse_child_output", "run_gradlab", "sweep_jobs", "write_sweep_record"]
