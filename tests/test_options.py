"""The typed option declarations: one line per mistake, the same rules from every source."""

from __future__ import annotations

import math

import pytest

from gradlab.core.errors import GradlabError
from gradlab.core.options import Option, Options
from gradlab.core.registry import Registry

OPTS = Options(
    Option("epochs", int, 15, "passes over the training set", low=1),
    Option("lr", float, None, "learning rate", low=0, low_open=True),
    Option("act", str, "relu", "activation", choices=("relu", "tanh")),
    Option("residual", bool, False, "skip connections"),
    Option("betas", tuple, (0.9, 0.999), "EMA coefficients", length=2, low=0, high=1, high_open=True),
)


def test_defaults_and_conversion():
    out = OPTS.resolve({"epochs": 3.0, "lr": 1, "betas": [0.8, 0.9]})
    assert out == {"epochs": 3, "lr": 1.0, "act": "relu", "residual": False, "betas": (0.8, 0.9)}
    assert isinstance(out["epochs"], int) and isinstance(out["lr"], float)
    assert OPTS.resolve({"betas": "0.5, 0.6"})["betas"] == (0.5, 0.6)  # as a flag gives it


@pytest.mark.parametrize("given, words", [
    ({"epochs": True}, "invalid epochs: True"),
    ({"epochs": 1.5}, "must be an integer >= 1"),
    ({"epochs": 0}, "must be an integer >= 1"),
    ({"epochs": "64"}, "is text, not a number"),
    ({"lr": "fast"}, "invalid lr: 'fast' (must be a number > 0)"),
    ({"lr": 0.0}, "must be a number > 0"),
    ({"lr": math.inf}, "invalid lr: inf"),
    ({"lr": math.nan}, "invalid lr: nan"),
    ({"act": "rleu"}, "did you mean 'relu'?"),
    ({"residual": 1}, "must be true or false"),
    ({"betas": [0.9]}, "2 numbers, each in [0, 1)"),
    ({"betas": [0.9, 1.0]}, "2 numbers, each in [0, 1)"),
    ({"epoch": 3}, "unknown option 'epoch'; did you mean 'epochs'?"),
    ({"": 3}, "invalid option name ''"),
])
def test_every_mistake_is_one_line_naming_it(given, words):
    with pytest.raises(GradlabError) as e:
        OPTS.resolve(given)
    msg = str(e.value)
    assert words in msg and "\n" not in msg


def test_where_and_owner_are_named():
    with pytest.raises(GradlabError, match=r"invalid lr: 'fast' in --set"):
        OPTS.resolve({"lr": "fast"}, where="in --set")
    others = {"optimizer adahessian": Options(Option("hessian_power", float, 1.0, "k", low=0, high=1))}
    with pytest.raises(GradlabError, match=r"'hessian_power' is an option of optimizer adahessian, not of optimizer adam"):
        OPTS.resolve({"hessian_power": 0.5}, owner="optimizer adam", others=others)


def test_none_means_not_given_unless_the_default_is_none():
    assert OPTS.resolve({"epochs": None})["epochs"] == 15
    assert OPTS.resolve({"lr": None})["lr"] is None


def test_a_declaration_checks_its_own_default():
    with pytest.raises(GradlabError):
        Option("width", int, 0, "units", low=1)
    with pytest.raises(TypeError):
        Options(Option("a", int, 1, "x"), Option("a", float, 1.0, "x"))


def test_registry_entries_carry_their_options():
    reg = Registry("thing")
    opts = Options(Option("size", int, 3, "how big", low=1))
    reg.add("box", object, "a box", opts, paper="Someone 2020")
    reg.add("bag", object, "a bag")
    assert reg.entry("box").options is opts and reg.entry("box").paper == "Someone 2020"
    assert reg.entry("box").option_flags == "--size"
    assert list(reg.options_of_others("bag")) == ["thing box"]
    assert [n for n, _ in reg.declarations()["size"]] == ["box"]
    with pytest.raises(GradlabError, match="did you mean 'box'"):
        reg.entry("bxo")
