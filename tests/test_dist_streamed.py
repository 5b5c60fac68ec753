"""Streamed commands under torchrun end to end (2 gloo processes): ``attack`` and ``probe
hessian`` on a run trained from a streamed image folder make one run folder, written by rank 0,
with one process's numbers within float tolerance."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from clihelp import cli, train_in_process
from test_dist_commands import torchrun

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def streamed(tmp_path_factory):
    """A digits-sized MLP trained from a generated 3-class folder of 6x6 grey images, streamed."""
    from PIL import Image

    root = tmp_path_factory.mktemp("stream")
    rng = np.random.default_rng(0)
    for k, c in enumerate(("a", "b", "c")):
        (root / "img" / c).mkdir(parents=True)
        for i in range(40):  # a class-dependent mean, so the model learns something
            pixels = np.clip(rng.normal(60 + 70 * k, 40, (6, 6)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels, mode="L").save(root / "img" / c / f"{i}.png")
    runs = root / "runs"
    run = train_in_process("--runs-dir", runs, "--dataset", "imagefolder", "--data-dir", root / "img", "--channels",
                           "gray", "--stream", "--epochs", "3", "--width", "16", "--batch-size", "16", "--opt", "adam",
                           "--lr", "0.01", "--seed", "1", "--quiet", "--device", "cpu")
    return runs, run


def _both(capsys, tmp_path, runs, *args):
    """The run folder of ``gradlab ARGS`` in one process and of the same under its own torchrun."""
    one = cli(capsys, *args, "--runs-dir", tmp_path / "one", "--quiet", "--device", "cpu")
    assert one.code == 0, one.err
    p = torchrun(*args, "--runs-dir", tmp_path / "two", "--quiet", "--device", "cpu", logs=tmp_path / "logs")
    assert p.returncode == 0, p.stderr[-3000:] + "".join(f.read_text()[-2000:] for f in (tmp_path / "logs").rglob("*.log"))
    (two,) = [d for d in (tmp_path / "two").iterdir() if d.is_dir()]  # one folder, not one per rank
    out = {int(f.parent.name): f.read_text() for f in (tmp_path / "logs").rglob("stdout.log")}
    assert out[0].strip().splitlines()[-1] == f"run: {two}" and out[1].strip() == ""  # rank 0 prints
    return one.run_path, two


def _summary(folder):
    return pd.read_csv(folder / "summary.csv").iloc[0]


def test_a_streamed_attack_splits_the_batches_and_matches_one_process(capsys, tmp_path, streamed):
    runs, run = streamed
    one, two = _both(capsys, tmp_path, runs, "attack", "pgd", "--run", run, "--eps", "0,0.05,0.2", "--steps", "3",
                     "--batch-size", "8", "--random-start")
    a, b = (pd.read_csv(d / "attack.csv") for d in (one, two))
    pd.testing.assert_frame_equal(a, b, rtol=1e-6)  # the same batches, each from the same seed
    assert a["robust_acc"].iloc[-1] < a["clean_acc"].iloc[-1]  # the attack did something
    sa, sb = _summary(one), _summary(two)
    assert sa["status"] == sb["status"] == "completed" and bool(sb["streamed"])
    assert sb["n"] == sa["n"] > 0


def test_a_streamed_hessian_probe_all_reduces_over_the_batches_and_matches_one_process(capsys, tmp_path, streamed):
    runs, run = streamed
    one, two = _both(capsys, tmp_path, runs, "probe", "hessian", "--run", run, "--top-k", "2", "--batches", "0",
                     "--batch-size", "12", "--tol", "1e-8", "--no-trace")
    a, b = (pd.read_csv(d / "hessian.csv") for d in (one, two))
    assert list(a["kind"]) == list(b["kind"])
    np.testing.assert_allclose(a["value"], b["value"], rtol=1e-4, atol=1e-6)
    sa, sb = _summary(one), _summary(two)
    for k in ("loss", "lambda_max"):
        assert sb[k] == pytest.approx(sa[k], rel=1e-4), k
