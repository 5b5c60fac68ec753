"""Helper process for tests/test_faults_*.py: ``python faults_train.py PAUSE [KILL_RANK:STEP] --
TRAIN ARGS`` runs ``gradlab train ARGS`` with torch on one thread (the arithmetic of the
in-process runs, as tests/conftest.py) and a pause of PAUSE seconds after each logged step, so
that a test can signal or kill it at a known point of training (a step is a few milliseconds). With ``KILL_RANK:STEP`` (under
torchrun) the process of that rank SIGKILLs itself in step STEP: a rank that dies.

Arguments, not environment variables, say what to do: a test's environment reaches nothing else.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import torch

from gradlab.training.loop import Trainer
from gradlab_cli.main import main

torch.set_num_threads(1)


def _install(pause: float, kill_rank: int, kill_step: int) -> None:
    train_step = Trainer.train_step
    rank = int(os.environ.get("RANK", "0"))

    def step_and_pause(self, *args):
        if rank == kill_rank and self.step + 1 >= kill_step:
            print(f"killed at {time.time():.3f}", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        out = train_step(self, *args)
        time.sleep(pause)
        return out

    Trainer.train_step = step_and_pause


if __name__ == "__main__":
    sep = sys.argv.index("--")
    opts = sys.argv[1:sep]
    kill = opts[1].split(":") if len(opts) > 1 else ("-1", "0")
    _install(float(opts[0]), int(kill[0]), int(kill[1]))
    main(["train", *sys.argv[sep + 1:]])
