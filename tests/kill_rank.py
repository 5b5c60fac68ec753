"""Helper process for tests/test_dist_commands.py: ``python kill_rank.py RANK -- GRADLAB ARGS``
runs ``gradlab ARGS`` (under torchrun) where the process of rank RANK SIGKILLs itself when its
attack starts its second batch: a rank that dies in the middle of a non-train command."""

from __future__ import annotations

import os
import signal
import sys

import torch

from gradlab.attacks.base import Attack
from gradlab_cli.main import main

torch.set_num_threads(1)

if __name__ == "__main__":
    sep = sys.argv.index("--")
    kill_rank = int(sys.argv[1])
    calls = [0]
    call = Attack.__call__

    def call_or_die(self, x, y):
        calls[0] += 1
        if int(os.environ.get("RANK", "0")) == kill_rank and calls[0] == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return call(self, x, y)

    Attack.__call__ = call_or_die
    main(sys.argv[sep + 1:])
