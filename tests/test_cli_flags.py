"""Flags made from option declarations, config resolution across sources, and the lazy app."""

from __future__ import annotations

import importlib
import inspect
import subprocess
import sys

import pytest
import typer

from gradlab.core.config import Slot, resolve_config
from gradlab.core.errors import GradlabError
from gradlab.core.options import Option, Options
from gradlab.core.registry import Registry
from gradlab_cli._options import with_flags

OWN = Options(Option("opt", str, "plain", "optimizer", choices=("plain", "fancy")),
              Option("epochs", int, 2, "passes", low=1))
OPTS = Registry("optimizer")
OPTS.add("plain", object, "plain", Options(Option("lr", float, 0.1, "step size", low=0, low_open=True)))
OPTS.add("fancy", object, "fancy", Options(Option("lr", float, 0.2, "step size", low=0, low_open=True),
                                           Option("power", float, 1.0, "exponent", low=0, high=1)))


def test_resolve_config_layers_sources_and_names_the_wrong_one():
    cfg = resolve_config(OWN, [Slot("opt", OPTS)], [("in f.yaml", {"epochs": 3, "lr": 0.5}), ("", {"lr": None})])
    assert cfg == {"opt": "plain", "epochs": 3, "lr": 0.5}
    cfg = resolve_config(OWN, [Slot("opt", OPTS)], [("", {"opt": "fancy"})])
    assert cfg == {"opt": "fancy", "epochs": 2, "lr": 0.2, "power": 1.0}
    with pytest.raises(GradlabError, match=r"invalid epochs: 'x' in f\.yaml"):
        resolve_config(OWN, [Slot("opt", OPTS)], [("in f.yaml", {"epochs": "x"})])
    with pytest.raises(GradlabError, match=r"'power' is an option of optimizer fancy, not of optimizer plain .*; in --set"):
        resolve_config(OWN, [Slot("opt", OPTS)], [("in --set", {"power": 0.5})])
    with pytest.raises(GradlabError, match=r"unknown key: epoch; did you mean 'epochs'"):
        resolve_config(OWN, [Slot("opt", OPTS)], [("", {"epoch": 1})])
    with pytest.raises(GradlabError, match=r"invalid opt: 'fanci'.*did you mean 'fancy'"):
        resolve_config(OWN, [Slot("opt", OPTS)], [("", {"opt": "fanci"})])


def test_with_flags_makes_one_typed_flag_per_declared_name(capsys):
    seen = {}

    @with_flags(("Training", OWN), ("Optimizer", OPTS))
    def command(quiet: bool = False, *, flags: dict) -> None:
        """Do it."""
        seen.update(flags)

    params = inspect.signature(command).parameters
    assert list(params) == ["quiet", "opt", "epochs", "lr", "power"]
    app = typer.Typer()
    app.command("x")(command)
    app.command("y")(lambda: None)
    app(["x", "--lr", "0.3", "--epochs", "4"], standalone_mode=False)
    assert seen == {"opt": None, "epochs": 4, "lr": 0.3, "power": None}
    with pytest.raises(SystemExit):
        app(["x", "--help"])
    out = " ".join(capsys.readouterr().out.replace("│", " ").split())
    assert "--power" in out and "(optimizer: fancy)" in out and "(default: plain 0.1, fancy 0.2)" in out


def test_top_level_help_lines_are_the_commands_own_and_help_skips_torch():
    from gradlab_cli.main import COMMANDS

    for name, (module, line) in COMMANDS.items():
        mod = importlib.import_module(f"gradlab_cli.{module}")
        doc = (mod.app.info.help if hasattr(mod, "app") else mod.command.__doc__).strip().splitlines()[0]
        assert doc == line, name
    for args in (["--help"], ["probe", "--help"], ["train", "--help"], ["attack", "--help"]):
        code = (f"import sys; from gradlab_cli.main import main\ntry:\n main({args!r})\nexcept SystemExit: pass\n"
                "print('torch' in sys.modules)")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        assert out.strip().splitlines()[-1] == "False", args


def test_a_train_run_logs_its_declared_options_as_hparams(tmp_path, capsys):
    from tensorboard.plugins.hparams import plugin_data_pb2
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from clihelp import cli

    r = cli(capsys, "train", "--runs-dir", tmp_path, "--epochs", "1", "--width", "8", "--set", "max_train=64",
            "--opt", "adamw", "--quiet")
    assert r.code == 0, r.err
    ea = EventAccumulator(str(r.run_path))
    ea.Reload()
    content = ea.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    info = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    hp = {k: v for k, v in info.hparams.items()}
    assert hp["opt"].string_value == "adamw" and hp["width"].number_value == 8
    assert hp["weight_decay"].number_value == 0.01  # adamw's own default, from its declaration
    assert "hessian_power" not in hp and "runs_dir" not in hp  # another optimizer's; where, not what
