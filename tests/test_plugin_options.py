"""Models, datasets and attacks declare their options once; validation, flags and listings follow.

Also: a toy attack registered from this file runs through ``gradlab attack`` with its own flag.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from gradlab.attacks import ATTACK_OPTIONS, ATTACKS, Attack, build_attack
from gradlab.core.errors import GradlabError
from gradlab.core.options import Option, Options
from gradlab.data import DATASETS, load_dataset
from gradlab.data.base import DataSpec
from gradlab.models import MODELS, build_model
from gradlab_cli.main import main

REGISTRIES = {"models": MODELS, "datasets": DATASETS, "attacks": ATTACKS}
# The registries whose options one command reads from the same flat keys.
COMMANDS = {"train": (MODELS, DATASETS), "attack": (ATTACKS,)}
SPEC = DataSpec("digits", (1, 8, 8), 10, [0.3], [0.37])


class Toy(Attack):
    """One step of ``scale * eps`` along the sign of the gradient (a shortened FGSM)."""

    name = "toy"
    trainable = True  # cheap enough for `gradlab train --adv toy`
    options = ATTACK_OPTIONS + Options(Option("scale", float, 1.0, "fraction of eps to step", low=0, high=1))

    def perturb(self, x, y):
        g, _ = self.grad(x)
        return x + self.scale * self.eps * self.step_direction(g)


@pytest.fixture
def toy(monkeypatch):
    """Registers ``toy`` for one test only (other tests iterate over the registered attacks)."""
    monkeypatch.setattr(ATTACKS, "_entries", dict(ATTACKS._entries))
    ATTACKS.add("toy", Toy, "a shortened FGSM step (test plug-in)", options=Toy.options)
    return Toy


def _cli(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return exc.value.code, out, err


# ------------------------------------------------------------------ declarations ---------------
@pytest.mark.parametrize("kind", sorted(REGISTRIES))
def test_every_entry_declares_typed_options_with_help(kind):
    for entry in REGISTRIES[kind]:
        assert isinstance(entry.options, Options) and len(entry.options), entry.name
        assert not hasattr(entry, "legacy_flags"), entry.name  # no "--a --b" string left
        for opt in entry.options:
            assert len(opt.help.split()) >= 2, (entry.name, opt.name)  # a phrase, not just a word


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_no_option_name_has_two_types_within_a_command(command):
    kinds: dict = {}
    for registry in COMMANDS[command]:
        for name, owners in registry.declarations().items():
            for _, opt in owners:
                kinds.setdefault(name, set()).add(opt.kind)
    assert {n: k for n, k in kinds.items() if len(k) > 1} == {}


def test_train_reads_model_and_dataset_options_from_disjoint_names():
    # `norm` is a model's (auto|none|batch|layer) in train and an attack's (linf|l2) in attack; no
    # command reads both, since train's adversarial training takes its own adv_* keys
    from gradlab.training.options import BASE_DEFAULTS
    from gradlab_cli.attack import OWN

    models, datasets = set(MODELS.declarations()), set(DATASETS.declarations())
    assert not models & datasets
    assert not (models | datasets) & set(BASE_DEFAULTS)
    assert {k for k in BASE_DEFAULTS if k.startswith("adv")} == {"adv", "adv_eps", "adv_ratio", "adv_warmup"}
    shared = set(OWN.names()) & set(ATTACKS.declarations())
    assert shared == {"seed"}  # the run's seed is the attack's seed
    assert {o.kind for _, o in ATTACKS.declarations()["seed"]} == {OWN["seed"].kind}


def test_model_and_dataset_declarations_resolve_a_train_config_and_make_its_flags():
    from gradlab.core.config import Slot, resolve_config
    from gradlab.models import ZOO_OPTIONS, model_options
    from gradlab_cli._options import with_flags

    own = Options(Option("model", str, "mlp", "the model"), Option("dataset", str, "digits", "the dataset"))
    slots = [Slot("model", MODELS, options_for=model_options), Slot("dataset", DATASETS)]
    cfg = resolve_config(own, slots, [("in f.yaml", {"model": "cnn", "act": "tanh"}), ("", {"max_train": 100})])
    assert cfg == {"model": "cnn", "dataset": "digits", **MODELS.entry("cnn").options.defaults(), "act": "tanh",
                   "test_fraction": 0.2, "max_train": 100}
    with pytest.raises(GradlabError, match=r"^'depth' is an option of model mlp, not of model cnn .*; in f\.yaml$"):
        resolve_config(own, slots, [("in f.yaml", {"model": "cnn", "depth": 3})])
    user = resolve_config(own, slots, [("", {"model": "pkg.mod:make", "depth": 3})])  # a user model: the zoo's
    assert set(user) == {"model", "dataset", *ZOO_OPTIONS.names(), "test_fraction", "max_train"}

    @with_flags(("Model", MODELS), ("Data", DATASETS))
    def command(*, flags: dict) -> None:
        """Train."""

    assert set(command.flag_names) == set(MODELS.declarations()) | set(DATASETS.declarations())


def test_attack_classes_carry_their_registered_declaration():
    for entry in ATTACKS:
        assert entry.obj.options is entry.options, entry.name
        assert set(ATTACK_OPTIONS.names()) <= set(entry.options.names()), entry.name
        shadowed = [n for n in entry.options.names() if hasattr(Attack, n) and not n.startswith("_")
                    and n not in Attack.__annotations__]
        assert shadowed == [], entry.name  # an option would overwrite a method


# ------------------------------------------------------------------ one line per mistake -------
def test_an_option_of_another_model_names_its_owner_from_python_and_cli(tmp_path, capsys):
    with pytest.raises(GradlabError) as exc:
        build_model("cnn", SPEC, depth=3)
    msg = str(exc.value)
    assert msg.startswith("'depth' is an option of model mlp, not of model cnn (its options: act, init,")
    code, out, err = _cli(["train", "--model", "cnn", "--depth", "3", "--runs-dir", tmp_path / "r", "--quiet"], capsys)
    assert code == 2 and err.strip() == f"gradlab: error: {msg}"
    assert not (tmp_path / "r").exists()
    with pytest.raises(GradlabError, match=r"'kind' is an option of dataset synthetic, not of dataset mnist1d"):
        load_dataset("mnist1d", kind="blobs")


def test_an_unknown_attack_option_is_one_line_with_did_you_mean(tiny_runs, tmp_path, capsys):
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    with pytest.raises(GradlabError, match=r"^unknown option 'stepz' of attack pgd; did you mean 'steps'\?$"):
        build_attack("pgd", model, 0.1, stepz=3)
    cfg = tmp_path / "a.yaml"
    cfg.write_text("stepz: 3\n")
    code, out, err = _cli(["attack", "pgd", "--config", cfg, "--runs-dir", tiny_runs], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"unknown key in {cfg}: stepz; did you mean 'steps'?" in err
    code, out, err = _cli(["attack", "pgd", "--stepz", "3", "--runs-dir", tiny_runs], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1  # click's own suggestion for a flag
    assert "No such option: --stepz" in err and "--steps" in err
    # an option of another attack: the same line from the CLI as from Python
    with pytest.raises(GradlabError) as exc:
        build_attack("fgsm", model, 0.1, restarts=2)
    code, out, err = _cli(["attack", "fgsm", "--restarts", "2", "--runs-dir", tiny_runs], capsys)
    assert code == 2 and err.strip() == f"gradlab: error: {exc.value}"
    assert "'restarts' is an option of attack apgd, attack fab, attack pgd, attack square, not of attack fgsm" in err


# ------------------------------------------------------------------ a plug-in end to end -------
def test_a_toy_attack_from_a_test_file_runs_through_the_cli(toy, tiny_runs, capsys):
    code, out, err = _cli(["attack", "--help"], capsys)
    flat = " ".join(out.replace("│", " ").split())
    assert code == 0 and "--scale" in flat and "(attack: toy) (default: 1)" in flat
    assert ("(attack: apgd, autoattack, curls, curvature, cw, deepfool, fab, fmn, pgd) (default: apgd 100, "
            "autoattack 100, curls 20, curvature 1, ...)") in flat  # --steps
    # --norm: every attack takes it; cw and deepfool default to l2, fmn also takes l1 and l0
    assert ("One of: l2 for cw; linf, l2, l1, l0 for fmn; linf, l2 for the others. (default: l2 for cw, deepfool, "
            "fmn; linf for the others)") in flat
    code, out, err = _cli(["attack", "toy", "--eps", "0,0.1", "--scale", "0.5", "--n-examples", "30", "--grid", "0",
                           "--runs-dir", tiny_runs, "--quiet"], capsys)
    assert code == 0, err
    path = Path(out.strip().splitlines()[-1].removeprefix("run: "))
    df = pd.read_csv(path / "attack.csv")
    assert df["attack"].tolist() == ["toy", "toy"] and df["eps"].tolist() == [0.0, 0.1]
    assert df.loc[0, "robust_acc"] == pytest.approx(df.loc[0, "clean_acc"])
    # a step of scale * eps = 0.05 in every pixel whose gradient is non-zero, clamped to [0, 1]
    assert 0 < df.loc[1, "mean_linf"] <= 0.05 + 1e-6
    cfg = yaml.safe_load((path / "config.yaml").read_text())["config"]
    assert cfg["attack"] == "toy" and cfg["scale"] == 0.5
    code, out, err = _cli(["attack", "toy", "--scale", "2", "--runs-dir", tiny_runs], capsys)
    assert code == 2 and err.strip() == "gradlab: error: invalid scale: 2.0 (must be a number in [0, 1])"
    code, out, err = _cli(["list", "attacks"], capsys)
    assert code == 0 and "toy" in out and "scale=1" in out


# ------------------------------------------------------------------ listing --------------------
@pytest.mark.parametrize("argv", [["models"], ["datasets"], ["attacks"], ["models", "mlp"], ["attacks", "curls"],
                                  ["datasets", "synthetic"]])
def test_list_shows_the_declared_options_within_80_columns(argv, capsys):
    code, out, err = _cli(["list", *argv], capsys)
    assert code == 0, err
    assert max(len(line.rstrip()) for line in out.splitlines()) <= 80
    registry = REGISTRIES[argv[0]]
    entries = [registry.entry(argv[1])] if len(argv) > 1 else list(registry)
    flat = " ".join(out.split())
    for entry in entries:
        assert entry.name in out
        for opt in entry.options:
            assert (opt.flag if len(argv) > 1 else opt.name) in flat, (entry.name, opt.name)
    if len(argv) > 1:
        assert "an integer >= 1" in flat  # what each option accepts


def test_list_of_an_unknown_entry_is_one_line(capsys):
    code, out, err = _cli(["list", "models", "mpl"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "did you mean 'mlp'" in err


def test_a_toy_attack_from_a_test_file_trains_adversarially(toy, tmp_path, capsys):
    """The same toy attack through the training loop's adversarial batch transform (--adv)."""
    base = ["train", "--epochs", "1", "--batch-size", "32", "--width", "8", "--set", "max_train=160", "--quiet",
            "--runs-dir", tmp_path, "--log-every-steps", "1"]
    code, out, err = _cli([*base, "--adv", "toy", "--adv-eps", "0.2", "--adv-ratio", "1"], capsys)
    assert code == 0, err
    adv = Path(out.strip().splitlines()[-1].removeprefix("run: "))
    code, out, err = _cli(base, capsys)
    plain = Path(out.strip().splitlines()[-1].removeprefix("run: "))
    cfg = yaml.safe_load((adv / "config.yaml").read_text())["config"]
    assert cfg["adv"] == "toy" and cfg["adv_eps"] == 0.2
    m_adv, m_plain = pd.read_csv(adv / "metrics.csv"), pd.read_csv(plain / "metrics.csv")
    loss = lambda m: m[(m.split == "train-step") & (m.metric == "loss")]["value"].tolist()  # noqa: E731
    assert len(loss(m_adv)) == len(loss(m_plain)) == 5
    assert loss(m_adv)[0] > loss(m_plain)[0]  # the same first batch, attacked: a higher loss
    code, out, err = _cli([*base, "--adv", "curls"], capsys)
    assert code == 2 and "must be one of: fgsm, pgd, toy" in err
