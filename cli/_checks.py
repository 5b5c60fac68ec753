"""What each run-making command checks before it starts, callable without running it.

``gradlab run FILE`` checks every stage and every combination of an experiment file before the
first run starts. Each check below goes through the same resolution as the command itself
(``resolve_config`` with the command's own declarations and plug-in slots, then the command's
checks that need more than one value), so a mistake reads the same in a sweep as on the command
line. A check returns the configuration the command would record in ``config.yaml`` (as far as
it is known before the run: a value the command decides later stays ``None``), which
``gradlab run --resume`` compares with the runs already made.

Names and numbers are checked first, from the plug-ins' torch-free declarations (the manifest);
:func:`deep_check` then does what needs the plug-ins themselves (e.g. whether ``adv`` names an
attack that can train).
"""

from __future__ import annotations

import difflib
from typing import Callable

from gradlab.core.errors import GradlabError

#: A stage's ``run: "@previous"`` while its sources are not made yet: checked as a run reference.
PLACEHOLDER_RUN = "@previous"


def _no_args(command: str, args: list) -> None:
    if args:
        raise GradlabError(f"{command} takes no positional arguments (args: {args})")


# Each entry prepares a command's check once (its declarations and plug-in slots, read from the
# manifest) and returns ``check(args, cfg) -> resolved config``, called for every combination.
def _train() -> Callable[[list, dict], dict]:
    from gradlab.core.config import resolve_config
    from gradlab.training.options import TRAIN_OPTIONS
    from gradlab_cli._common import run_options
    from gradlab_cli.train import train_slots

    own, slots = run_options() + TRAIN_OPTIONS, train_slots()

    def check(args: list, cfg: dict) -> dict:
        _no_args("train", args)
        return resolve_config(own, slots, [("", cfg)], command="train")

    return check


def _attack() -> Callable[[list, dict], dict]:
    from gradlab_cli.attack import resolve_attack

    def check(args: list, cfg: dict) -> dict:
        if len(args) != 1 and not (not args and cfg.get("attack")):  # or `sweep: {attack: [...]}`
            raise GradlabError(f"attack takes one positional argument, the attack's name (args: {args})")
        cfg = dict(cfg)
        eps = cfg.pop("eps", None)  # a sweep of budgets, not a declared option
        resolved, eps_list = resolve_attack(args[0] if args else cfg["attack"], [("", cfg)], eps)
        return {**resolved, "eps": eps_list}

    return check


def _optimize() -> Callable[[list, dict], dict]:
    from gradlab.core.config import resolve_config
    from gradlab_cli._common import run_options
    from gradlab_cli.optimize import _options, check_optimize

    own = run_options() + _options()

    def check(args: list, cfg: dict) -> dict:
        _no_args("optimize", args)
        resolved = resolve_config(own, [], [("", cfg)], command="optimize")
        check_optimize(resolved)
        return resolved

    return check


def _simplex() -> Callable[[list, dict], dict]:
    from gradlab.core.config import resolve_config
    from gradlab_cli._common import run_options
    from gradlab_cli.simplex import _options

    own = run_options() + _options()

    def check(args: list, cfg: dict) -> dict:
        _no_args("simplex", args)
        cfg = dict(cfg)
        run = cfg.pop("run", None)  # the --run flag: not a key of simplex's config file
        return {"run": run, **resolve_config(own, [], [("", cfg)], command="simplex")}

    return check


def _connect() -> Callable[[list, dict], dict]:
    from gradlab.core.config import resolve_config
    from gradlab_cli._common import run_options
    from gradlab_cli.connect import _options

    own = run_options() + _options()

    def check(args: list, cfg: dict) -> dict:
        if len(args) != 2:
            raise GradlabError(f"connect takes two positional arguments, RUN_A and RUN_B (args: {args})")
        return resolve_config(own, [], [("", cfg)], command="connect")

    return check


def _probe(name: str) -> Callable[[list, dict], dict]:
    from gradlab.core.config import resolve_config
    from gradlab.probes.runner import probe_options
    from gradlab_cli.probe import _name_option

    own = probe_options(name) + _name_option()

    def check(args: list, cfg: dict) -> dict:
        _no_args(f"probe {name}", args)
        return resolve_config(own, [], [("", cfg)], command=f"probe {name}")

    return check


CHECKS: dict[str, Callable[[], Callable[[list, dict], dict]]] = {
    "train": _train, "attack": _attack, "optimize": _optimize, "simplex": _simplex, "connect": _connect,
}


def checker(command: list[str]) -> Callable[[list, dict], dict]:
    """The check of a stage's command (``["train"]``, ``["probe", "hessian"]``), prepared:
    ``check(args, cfg) -> resolved config``; an unknown or non-run-making command raises one line
    with the choices."""
    if command and command[0] == "probe" and len(command) == 2:
        from gradlab.probes import PROBES

        PROBES.entry(command[1])  # unknown probe: the choices and a "did you mean"
        return _probe(command[1])
    if len(command) == 1 and command[0] in CHECKS:
        return CHECKS[command[0]]()
    choices = [*CHECKS, "probe-NAME"]
    said = " ".join(command)
    close = difflib.get_close_matches(said, list(CHECKS), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise GradlabError(f"unknown command {said!r}: a stage runs one of: {', '.join(choices)}{hint}")


def deep_check(command: list[str], resolved: dict) -> dict:
    """The checks of a command that need its plug-ins (torch): a train config's trainable
    attack and probe spec, every command's run name. Returns the config the run records."""
    from gradlab.runs.folder import validate_run_name

    validate_run_name(resolved.get("name"))
    if command == ["train"]:
        from gradlab.training.options import validate_train_config

        return validate_train_config(dict(resolved))
    return resolved


__all__ = ["CHECKS", "PLACEHOLDER_RUN", "checker", "deep_check"]
