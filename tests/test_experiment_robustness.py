"""experiments/robustness.yaml: its shape, its check (dry run), and a tiny version of it run end to
end (digits instead of MNIST, 1 epoch, 16 examples) through the same per-run argv the experiment
runner uses, then experiments/robustness_table.py's one table and one plot."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd
import pytest
import yaml

from clihelp import ROOT, cli
from gradlab.training.experiment import PREVIOUS, load_experiment

FILE = ROOT / "experiments" / "robustness.yaml"


def test_the_experiment_trains_standard_and_pgd_models_then_sweeps_four_attacks(capsys):
    train, attack = load_experiment(FILE)
    assert train.command == ["train"] and train.base["dataset"] == "mnist"
    assert {c["adv"] for c in train.combinations()} == {None, "pgd"} and train.base["adv_eps"] == 0.3
    assert train.base["model"] == "cnn" and 0 < train.base["adv_warmup"] < train.base["epochs"]  # the eps ramp
    assert attack.command == ["attack"] and attack.args == [] and attack.base["run"] == PREVIOUS
    assert [c["attack"] for c in attack.combinations()] == ["fgsm", "pgd", "apgd", "autoattack"]
    assert attack.base["eps"] == "0.1,0.2,0.3"
    r = cli(capsys, "run", FILE, "--dry-run")  # every combination checked, nothing run
    assert r.code == 0, r.err
    assert "10 runs" in r.out


def test_a_tiny_version_runs_and_makes_the_table_and_plot(tmp_path, capsys):
    train, attack = load_experiment(FILE)
    runs = tmp_path / "runs"
    for combo in train.combinations():
        args = ["train", "--dataset", "digits", "--epochs", "1", "--set", "max_train=300", "--runs-dir", runs,
                "--quiet", "--adv-eps", str(combo["adv_eps"]), "--adv-ratio", str(combo["adv_ratio"]),
                "--adv-warmup", "0.5"]
        r = cli(capsys, *args, *(["--adv", combo["adv"]] if combo["adv"] else []))
        assert r.code == 0, r.err
    trained = sorted(runs.iterdir())
    for source in trained:
        for i, combo in enumerate(c for c in attack.combinations() if c["attack"] in ("fgsm", "pgd")):
            cfg = {k: v for k, v in combo.items() if k != "run"}
            cfg.update(n_examples=16, runs_dir=str(runs))
            path = tmp_path / f"{source.name}-{i}.yaml"
            path.write_text(yaml.safe_dump(cfg))
            r = cli(capsys, "attack", "--run", source, "--config", path, "--quiet")  # the NAME from the config
            assert r.code == 0, r.err
            assert pd.read_csv(r.run_path / "attack.csv")["attack"].unique().tolist() == [combo["attack"]]
    assert _table_module().main([str(runs)]) == 0
    table = pd.read_csv(runs / "robustness.csv")
    assert list(table.columns) == ["training", "attack", "clean", "eps 0.1", "eps 0.2", "eps 0.3"]
    assert len(table) == 4 and set(table["training"]) == {"standard", "adversarial (pgd, eps 0.3)"}
    assert (table["eps 0.3"] <= table["clean"] + 1e-9).all()
    assert Path(runs / "robustness.png").stat().st_size > 0
    ci = pd.read_csv(runs / "robustness_ci.csv")
    assert len(ci) == 4 * 3 and (ci["n"] == 16).all()
    assert ((ci["ci_low"] <= ci["robust_acc"]) & (ci["robust_acc"] <= ci["ci_high"])).all()
    assert ((ci["ci_low"] >= 0) & (ci["ci_high"] <= 1) & (ci["ci_high"] > ci["ci_low"])).all()


def _table_module():
    spec = importlib.util.spec_from_file_location("robustness_table", ROOT / "experiments" / "robustness_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_wilson_interval_matches_its_closed_form_and_the_binomial_coverage():
    """The table's 95% intervals: Wilson's formula at known points (p = 0.5, n = 100 gives
    0.5 +- 0.0962; p = 0 keeps a non-empty upper bound 3.84 / 103.84), and over all outcomes of
    Binomial(200, 0.6) the interval covers 0.6 with probability close to 95% (summed exactly)."""
    from scipy.stats import binom

    from gradlab.attacks.report import wilson_interval as wilson

    low, high = wilson(0.5, 100)
    assert low == pytest.approx(0.40383, abs=1e-5) and high == pytest.approx(0.59617, abs=1e-5)
    z2 = 1.959963984540054 ** 2
    assert wilson(0.0, 200) == (0.0, pytest.approx(z2 / (200 + z2)))
    assert wilson(1.0, 200)[1] == 1.0 and wilson(1.0, 200)[0] == pytest.approx(200 / (200 + z2))
    n, p = 200, 0.6
    coverage = sum(binom.pmf(k, n, p) for k in range(n + 1) if wilson(k / n, n)[0] <= p <= wilson(k / n, n)[1])
    assert 0.93 < coverage < 0.97


def test_the_readme_quotes_the_table_with_the_budget_and_command_of_the_file():
    """The README's robustness paragraph states the command that reproduces it and the budget
    experiments/robustness.yaml runs (model, epochs, warm-up, examples attacked)."""
    text = (ROOT / "README.md").read_text()
    start = text.index("**Robustness to the literature's standard**")
    section = " ".join(text[start:text.index("\n\n**", start + 1)].split())
    train, attack = load_experiment(FILE)
    assert "gradlab run experiments/robustness.yaml" in section
    assert "python experiments/robustness_table.py" in section and "docs/robustness.png" in section
    assert f"{train.base['epochs']} epochs" in section and f"warm-up over {train.base['adv_warmup']:g}" in section
    assert f"first {attack.base['n_examples']} test images" in section and "CNN" in section
    assert "| AutoAttack |" in section.replace("| autoattack |", "| AutoAttack |")
    assert (ROOT / "docs" / "robustness.png").stat().st_size > 0


def test_the_wilson_interval_holds_its_proportion_exactly_at_every_count():
    """Rounding must not put p outside its interval: at p = 0 the closed form's centre - half is
    4e-19 for n = 500, which made the plot's error bars negative."""
    from gradlab.attacks.report import wilson_interval

    for n in range(1, 1001):
        assert wilson_interval(0.0, n)[0] == 0.0 and wilson_interval(1.0, n)[1] == 1.0, n
        for k in (1, n // 3, n // 2, n - 1):
            low, high = wilson_interval(k / n, n)
            assert 0.0 <= low <= k / n <= high <= 1.0, (k, n)
