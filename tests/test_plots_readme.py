"""The README's skip-connection figures name the experiment file, seeds and Hessian batches that
produce them, and the budget the README states is the one that file runs."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
FILE = "experiments/skip_connections_seeds.yaml"


def _section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("**What skip connections do to the landscape**")
    return text[start:text.index("**Adversarial training**", start)]


def _stages():
    doc = yaml.safe_load((ROOT / FILE).read_text())
    train, hessian = doc["steps"]
    assert train["command"] == "train" and hessian["command"] == "probe-hessian" and hessian["run"] == "@previous"
    return train, hessian


def test_quoted_figures_name_their_command_seeds_and_hessian_batch():
    section = " ".join(_section().split())  # line breaks of the prose do not matter
    train, hessian = _stages()
    seeds = train["sweep"]["seed"]
    assert len(seeds) >= 3
    assert f"gradlab run {FILE}" in section
    assert "seeds " + ", ".join(map(str, seeds[:-1])) + f" and {seeds[-1]}" in section
    # the budget stated next to the figures is the file's
    assert f"{train['max_train']} training digits" in section and f"{train['epochs']} epochs" in section
    n_ex = hessian["batches"] * hessian["batch_size"]
    assert hessian["batches"] == 1 and f"one Hessian batch of {n_ex}" in section
    assert f"tol {hessian['tol']:g}" in section


def test_unreproduced_single_seed_figures_are_gone():
    section = _section()
    prose = " ".join(section.split())
    for stale in ("lambda_max 0.6 at 20 layers", "about 660", "18x higher"):
        assert stale not in prose
    # every lambda_max figure in the table comes with a range over the seeds
    rows = [r for r in section.splitlines() if r.startswith("| resnet") or r.startswith("| plain")]
    assert rows and all(re.search(r"\d[\d.]* \(\d[\d.,]*[–-]\d[\d.,]*\)", r) for r in rows)
