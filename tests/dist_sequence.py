"""Helper process for tests/test_dist_commands.py: ``python dist_sequence.py OUT CMDS.json``
(under torchrun) runs each ``gradlab ARGS`` of the JSON list ``CMDS.json`` in turn, in this one
process per rank: starting torch and gradlab once costs more than the tiny commands themselves,
and the tests used to pay it twice per command (one torchrun each).

The commands share one process group: each joins it as a fresh ``torchrun -m gradlab -- ARGS``
would (``init_from_env``) and finds it joined; leaving it (``shutdown``) waits for the last
command (a second gloo group joined in the same process can hang). Each command's stdout (file
descriptor 1, so nothing printed any other way is missed) goes to ``OUT/I/stdout.RANK`` and its
exit code to ``OUT/I/code.RANK``; its stderr stays on this process's. A command that fails does
not stop the next.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from gradlab.core import distributed
from gradlab_cli.main import main

torch.set_num_threads(1)  # as tests/conftest.py: the same arithmetic as the in-process runs


def run_one(argv: list, folder: Path, rank: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    saved = os.dup(1)
    with open(folder / f"stdout.{rank}", "w") as out:
        os.dup2(out.fileno(), 1)
        try:
            main([str(a) for a in argv])
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
    (folder / f"code.{rank}").write_text(str(code))


if __name__ == "__main__":
    out, cmds = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
    rank = int(os.environ.get("RANK", "0"))
    leave, distributed.shutdown = distributed.shutdown, lambda info: None
    for i, argv in enumerate(cmds):
        run_one(argv, out / str(i), rank)
    leave(distributed.current())
