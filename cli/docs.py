"""``python -m gradlab_cli.docs``: docs/OPTIONS.md, every option of every command and plug-in,
made from the declarations (``make docs`` writes it; a test checks that it is current)."""

from __future__ import annotations

import sys

HEADER = """# Options reference

Made by `make docs` (`python -m gradlab_cli.docs > docs/OPTIONS.md`) from the option
declarations themselves: every flag below is also a `--config` YAML key and a `--set key=value`
(the key spelled with `_`, the flag with `-`), checked by the same rules. `gradlab list KIND
NAME` shows the same for one entry in the terminal. Do not edit by hand.

"""


def reference() -> str:
    from gradlab.core.manifest import real_registry
    from gradlab.landscape.connect import CONNECT_OPTIONS
    from gradlab.landscape.simplex import SIMPLEX_OPTIONS
    from gradlab.landscape.trajectories import OPTIMIZE_OPTIONS
    from gradlab.training.options import TRAIN_OPTIONS
    from gradlab_cli._common import run_options
    from gradlab_cli.listing import markdown_reference, options_markdown

    parts = [HEADER, "## Every run-making command\n\n", options_markdown(run_options()), "\n"]
    for title, options in (("gradlab train", TRAIN_OPTIONS), ("gradlab simplex", SIMPLEX_OPTIONS),
                           ("gradlab connect", CONNECT_OPTIONS), ("gradlab optimize", OPTIMIZE_OPTIONS)):
        parts += [f"## `{title}`\n\n", options_markdown(options), "\n"]
    parts.append("`gradlab train` also takes the options of the model, dataset and optimizer it chooses, "
                 "and `gradlab attack NAME` / `gradlab probe NAME` those of the attack or probe:\n\n")
    for kind in ("models", "datasets", "optimizers", "attacks", "probes"):
        parts.append(markdown_reference(kind, list(real_registry(kind))))
    return "".join(parts)


if __name__ == "__main__":
    sys.stdout.write(reference())
