"""The package installs and starts the way the README says, and stays light where it must."""

from __future__ import annotations

import sys

import pytest

from clihelp import ROOT, gradlab_exe, run_proc

CORE_MODULES = ["gradlab", "gradlab.models", "gradlab.data", "gradlab.optim", "gradlab.curvature",
                "gradlab.probes", "gradlab.attacks", "gradlab.landscape", "gradlab.training.loop", "gradlab.runs.folder",
                "gradlab.runs", "gradlab.training.load"]


def test_editable_install_exposes_console_script_and_module(tmp_path):
    r = run_proc(gradlab_exe() + ["--help"], cwd=tmp_path)
    assert r.code == 0 and "train" in r.out and "probe" in r.out
    r = run_proc([sys.executable, "-m", "gradlab", "--help"], cwd=tmp_path)
    assert r.code == 0 and "train" in r.out


@pytest.mark.slow
def test_regular_install_exposes_console_script_and_module(tmp_path):
    target = tmp_path / "site"
    r = run_proc([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                  "--target", target, ROOT], timeout=600)
    assert r.code == 0, r.err
    assert (target / "gradlab_cli" / "main.py").is_file()
    assert not (target / "cli").exists()  # no generic top-level `cli` module in site-packages
    env = {"PYTHONPATH": str(target)}
    for cwd in (tmp_path, ROOT):  # from the repository root the local gradlab/ shadows: must still work
        r = run_proc([target / "bin" / "gradlab", "list", "models"], cwd=cwd, env=env)
        assert r.code == 0 and "resnet20" in r.out, r.err
        r = run_proc([sys.executable, "-m", "gradlab", "--help"], cwd=cwd, env=env)
        assert r.code == 0 and "train" in r.out, r.err
    r = run_proc([sys.executable, "-c", "import gradlab, gradlab_cli; print(gradlab.__file__, gradlab_cli.__file__)"],
                 cwd=tmp_path, env=env)
    assert r.out.split() == [str(target / "gradlab" / "__init__.py"), str(target / "gradlab_cli" / "__init__.py")]


def test_core_imports_without_typer(tmp_path):
    code = ("import sys; sys.modules['typer'] = None\n"
            + "".join(f"import {m}\n" for m in CORE_MODULES)
            + "try:\n    import typer\nexcept ImportError:\n    print('typer blocked')\n")
    r = run_proc([sys.executable, "-c", code], cwd=tmp_path)
    assert r.code == 0, r.err
    assert r.out.strip() == "typer blocked"


@pytest.mark.parametrize("args", [["--help"], ["train", "--help"], ["probe", "--help"]])
def test_help_does_not_import_torch(tmp_path, args):
    """Flags come from the plug-ins' declarations, read from the manifest (gradlab.core.manifest):
    the first run of a fresh install builds it by importing the plug-ins; every later one must
    not import torch. The warm-up run is that first one, in a cache of this test's own."""
    code = ("import sys\nfrom gradlab_cli.main import main\n"
            f"try:\n    main({args!r})\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
            "heavy = [m for m in ('torch', 'pandas', 'matplotlib', 'scipy') if m in sys.modules]\n"
            "print('HEAVY', heavy)")
    env = {"GRADLAB_CACHE": str(tmp_path / "cache")}
    warm = run_proc([sys.executable, "-c", code], cwd=tmp_path, env=env)
    assert warm.code == 0, warm.err
    r = run_proc([sys.executable, "-c", code], cwd=tmp_path, env=env)
    assert r.code == 0, r.err
    assert r.out.strip().splitlines()[-1] == "HEAVY []"
