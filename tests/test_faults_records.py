"""Damaged or foreign run folders (issue 14): one line naming the file, exit 2, nothing created,
`gradlab runs` lists them as corrupt; user models named by a run folder need --trust-code."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import yaml

from clihelp import cli

SMALL = ["--epochs", "1", "--set", "max_train=200", "--quiet"]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """One tiny trained run, copied and damaged by each test."""
    from test_cli_train import _Capture

    runs = tmp_path_factory.mktemp("base")
    from gradlab_cli.main import main

    with _Capture() as cap:
        try:
            main(["train", "--runs-dir", str(runs), *SMALL])
        except SystemExit as e:
            assert e.code in (0, None)
    return Path(cap.out.strip().splitlines()[-1][5:])


def _empty_pt(run):
    (run / "checkpoints" / "last.pt").write_bytes(b"")


def _edit_ckpt(run, change):
    import torch

    p = run / "checkpoints" / "last.pt"
    ckpt = torch.load(p, weights_only=True)
    change(ckpt)
    torch.save(ckpt, p)


def _renamed_pt(run):
    _edit_ckpt(run, lambda c: c.__setitem__("weights", c.pop("model")))


def _misshapen_pt(run):
    import torch

    def change(c):
        name = next(iter(c["model"]))
        c["model"][name] = torch.zeros(3, 3)

    _edit_ckpt(run, change)


def _edit_config(run, change):
    p = run / "config.yaml"
    doc = yaml.safe_load(p.read_text())
    change(doc)
    p.write_text(yaml.safe_dump(doc))


DAMAGES = {
    "empty_checkpoint": (_empty_pt, "last.pt", "empty"),
    "renamed_checkpoint_key": (_renamed_pt, "last.pt", "missing key 'model'"),
    "misshapen_weights": (_misshapen_pt, "last.pt", "fit"),
    "config_missing_model": (lambda r: _edit_config(r, lambda d: d["config"].pop("model")), "config.yaml", "'model'"),
    "config_missing_config": (lambda r: _edit_config(r, lambda d: d.pop("config")), "config.yaml", "missing key 'config'"),
    "config_not_mapping": (lambda r: (r / "config.yaml").write_text("- just\n- a list\n"), "config.yaml", "not a mapping"),
    "config_invalid_yaml": (lambda r: (r / "config.yaml").write_text("run_id: [unclosed\n"), "config.yaml", "not valid YAML"),
    "binary_metrics": (lambda r: (r / "metrics.csv").write_bytes(bytes(range(256)) * 8), "metrics.csv", "binary"),
    "truncated_summary": (lambda r: (r / "summary.csv").write_bytes((r / "summary.csv").read_bytes()[:60]),
                          "summary.csv", "truncated"),
}

COMMANDS = {
    "resume": lambda run, runs: ["train", "--resume", run.name, "--runs-dir", runs, "--quiet"],
    "attack": lambda run, runs: ["attack", "fgsm", "--run", run.name, "--runs-dir", runs, "--eps", "0.1", "--quiet"],
    "probe": lambda run, runs: ["probe", "gradnorm", "--run", run.name, "--runs-dir", runs, "--quiet"],
}


def _damaged(base_run, tmp_path, kind) -> Path:
    runs = tmp_path / "runs"
    run = runs / f"{base_run.name}-{kind}"
    shutil.copytree(base_run, run)
    DAMAGES[kind][0](run)
    return run


def _snapshot(runs: Path) -> dict:
    return {str(p.relative_to(runs)): p.read_bytes() for p in sorted(runs.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("kind", sorted(DAMAGES))
def test_damaged_run_gets_one_line_naming_the_file(capsys, base_run, tmp_path, kind, command):
    run = _damaged(base_run, tmp_path, kind)
    runs = run.parent
    before = _snapshot(runs)
    r = cli(capsys, *COMMANDS[command](run, runs))
    lines = r.err.strip().splitlines()
    assert r.code == 2, (kind, command, r.err[-2000:])
    assert len(lines) == 1 and lines[0].startswith("gradlab: error: "), r.err
    _, file_name, what = DAMAGES[kind]
    assert file_name in lines[0] and what in lines[0], lines[0]
    assert "Traceback" not in r.err
    assert _snapshot(runs) == before  # no new run folder, and the damaged one untouched


def test_runs_lists_damaged_runs_as_corrupt_and_keeps_the_others(capsys, base_run, tmp_path):
    import pandas as pd

    for kind in DAMAGES:
        if kind not in ("renamed_checkpoint_key", "misshapen_weights"):  # keys need torch: the loaders' job
            _damaged(base_run, tmp_path, kind)
    runs = tmp_path / "runs"
    shutil.copytree(base_run, runs / base_run.name)
    r = cli(capsys, "runs", "--runs-dir", runs, "--csv", tmp_path / "all.csv")
    assert r.code == 0, r.err
    assert "Traceback" not in r.err
    df = pd.read_csv(tmp_path / "all.csv")
    status = dict(zip(df.run_id, df.status))
    assert status.pop(base_run.name) == "completed"
    assert len(status) == len(DAMAGES) - 2 and set(status.values()) == {"corrupt"}
    notes = [line for line in r.err.splitlines() if line.startswith("gradlab: note: run ")]
    assert len(notes) == len(status)
    for kind, (_, file_name, what) in DAMAGES.items():
        if kind in status or f"{base_run.name}-{kind}" in status:
            note = next(n for n in notes if f"-{kind} " in n)
            assert file_name in note and what in note, note
    assert df.status.notna().all()


def test_resume_checks_types_of_the_checkpoint(capsys, base_run, tmp_path):
    run = tmp_path / "runs" / "r"
    shutil.copytree(base_run, run)
    _edit_ckpt(run, lambda c: c.__setitem__("step", "12"))
    r = cli(capsys, "train", "--resume", run, "--quiet")
    assert r.code == 2 and "'step' is a str" in r.err and "last.pt" in r.err


# -- --trust-code ----------------------------------------------------------------------------------

USER_MODULE = """
import os
from torch import nn
with open(os.environ["GL_IMPORT_MARKER"], "a") as f:
    f.write("imported\\n")

def small(spec, width=16):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.ReLU(), nn.Linear(width, spec.num_classes))
"""


@pytest.fixture
def user_model_run(tmp_path, monkeypatch, capsys):
    """A run this user trained with user model ``gl_trust_mod:small`` (its own state folder)."""
    (tmp_path / "gl_trust_mod.py").write_text(USER_MODULE)
    marker = tmp_path / "imports.txt"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GL_IMPORT_MARKER", str(marker))
    monkeypatch.setenv("GRADLAB_STATE_DIR", str(tmp_path / "state-mine"))
    monkeypatch.delitem(sys.modules, "gl_trust_mod", raising=False)
    r = cli(capsys, "train", "--model", "gl_trust_mod:small", "--runs-dir", tmp_path / "runs", *SMALL)
    assert r.code == 0, r.err
    sys.modules.pop("gl_trust_mod", None)
    marker.unlink()
    return r.run_path, marker


def _foreign_commands(run: Path) -> dict:
    runs = run.parent
    return {
        "resume": ["train", "--resume", run, "--quiet"],
        "attack": ["attack", "fgsm", "--run", run, "--runs-dir", runs, "--eps", "0.05", "--n-examples", "20", "--quiet"],
        "probe": ["probe", "gradnorm", "--run", run, "--runs-dir", runs, "--batches", "1", "--quiet"],
        "simplex": ["simplex", "--run", run, "--runs-dir", runs, "--vertices", "2", "--epochs", "1", "--quiet"],
        "connect": ["connect", run, run, "--runs-dir", runs, "--quiet"],
    }


def test_own_user_model_run_needs_no_flag(capsys, user_model_run, tmp_path):
    run, marker = user_model_run
    assert "gl_trust_mod:small" in (tmp_path / "state-mine" / "trusted-runs.txt").read_text()
    r = cli(capsys, "probe", "gradnorm", "--run", run, "--runs-dir", run.parent, "--batches", "1", "--quiet")
    assert r.code == 0, r.err
    assert marker.read_text() == "imported\n"


@pytest.mark.parametrize("command", ["resume", "attack", "probe", "simplex", "connect"])
def test_foreign_user_model_run_needs_trust_code(capsys, user_model_run, tmp_path, monkeypatch, command):
    run, marker = user_model_run
    monkeypatch.setenv("GRADLAB_STATE_DIR", str(tmp_path / "state-other"))  # another user's view
    before = sorted(p.name for p in run.parent.iterdir())
    args = _foreign_commands(run)[command]
    r = cli(capsys, *args)
    assert r.code == 2, r.err
    line = r.err.strip()
    assert len(line.splitlines()) == 1 and "'gl_trust_mod'" in line and "--trust-code" in line, line
    assert not marker.exists()  # refused before the import
    assert sorted(p.name for p in run.parent.iterdir()) == before
    if command in ("resume", "attack", "probe"):  # the flag lets it through (simplex/connect: longer runs)
        r = cli(capsys, *args, "--trust-code")
        assert r.code == 0, r.err
        assert marker.read_text() == "imported\n"


def test_probe_config_file_may_trust_code(capsys, user_model_run, tmp_path, monkeypatch):
    run, marker = user_model_run
    monkeypatch.setenv("GRADLAB_STATE_DIR", str(tmp_path / "state-other"))
    cfg = tmp_path / "probe.yaml"
    cfg.write_text("trust_code: true\nbatches: 1\n")
    r = cli(capsys, "probe", "gradnorm", "--run", run, "--runs-dir", run.parent, "--config", cfg, "--quiet")
    assert r.code == 0, r.err
    assert marker.read_text() == "imported\n"


def test_edited_config_loses_trust(capsys, user_model_run):
    run, marker = user_model_run
    with open(run / "config.yaml", "a") as f:
        f.write("# edited\n")
    r = cli(capsys, "probe", "gradnorm", "--run", run, "--runs-dir", run.parent, "--quiet")
    assert r.code == 2 and "--trust-code" in r.err and not marker.exists()


@pytest.mark.parametrize("argv", [["train"], ["attack", "fgsm"], ["probe", "gradnorm"], ["simplex"], ["connect"]])
def test_trust_code_flag_is_documented_in_help(capsys, argv, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    r = cli(capsys, *argv, "--help")
    assert r.code == 0 and "--trust-code" in r.out and "runs its code" in " ".join(r.out.split())


def test_readme_says_that_run_folders_can_import_code():
    text = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text().split())
    assert "--trust-code" in text and "package.module:factory" in text
