"""Issue 18, sweeps: `gradlab run --jobs N` on this machine, and job arrays through submitit
(its local executor; Slurm through a stand-in `sbatch` that records the script it is given)."""

from __future__ import annotations

import json
import os
import stat
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from clihelp import cli

pytest.importorskip("submitit")


def _write(path: Path, doc: dict) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _optimize_sweep(tmp_path: Path, fns=("saddle", "quadratic"), **extra) -> Path:
    return _write(tmp_path / "opt.yaml", {"command": "optimize", "steps": 3, "opt": "sgd",
                                          "runs_dir": str(tmp_path / "runs"), **extra, "sweep": {"fn": list(fns)}})


# -- --jobs N --------------------------------------------------------------------------------------
def test_job_environment_splits_threads_and_gives_each_job_its_gpu():
    from gradlab.training.launch import job_environment

    env = job_environment(2, 3, {"PATH": "/bin"}, cpus=8, gpus=2)
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "2"
    assert env["CUDA_VISIBLE_DEVICES"] == "0" and env["PATH"] == "/bin"
    assert "CUDA_VISIBLE_DEVICES" not in job_environment(1, 3, {}, cpus=8, gpus=1)  # one GPU: shared
    mine = job_environment(0, 4, {"OMP_NUM_THREADS": "3", "CUDA_VISIBLE_DEVICES": "5"}, cpus=2, gpus=4)
    assert mine["OMP_NUM_THREADS"] == "3" and mine["MKL_NUM_THREADS"] == "1"  # the user's own wins
    assert mine["CUDA_VISIBLE_DEVICES"] == "5"
    assert job_environment(0, 1, {"A": "1"}) == {"A": "1"}  # one job: the environment as it is


def test_jobs_runs_that_many_children_at_once(tmp_path, capsys, monkeypatch):
    """Each child waits at a barrier for a second one: run one at a time, the barrier breaks."""
    from gradlab_cli._child import Children

    barrier = threading.Barrier(2, timeout=60)
    seen = []

    def fake_run(self, argv, env=None):
        seen.append((argv, env))
        barrier.wait()
        return 0, "", ""

    monkeypatch.setattr(Children, "run", fake_run)
    r = cli(capsys, "run", _optimize_sweep(tmp_path, ("saddle", "quadratic", "rosenbrock", "beale")), "--jobs", "2")
    assert r.code == 0, r.err
    assert len(seen) == 4 and not barrier.broken
    threads = str(max(1, (os.cpu_count() or 1) // 2))
    assert all(env["OMP_NUM_THREADS"] == os.environ.get("OMP_NUM_THREADS", threads) for _, env in seen)
    rows = [line for line in r.out.splitlines() if "optimize" in line and "completed" in line]
    assert [int(line.split()[1]) for line in rows] == [1, 2, 3, 4]  # the table in run order


def test_jobs_two_real_runs_complete_in_one_runs_folder(tmp_path, capsys):
    r = cli(capsys, "run", _optimize_sweep(tmp_path), "--jobs", "2")
    assert r.code == 0, r.err
    folders = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert len(folders) == 2 and any("saddle" in f for f in folders) and any("quadratic" in f for f in folders)
    for p in (tmp_path / "runs").iterdir():
        assert pd.read_csv(p / "summary.csv").loc[0, "status"] == "completed"


def test_jobs_with_fail_fast_starts_nothing_after_a_failure(tmp_path, capsys, monkeypatch):
    from gradlab_cli._child import Children

    calls = []

    def fail(self, argv, env=None):
        calls.append(argv)
        return 2, "", "gradlab: boom"

    monkeypatch.setattr(Children, "run", fail)
    f = _optimize_sweep(tmp_path, ("saddle", "quadratic", "rosenbrock", "beale", "himmelblau", "rastrigin"))
    r = cli(capsys, "run", f, "--jobs", "2", "--fail-fast")
    assert r.code == 1 and "boom" in r.err and "--fail-fast" in r.err
    assert len(calls) <= 2  # the ones running finish; no new one starts after the first failure


# -- submitit ------------------------------------------------------------------------------------------
def test_submitit_local_runs_the_array_and_gathers_the_runs(tmp_path, capsys):
    from gradlab.training.launch import sweep_jobs

    r = cli(capsys, "run", _optimize_sweep(tmp_path), "--launcher", "submitit-local")
    assert r.code == 0, r.err
    runs = tmp_path / "runs"
    made = [p for p in runs.iterdir() if not p.name.startswith(".")]
    assert len(made) == 2 and all(pd.read_csv(p / "summary.csv").loc[0, "status"] == "completed" for p in made)
    assert r.out.count("completed") >= 2
    jobs = sweep_jobs(runs)
    assert [j["state"] for j in jobs] == ["completed", "completed"]
    assert {Path(j["path"]).name for j in jobs} == {p.name for p in made}
    r = cli(capsys, "runs", "--runs-dir", runs)
    assert r.code == 0 and "sweep jobs" not in r.out  # nothing waits


def test_a_detached_sweep_is_listed_until_its_jobs_end(tmp_path, capsys):
    from gradlab.training.launch import sweep_jobs

    f = _optimize_sweep(tmp_path, launcher={"launcher": "submitit-local", "time": 5})
    r = cli(capsys, "run", f, "--detach")
    assert r.code == 0, r.err
    assert "submitted 2 jobs (submitit-local)" in r.out and "gradlab runs" in r.out
    runs = tmp_path / "runs"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and any(j["state"] in ("queued", "running") for j in sweep_jobs(runs)):
        time.sleep(0.5)
    assert [j["state"] for j in sweep_jobs(runs)] == ["completed", "completed"]


def test_sweep_job_states_come_from_the_jobs_records(tmp_path):
    from gradlab.training.launch import sweep_jobs, write_sweep_record

    folder = tmp_path / "runs" / ".sweeps" / "s1"
    folder.mkdir(parents=True)
    write_sweep_record(folder, Path("e.yaml"), "submitit-local",
                       [{"job_id": "1", "what": "a"}, {"job_id": "2", "what": "b"}, {"job_id": "3", "what": "c"}])
    (folder / "2_gradlab.json").write_text(json.dumps({"state": "running"}))
    (folder / "3_gradlab.json").write_text(json.dumps({"state": "diverged", "path": "/x/run"}))
    states = [(j["what"], j["state"], j["path"]) for j in sweep_jobs(tmp_path / "runs")]
    assert states == [("a", "queued", ""), ("b", "running", ""), ("c", "diverged", "/x/run")]


def _fake_slurm(bin_dir: Path) -> Path:
    """`srun` and `sbatch` stand-ins: sbatch keeps the script it is given and answers as Slurm."""
    bin_dir.mkdir()
    record = bin_dir / "scripts"
    record.mkdir()
    sbatch = bin_dir / "sbatch"
    sbatch.write_text(f"#!/bin/sh\ncp \"$1\" {record}/$(date +%s%N).sh\necho 'Submitted batch job 4242'\n")
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    for p in (sbatch, bin_dir / "srun"):
        p.chmod(p.stat().st_mode | stat.S_IEXEC)
    return record


def test_slurm_gets_one_job_array_with_the_resources_asked(tmp_path, capsys, monkeypatch):
    scripts = _fake_slurm(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    f = _optimize_sweep(tmp_path, ("saddle", "quadratic", "rosenbrock"),
                        launcher={"launcher": "slurm", "partition": "gpu", "time": 30})
    r = cli(capsys, "run", f, "--detach", "--gpus-per-job", "1", "--cpus-per-job", "4", "--array-parallelism", "2")
    assert r.code == 0, r.err
    (script,) = list(scripts.iterdir())  # one submission: an array, not three jobs
    text = script.read_text()
    for want in ("--partition=gpu", "--time=30", "--gpus-per-node=1", "--cpus-per-task=4", "--array=0-2%2"):
        assert want in text, text
    r = cli(capsys, "runs", "--runs-dir", tmp_path / "runs")
    assert r.code == 0 and "sweep jobs not ended" in r.out and r.out.count("queued") == 3


# -- mistakes ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, doc, words", [
    (["--detach"], {}, "--detach needs a cluster launcher"),
    (["--launcher", "submitit-local", "--jobs", "2"], {}, "--jobs is for --launcher local"),
    ([], {"launcher": {"launcher": "pbs"}}, "invalid launcher: 'pbs'"),
    ([], {"launcher": {"partitio": "gpu"}}, "did you mean 'partition'"),
    (["--launcher", "slurm"], {}, "--launcher slurm: "),  # no srun on this machine
])
def test_launcher_mistakes_are_one_line_and_leave_nothing(tmp_path, capsys, monkeypatch, args, doc, words):
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # no Slurm, whatever this machine has
    f = _optimize_sweep(tmp_path, **doc)
    r = cli(capsys, "run", f, *args)
    assert r.code == 2, (r.out, r.err)
    assert words in r.err and len(r.err.strip().splitlines()) == 1, r.err
    assert not (tmp_path / "runs").exists()
