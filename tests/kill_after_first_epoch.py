"""Helper process for test_resume_every_optimizer: ``python kill_after_first_epoch.py RUNS_DIR
OPT [OPT ...] -- TRAIN ARGS``.

Trains one run per optimizer (under ``RUNS_DIR/OPT``), one after the other, each in its own
thread; a run stops at the first metrics it logs in its second epoch, once its first epoch's
``checkpoints/last.pt`` is on disk, and waits there. When every run is waiting, the process
SIGKILLs itself: each run folder is then what a kill in the middle of its second epoch leaves
(metrics rows past the checkpoint, no summary.csv). One process for all optimizers, since
importing torch and building an optimizer once costs more than the tiny runs themselves.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

import torch

from gradlab.runs import RunDir
from gradlab_cli.main import main

torch.set_num_threads(1)  # as tests/conftest.py: the same arithmetic as the in-process runs

reached = threading.Event()
_log_metrics = RunDir.log_metrics


def _log_and_stop_in_second_epoch(self, step, epoch, split, metrics):
    _log_metrics(self, step, epoch, split, metrics)
    if epoch is not None and epoch >= 1:
        self.wait_checkpoints()  # the first epoch's checkpoint is in place
        reached.set()
        threading.Event().wait()  # this run goes no further: the kill finds it here


def _train(args: list) -> None:
    """A run that returns never reached its second epoch: say so and end the process."""
    try:
        main(args)
        code = 0
    except SystemExit as e:
        code = e.code
    print(f"gradlab {' '.join(args)}: ended (exit {code}) before its second epoch", file=sys.stderr, flush=True)
    os._exit(3)


def run_all(runs_dir: str, opts: list, train_args: list) -> None:
    RunDir.log_metrics = _log_and_stop_in_second_epoch
    for opt in opts:
        reached.clear()
        args = ["train", "--runs-dir", os.path.join(runs_dir, opt), "--opt", opt, "--quiet", *train_args]
        threading.Thread(target=_train, args=(args,), daemon=True).start()
        if not reached.wait(300):
            print(f"{opt}: no metrics from its second epoch", file=sys.stderr, flush=True)
            os._exit(3)
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    sep = sys.argv.index("--")
    run_all(sys.argv[1], sys.argv[2:sep], sys.argv[sep + 1:])
