"""Every command family under torchrun (2 gloo processes) against one process: one run folder,
written by rank 0, with the one-process numbers within float tolerance; and a rank that dies in
a non-train command ends the other with one line naming it.

The commands compared with one process run under ONE torchrun, one after the other in its two
processes (tests/dist_sequence.py), each joining and leaving the process group as in a launch of
its own: a torchrun per command cost more in starting torch than the commands themselves. The
experiment test uses the documented invocation, ``torchrun ... -m gradlab -- COMMAND ...`` (the
``--`` keeps torchrun's argparse from taking gradlab's ``--run`` for its own ``--run-path``).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from clihelp import cli, train_in_process

pytestmark = pytest.mark.slow

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
HELPER = Path(__file__).with_name("kill_rank.py")
SEQUENCE = Path(__file__).with_name("dist_sequence.py")
#: torchrun's agent checks its workers every 0.1 s and SIGTERMs the survivors of a dead one; on a
#: loaded machine that can reach rank 0 before rank 0 enters its next collective and finds rank 1
#: gone (CI saw an empty stderr once). Then torchrun's own summary names the failed rank; this
#: test is about gradlab's line, so the agent looks less often than rank 0 needs to notice.
SLOW_AGENT = ("--monitor-interval", "20")


def torchrun(*args, logs: Path, timeout: int = 300, script=("-m", "gradlab", "--"), agent=()):
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--redirects", "3",
           "--log-dir", str(logs), *agent, *script, *[str(a) for a in args]]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    runs = tmp_path_factory.mktemp("dist")
    run = train_in_process("--runs-dir", runs, "--epochs", "6", "--width", "16", "--set", "max_train=512", "--opt", "adam", "--lr", "0.01",
                           "--seed", "1", "--device", "cpu")
    return runs, run


@pytest.fixture(scope="module")
def other(tmp_path_factory):
    """A second model (another seed) for ``connect``."""
    return train_in_process("--runs-dir", tmp_path_factory.mktemp("other"), "--epochs", "2", "--width", "16", "--set",
                            "max_train=512", "--opt", "adam", "--lr", "0.01", "--seed", "2", "--device", "cpu")


def _commands(run: Path, other: Path) -> dict:
    """The commands each test runs in one process and under torchrun, by test."""
    return {
        "attack": ("attack", "pgd", "--run", run, "--eps", "0,0.05", "--steps", "3", "--n-examples", "90",
                   "--batch-size", "16", "--random-start", "--grid", "0"),
        "hessian": ("probe", "hessian", "--run", run, "--top-k", "3", "--batches", "3", "--batch-size", "40",
                    "--tol", "1e-6", "--density"),
        "landscape": ("probe", "landscape", "--run", run, "--dims", "2", "--steps", "5", "--batches", "1",
                      "--batch-size", "64"),
        "gradnorm": ("probe", "gradnorm", "--run", run, "--batches", "3", "--batch-size", "32"),
        "jacobian": ("probe", "jacobian", "--run", run, "--examples", "9"),
        "simplex": ("simplex", "--run", run, "--vertices", "2", "--epochs", "1", "--samples", "5", "--bn-batches", "1"),
        "connect": ("connect", run, other, "--epochs", "1", "--points", "5", "--bn-batches", "1", "--batch-size", "128"),
        "optimize": ("optimize", "--fn", "rosenbrock", "--opt", "sgd,adam", "--steps", "40"),
    }


@pytest.fixture(scope="module")
def under_torchrun(tmp_path_factory, trained, other):
    """Every test's command under one torchrun (2 processes), one after the other in the same
    two processes and process group (tests/dist_sequence.py); by test, ``(its arguments,
    torchrun's exit code, the logs, the folder of its stdout and exit code per rank, its runs
    folder)``. Starting torch once rather than once per command saves most of this file's time."""
    import json
    import subprocess

    base = tmp_path_factory.mktemp("two")
    commands = _commands(trained[1], other)
    argv = [[str(a) for a in (*args, "--runs-dir", base / name / "runs", "--quiet", "--device", "cpu")]
            for name, args in commands.items()]
    (base / "commands.json").write_text(json.dumps(argv))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--redirects", "3",
           "--log-dir", str(base / "logs"), str(SEQUENCE), str(base / "out"), str(base / "commands.json")]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=ENV)
    logs = p.stderr[-3000:] + "".join(f.read_text()[-3000:] for f in (base / "logs").rglob("*.log"))
    return {name: (args, p.returncode, logs, base / "out" / str(i), base / name / "runs")
            for i, (name, args) in enumerate(commands.items())}


def _both(capsys, tmp_path, under_torchrun, name: str) -> tuple[Path, Path]:
    """The run folder of test ``name``'s command in one process and of the same under torchrun."""
    args, code, logs, out, runs = under_torchrun[name]
    one = cli(capsys, *args, "--runs-dir", tmp_path / "one", "--quiet", "--device", "cpu")
    assert one.code == 0, one.err
    assert code == 0, logs
    assert [(out / f"code.{r}").read_text() for r in (0, 1)] == ["0", "0"], logs
    (two,) = [d for d in runs.iterdir() if d.is_dir()]  # one folder, not one per rank
    printed = [(out / f"stdout.{r}").read_text() for r in (0, 1)]
    assert printed[0].strip().splitlines()[-1] == f"run: {two}" and printed[1].strip() == ""  # rank 0 prints
    return one.run_path, two


def test_attack_splits_the_batches_and_matches_one_process(capsys, tmp_path, under_torchrun):
    one, two = _both(capsys, tmp_path, under_torchrun, "attack")
    a, b = (pd.read_csv(d / "attack.csv") for d in (one, two))
    pd.testing.assert_frame_equal(a, b, rtol=1e-6)  # 6 batches: 3 per rank, each from the same seed
    assert a["robust_acc"].iloc[1] < a["clean_acc"].iloc[1]  # the attack did something


def test_probe_hessian_all_reduces_the_products(capsys, tmp_path, under_torchrun):
    one, two = _both(capsys, tmp_path, under_torchrun, "hessian")
    a, b = (pd.read_csv(d / "hessian.csv") for d in (one, two))
    assert list(a["kind"]) == list(b["kind"])
    np.testing.assert_allclose(a["value"], b["value"], rtol=1e-4, atol=1e-6)
    sa, sb = (pd.read_csv(d / "summary.csv").iloc[0] for d in (one, two))
    for k in ("loss", "grad_norm", "lambda_max", "trace"):
        assert sb[k] == pytest.approx(sa[k], rel=1e-4), k


def test_probe_landscape_splits_the_grid(capsys, tmp_path, under_torchrun):
    one, two = _both(capsys, tmp_path, under_torchrun, "landscape")
    a, b = (pd.read_csv(d / "landscape.csv") for d in (one, two))
    pd.testing.assert_frame_equal(a, b, rtol=1e-6)


def test_a_dead_rank_ends_an_attack_with_one_line(tmp_path, trained):
    """Rank 1 kills itself in its second attack batch; rank 0, waiting in the sum over ranks,
    stops within seconds with one line naming rank 1, and its run is marked failed."""
    runs, run = trained
    logs = tmp_path / "logs"
    t0 = time.time()
    p = torchrun("attack", "pgd", "--run", run, "--eps", "0.05", "--steps", "3", "--n-examples", "90",
                 "--batch-size", "16", "--grid", "0", "--runs-dir", tmp_path / "runs", "--quiet", "--device", "cpu",
                 logs=logs, script=(str(HELPER), "1", "--"), agent=SLOW_AGENT)
    assert p.returncode != 0
    err = {int(f.parent.name): f.read_text() for f in logs.rglob("stderr.log")}
    lines = err[0].strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gradlab: rank 1 of 2 exited: "), err[0][-3000:]
    (folder,) = [d for d in (tmp_path / "runs").iterdir() if d.is_dir()]
    assert pd.read_csv(folder / "summary.csv").iloc[0]["status"] == "failed"
    assert time.time() - t0 < 120  # no collective timeout (30 minutes by default)


def test_probe_gradnorm_splits_the_batches(capsys, tmp_path, under_torchrun):
    one, two = _both(capsys, tmp_path, under_torchrun, "gradnorm")
    a, b = (pd.read_csv(d / "gradnorm.csv") for d in (one, two))
    pd.testing.assert_frame_equal(a, b, rtol=1e-9)  # the same batches, gathered in order


def test_probe_jacobian_splits_the_examples(capsys, tmp_path, under_torchrun):
    one, two = _both(capsys, tmp_path, under_torchrun, "jacobian")
    for name in ("jacobian.csv", "jacobian_summary.csv"):
        a, b = (pd.read_csv(d / name) for d in (one, two))
        pd.testing.assert_frame_equal(a, b, rtol=1e-6, atol=1e-9)


def test_simplex_splits_the_sample_points(capsys, tmp_path, under_torchrun):
    one, two = _both(capsys, tmp_path, under_torchrun, "simplex")
    a, b = (pd.read_csv(d / "simplex.csv") for d in (one, two))
    pd.testing.assert_frame_equal(a, b, rtol=1e-6)  # each rank trains the same vertices, then half the points


def test_connect_splits_the_curve_points(capsys, tmp_path, under_torchrun):
    one, two = _both(capsys, tmp_path, under_torchrun, "connect")
    a, b = (pd.read_csv(d / "connect.csv") for d in (one, two))
    pd.testing.assert_frame_equal(a, b, rtol=1e-6)


def test_optimize_makes_one_run_on_rank_0(capsys, tmp_path, under_torchrun):
    one, two = _both(capsys, tmp_path, under_torchrun, "optimize")
    a, b = (pd.read_csv(d / "trajectories.csv") for d in (one, two))
    pd.testing.assert_frame_equal(a, b)


def test_run_shares_the_combinations_between_the_ranks(tmp_path):
    """Rank r makes combinations r, r + 2, ... of each stage as single-process children; every
    rank then knows every run, so the second stage probes all of the first stage's models."""
    exp = tmp_path / "e.yaml"
    exp.write_text("steps:\n"
                   "  - command: train\n    model: mlp\n    width: 8\n    epochs: 1\n    max_train: 256\n"
                   "    device: cpu\n    sweep:\n      lr: [0.01, 0.05]\n"
                   "  - command: probe-gradnorm\n    run: '@previous'\n    batches: 1\n")
    p = torchrun("run", exp, "--runs-dir", tmp_path / "runs", logs=tmp_path / "logs")
    logs = "".join(f.read_text()[-2000:] for f in (tmp_path / "logs").rglob("*.log"))
    assert p.returncode == 0, p.stderr[-3000:] + logs
    out = {int(f.parent.name): f.read_text() for f in (tmp_path / "logs").rglob("stdout.log")}
    assert "rank 0 1. train" in out[0] and "rank 1 2. train" in out[1]  # each rank its share
    assert all(line.startswith("rank 1 ") for line in out[1].strip().splitlines())  # rank 0 reports
    assert "completed" in out[0]
    folders = sorted(d.name for d in (tmp_path / "runs").iterdir() if d.is_dir() and not d.name.startswith("."))
    assert sum("-train-" in f for f in folders) == 2 and sum("-probe-" in f for f in folders) == 2
    probed = {(tmp_path / "runs" / f / "config.yaml").read_text().split("run: ")[1].split()[0]
              for f in folders if "-probe-" in f}
    assert len(probed) == 2  # both models, one probe each
