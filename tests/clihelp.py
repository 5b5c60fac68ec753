"""Helpers for driving the real CLI in tests: in-process (fast) or as a subprocess."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def run_path(self) -> Path:
        """The folder named by the last stdout line, ``run: <path>``."""
        last = self.out.strip().splitlines()[-1]
        assert last.startswith("run: "), f"last stdout line is not the run path: {last!r}"
        return Path(last[5:])


def cli(capsys, *args) -> Result:
    """Run ``gradlab ARGS`` in this process through the console entry point's ``main``."""
    from gradlab_cli.main import main

    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = capsys.readouterr()
    return Result(code, out, err)


def gradlab_exe() -> list[str]:
    """The installed console script next to this interpreter."""
    exe = Path(sys.executable).with_name("gradlab")
    assert exe.exists(), f"console script not installed at {exe}: run `make install`"
    return [str(exe)]


def run_proc(args, cwd=None, env=None, timeout=300) -> Result:
    e = {**os.environ, **(env or {})}
    p = subprocess.run([str(a) for a in args], cwd=cwd, env=e, capture_output=True, text=True, timeout=timeout)
    return Result(p.returncode, p.stdout, p.stderr)


def train_in_process(*args) -> Path:
    """``gradlab train ARGS`` in this process (outside a test's capsys); the run folder."""
    from gradlab_cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(["train", "--quiet", *[str(a) for a in args]])
        except SystemExit as e:
            assert e.code in (0, None), err.getvalue()
    return Path(out.getvalue().strip().splitlines()[-1].removeprefix("run: "))


def two_rank_results(script: Path, out: Path, timeout: int = 300) -> list:
    """Run ``script OUT`` under torchrun with 2 gloo processes (one thread each, tests/ on the
    path) and load what each rank saved as ``OUT/rank{r}.pt``."""
    return rank_results(script, out, 2, timeout)


def rank_results(script: Path, out: Path, nproc: int, timeout: int = 300) -> list:
    """:func:`two_rank_results` with ``nproc`` gloo processes (more ranks than this machine's
    cores is fine: each runs one thread)."""
    import torch

    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(script.parent), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           str(script), str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(nproc)]


def fp16_autocast_on_cpu() -> bool:
    """Whether this torch build runs fp16 autocast on CPU (the fp16 loss-scaling tests need it)."""
    import torch
    from torch import nn

    try:
        with torch.autocast("cpu", dtype=torch.float16):
            return nn.Linear(2, 2)(torch.ones(1, 2)).dtype == torch.float16
    except RuntimeError:
        return False
