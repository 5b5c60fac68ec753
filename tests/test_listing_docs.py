"""`gradlab list` agrees with the commands, and no docstring or help names a file or module that
does not exist (issue 14, everyday feedback)."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

from clihelp import cli

ROOT = Path(__file__).resolve().parents[1]
# A path into the repository as docstrings and help texts write it.
PATH_RE = re.compile(r"(?<![\w./-])((?:gradlab|cli|docs|benchmarks|tests|experiments)/[\w./-]*\w\.(?:py|md|yaml))\b")
# A Sphinx role naming a gradlab object: :mod:`gradlab.runs.records`, :func:`~gradlab.x.f`.
ROLE_RE = re.compile(r":(?:mod|func|class|meth|data|attr|exc):`~?((?:gradlab|gradlab_cli)(?:\.\w+)+)`")


def missing_references(text: str) -> list[str]:
    """The repository paths and ``gradlab``/``gradlab_cli`` objects that ``text`` names and that
    do not exist (``gradlab_cli`` is the installed name of ``cli/``)."""
    bad = [p for p in PATH_RE.findall(text) if not (ROOT / p).exists()]
    for name in ROLE_RE.findall(text):
        parts = name.split(".")
        for i in range(len(parts), 0, -1):  # the longest importable prefix, then attributes
            try:
                obj = importlib.import_module(".".join(parts[:i]))
            except ImportError:
                continue
            for attr in parts[i:]:
                if not hasattr(obj, attr):
                    bad.append(name)
                    break
                obj = getattr(obj, attr)
            break
        else:
            bad.append(name)
    return bad


def _sources():
    return sorted((ROOT / "gradlab").rglob("*.py")) + sorted((ROOT / "cli").glob("*.py"))


def test_the_reference_scanner_catches_missing_files_and_objects():
    assert missing_references("see gradlab/runs/records.py and :func:`gradlab.runs.records.find_run`") == []
    text = ("measured in ``benchmarks/bench_nothing.py``; see docs/NOPE.md, cli/gone.py, gradlab/x/y.py, "
            ":mod:`gradlab.no_such_module` and :func:`gradlab.runs.records.no_such_function`")
    assert missing_references(text) == ["benchmarks/bench_nothing.py", "docs/NOPE.md", "cli/gone.py", "gradlab/x/y.py",
                                        "gradlab.no_such_module", "gradlab.runs.records.no_such_function"]


def test_no_docstring_or_help_names_a_missing_file():
    sources = _sources()
    assert len(sources) > 50
    bad = {str(p.relative_to(ROOT)): m for p in sources if (m := missing_references(p.read_text()))}
    assert bad == {}


def _listed(out: str) -> list[str]:
    """The entry names of `gradlab list KIND`: the first word of each row that starts at column 0."""
    lines = out.splitlines()[2:]  # title, header
    return [line.split()[0] for line in lines if line and not line[0].isspace() and not line.startswith("gradlab list")]


def test_list_probes_is_what_gradlab_probe_has(capsys):
    import typer

    from gradlab_cli.main import make_app

    group = typer.main.get_command(make_app(["probe"])).commands["probe"]  # what `gradlab probe NAME` dispatches
    with group.make_context("probe", [], resilient_parsing=True) as ctx:
        commands = set(group.list_commands(ctx))
    r = cli(capsys, "list", "probes")
    assert r.code == 0
    assert set(_listed(r.out)) == commands and commands
    for name in commands:  # and each is a real command with --help
        assert cli(capsys, "probe", name, "--help").code == 0


def test_list_models_shows_only_options_train_accepts(capsys):
    from gradlab.core.manifest import real_registry
    from gradlab.training.options import TRAIN_OPTIONS
    from gradlab_cli._common import resolve_command
    from gradlab_cli.train import train_slots

    r = cli(capsys, "list", "models")
    assert r.code == 0
    models = real_registry("models")
    assert _listed(r.out) == models.names()
    for entry in models:
        for opt in entry.options:
            value = opt.default if opt.default is not None else (opt.choices[0] if opt.choices else None)
            if value is None:
                continue
            cfg = resolve_command(TRAIN_OPTIONS, None, {"model": entry.name, opt.name: value},
                                  slots=train_slots(), command="train")
            assert cfg[opt.name] == value
        shown = cli(capsys, "list", "models", entry.name).out
        for opt in entry.options:
            assert opt.flag in shown
