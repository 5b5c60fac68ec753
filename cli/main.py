"""The ``gradlab`` command: one line per command in :data:`COMMANDS`.

Only the module of the command being run is imported, so ``gradlab --help`` does not pay for
torch; a command's own ``--help`` does, since its flags come from the plug-ins' declarations.
"""

from __future__ import annotations

import importlib
import sys

import typer

try:  # typer >= 0.2x vendors click; older releases raise click's own exceptions
    from typer import TyperException as _CliError
except ImportError:  # pragma: no cover
    from click.exceptions import ClickException as _CliError

APP_HELP = ("See why neural-network training works or fails: train, probe gradients and curvature, "
            "attack, and compare runs. Every command writes a run folder (TensorBoard + CSV).")

# name -> (module of gradlab_cli holding `command` or a Typer sub-app `app`, one-line help). A
# command's flags are made from the plug-ins' option declarations, which import torch, so only the
# command being run is imported; the others are listed by these lines (a test checks that each
# is the first line of the command's own help).
COMMANDS = {
    "train": ("train", "Train a model; log per-step loss, learning rate and gradient norm, per-epoch accuracy."),
    "runs": ("runs", "List runs: id, command, model, dataset, optimizer, status and key final metrics."),
    "list": ("listing", "List models, datasets, optimizers, probes or attacks with a one-line description and options."),
    "run": ("experiment", "Run each combination of an experiment file as its own run; report failures at the end."),
    "tensorboard": ("tb", "Start TensorBoard on the runs folder (Ctrl-C stops it)."),
    "attack": ("attack", "Attack the model of a trained run (eval mode) at one or more eps; writes attack.csv, plots, TensorBoard."),
    "optimize": ("optimize", "Run optimizers from one start point on a 2-D test function: trajectories.csv, a contour plot of all"),
    "simplex": ("simplex", "Train a simplex of K vertices whose whole interior has low loss, starting from a trained run:"),
    "connect": ("connect", "Train a Bezier or polychain curve between two runs' weights and compare its loss and accuracy with the"),
    "probe": ("probe", "Probe a trained run or a fresh model: gradients, Jacobian spectra, Hessian, landscape."),
}

_SETTINGS = {"help_option_names": ["-h", "--help"]}


def _placeholder() -> None:  # pragma: no cover - listed in --help, never dispatched
    raise RuntimeError("placeholder command invoked")


def make_app(argv: list) -> typer.Typer:
    """The ``gradlab`` app, with the command named in ``argv`` built for real and every other
    command present only by name and help line (so ``gradlab --help`` does not import torch)."""
    wanted = next((a for a in argv if not a.startswith("-")), None)
    app = typer.Typer(name="gradlab", help=APP_HELP, no_args_is_help=True, add_completion=False,
                      pretty_exceptions_enable=False, context_settings=_SETTINGS)
    for name, (module, help_line) in COMMANDS.items():
        if name != wanted:
            if name == "probe":
                app.add_typer(typer.Typer(help=help_line), name=name)
            else:
                app.command(name, help=help_line)(_placeholder)
            continue
        if name == "attack" and argv[argv.index(name) + 1:argv.index(name) + 2] == ["check"]:
            module = "attack_check"  # `gradlab attack check RUN`: the gradient-masking checklist
        mod = importlib.import_module(f"gradlab_cli.{module}")
        if hasattr(mod, "app"):  # a command group, e.g. `gradlab probe NAME`
            app.add_typer(mod.app, name=name, help=help_line)
        else:
            app.command(name)(mod.command)
    return app


def _one_line(msg: str) -> str:
    return " ".join(str(msg).split())


def main(argv: list | None = None) -> None:
    """Console entry point: user mistakes become one line on stderr and exit code 2; Ctrl-C and
    SIGTERM one line and 128 + the signal (:func:`_stopped`)."""
    from gradlab.core.errors import GradlabError
    from gradlab.runs.signals import Interrupted, StopOnSignals

    try:
        argv = sys.argv[1:] if argv is None else argv
        with StopOnSignals() as stop:
            rv = make_app(argv)(args=argv, standalone_mode=False, prog_name="gradlab")
        if stop.raised is not None and rv == 130:  # typer made the Interrupted this exit code; a
            _stopped(stop.raised)  # command that caught it (tensorboard's Ctrl-C) says how it ended
    except Interrupted as e:  # raised outside typer's own call (while the app was being made)
        _stopped(e)
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


def _stopped(exc) -> None:
    """Say which signal stopped the command and which run folder it marked ``interrupted``
    (rank 0's under torchrun; another rank names itself), then exit with 128 + the signal, as a
    shell reports a process killed by it. The folder keeps what the command had written."""
    import os

    from gradlab.runs.signals import signal_name

    by = signal_name(exc.signum)
    if exc.runs:
        for path in exc.runs:
            print(f"gradlab: interrupted by {by}: run {path} marked interrupted (what it wrote so far is kept)",
                  file=sys.stderr, flush=True)
        print(f"run: {exc.runs[-1]}", flush=True)
    else:
        rank = os.environ.get("RANK", "0") if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 else "0"
        print(f"gradlab: {'rank ' + rank + ': ' if rank != '0' else ''}interrupted by {by}", file=sys.stderr,
              flush=True)
    sys.exit(128 + exc.signum)


if __name__ == "__main__":
    main()
