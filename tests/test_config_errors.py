"""Bad configuration values, from any source, are one line and exit 2, before any data loads and
before any run folder exists (the same rules for flags, --set, --config YAML and the Python API)."""

from __future__ import annotations

import pytest

from clihelp import cli


@pytest.fixture
def no_data(monkeypatch):
    """Loading data is a failure here: every mistake must be caught before it."""
    import gradlab.data

    def refuse(*a, **k):
        raise AssertionError("data was loaded before the configuration was checked")

    monkeypatch.setattr(gradlab.data, "load_dataset", refuse)


CASES = [
    (["--set", "lr=fast"], None, "invalid lr: 'fast' in --set (must be a number > 0)"),
    ([], "batch_size: \"64\"\n", "invalid batch size: '64' in config file is text, not a number"),
    ([], "epochs: true\n", "invalid epochs: True in"),
    ([], "epochs: 1.5\n", "must be an integer >= 1"),
    (["--set", "=3"], None, "invalid option name ''"),
    (["--set", "epoch=3"], None, "did you mean 'epochs'?"),
    (["--opt", "adam", "--set", "hessian_power=0.5"], None, "is an option of optimizer adahessian, not of"),
    (["--opt", "adma"], None, "did you mean 'adam'?"),
    (["--model", "mlp", "--set", "shortcut=B"], None, "not of model mlp"),
    (["--epochs", "0"], None, "invalid epochs: 0 (must be an integer >= 1)"),
    ([], "lr: 1e-3\nepochs: 0\n", "invalid epochs: 0 in"),  # 1e-3 itself is a number now
]


@pytest.mark.parametrize("args, yaml_text, words", CASES, ids=[c[2][:40] for c in CASES])
def test_bad_config_is_one_line_exit_2_no_folder(tmp_path, capsys, no_data, args, yaml_text, words):
    runs = tmp_path / "runs"
    extra = []
    if yaml_text is not None:
        (tmp_path / "c.yaml").write_text(yaml_text)
        extra = ["--config", str(tmp_path / "c.yaml")]
    r = cli(capsys, "train", *args, *extra, "--runs-dir", runs)
    assert r.code == 2, (r.code, r.err)
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gradlab: error: "), r.err
    assert words in lines[0], lines[0]
    assert not runs.exists() or not any(runs.iterdir())


def test_python_api_gives_the_same_messages():
    import torch

    from gradlab.core.errors import GradlabError
    from gradlab.optim import build_optimizer

    params = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(GradlabError, match=r"invalid lr: 'fast' \(must be a number > 0\)"):
        build_optimizer("adam", params, lr="fast")
    with pytest.raises(GradlabError, match="is an option of optimizer adahessian"):
        build_optimizer("adam", params, hessian_power=0.5)
