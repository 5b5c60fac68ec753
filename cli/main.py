"""The ``gradlab`` command. Every command module is imported here and registered in one line.

Command modules import torch and the core only inside their functions, so ``gradlab --help``
does not pay for torch (measured in benchmarks/bench_cli.py).
"""

from __future__ import annotations

import importlib
import sys

import typer

try:  # typer >= 0.2x vendors click; older releases raise click's own exceptions
    from typer import TyperException as _CliError
except ImportError:  # pragma: no cover
    from click.exceptions import ClickException as _CliError

app = typer.Typer(
    name="gradlab",
    help="See why neural-network training works or fails: train, probe gradients and curvature, "
    "attack, and compare runs. Every command writes a run folder (TensorBoard + CSV).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
probe_app = typer.Typer(
    help="Probe a trained run or a fresh model: gradients, Jacobian spectra, Hessian, landscape.",
    no_args_is_help=True,
)
app.add_typer(probe_app, name="probe")


def _cmd(module: str, attr: str = "command"):
    """The command function ``attr`` of ``gradlab_cli.<module>`` (modules stay torch-free at import)."""
    return getattr(importlib.import_module(f"gradlab_cli.{module}"), attr)


# --- commands: one registration line each -------------------------------------------------
app.command("train")(_cmd("train"))
app.command("runs")(_cmd("runs"))
app.command("list")(_cmd("listing"))
app.command("run")(_cmd("experiment"))
app.command("tensorboard")(_cmd("tb"))
app.command("attack")(_cmd("attack"))
app.command("optimize")(_cmd("optimize"))
app.command("simplex")(_cmd("simplex"))
app.command("connect")(_cmd("connect"))
probe_app.command("gradnorm")(_cmd("probe_gradnorm"))
probe_app.command("landscape")(_cmd("probe_landscape"))
probe_app.command("jacobian")(_cmd("probe_jacobian"))
probe_app.command("hessian")(_cmd("probe_hessian"))
# --- end of commands ------------------------------------------------------------------------


def _one_line(msg: str) -> str:
    return " ".join(str(msg).split())


def main(argv: list | None = None) -> None:
    """Console entry point: user mistakes become one line on stderr and exit code 2."""
    from gradlab.core.errors import GradlabError

    try:
        rv = app(args=argv, standalone_mode=False, prog_name="gradlab")
    except GradlabError as e:
        print(f"gradlab: error: {_one_line(e)}", file=sys.stderr)
        sys.exit(2)
    except _CliError as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # `gradlab` or `gradlab probe` alone: show help
            print(e.format_message())
            sys.exit(0)
        ctx = getattr(e, "ctx", None)
        where = f"{ctx.command_path}: " if ctx is not None else ""
        print(f"gradlab: error: {where}{_one_line(e.format_message())}", file=sys.stderr)
        sys.exit(getattr(e, "exit_code", 2))
    except typer.Abort:
        print("gradlab: aborted", file=sys.stderr)
        sys.exit(130)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
