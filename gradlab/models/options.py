"""Model options: their defaults, validation, and the layers/initialisations they select.

Every zoo builder receives the full, validated option dict (:data:`MODEL_DEFAULTS` filled in).
Initialisations (applied to every ``Linear``/``Conv`` weight of a model, head included):

* ``default``: PyTorch's own (uniform, Kaiming-style with ``a=sqrt(5)``).
* ``xavier``: Glorot & Bengio 2010, uniform, gain 1; biases 0.
* ``kaiming``: He et al. 2015, normal, fan-in mode, gain of the activation; biases 0.
* ``orthogonal``: Saxe et al. 2014: ``W = sigma_w * Q`` with ``Q`` (semi-)orthogonal over the
  flattened ``(out, in*k*k)`` matrix (Pennington et al. 2017 scale it by ``sigma_w``);
  biases ~ N(0, sigma_b^2).
* ``gaussian``: the mean-field initialisation of Poole et al. 2016 / Schoenholz et al. 2017:
  ``W_ij ~ N(0, sigma_w^2 / fan_in)``, ``b_i ~ N(0, sigma_b^2)``, ``fan_in = in * k*k``.

Randomness comes from torch's global generator: seed it before building.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from gradlab.core.errors import GradlabError

ACTIVATIONS = ("relu", "tanh", "linear", "gelu", "sigmoid")
INITS = ("default", "xavier", "kaiming", "orthogonal", "gaussian")
# "auto" = the model's standard normalisation: batch norm for the ResNets, none otherwise.
NORMS = ("auto", "none", "batch", "layer")
SHORTCUTS = ("A", "B")  # He et al. 2016: A = identity + zero-padding, B = 1x1 projection

MODEL_DEFAULTS: dict = {
    "depth": 2,  # MLP hidden layers
    "width": 128,  # MLP hidden units per layer
    "act": "relu",
    "init": "default",
    "sigma_w": 1.0,  # weight scale for init=gaussian|orthogonal
    "sigma_b": 0.0,  # bias std for init=gaussian|orthogonal
    "residual": False,  # MLP: h + f(h) for every hidden block whose shapes match
    "norm": "auto",
    "dropout": 0.0,
    "shortcut": "A",  # ResNets: option A (parameter-free) or B (1x1 projections)
}

_CHOICES = {"act": ACTIVATIONS, "init": INITS, "norm": NORMS, "shortcut": SHORTCUTS}


def _check_int(key: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) and not (
        isinstance(value, float) and value.is_integer()
    ):
        raise GradlabError(f"invalid {key}: {value!r} (must be an integer >= {low})")
    if int(value) < low:
        raise GradlabError(f"invalid {key}: {value} (must be >= {low})")
    return int(value)


def _check_float(key: str, value, *, low: float, low_inclusive: bool, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise GradlabError(f"invalid {key}: {value!r} (must be a finite number)")
    ok_low = value >= low if low_inclusive else value > low
    ok_high = high is None or value < high
    if not (ok_low and ok_high):
        rng = f"{'>=' if low_inclusive else '>'} {low}" + (f" and < {high}" if high is not None else "")
        raise GradlabError(f"invalid {key}: {value} (must be {rng})")
    return float(value)


def resolve_options(opts: dict) -> dict:
    """Fill defaults into ``opts`` and validate every value; GradlabError on the first bad one."""
    unknown = sorted(set(opts) - set(MODEL_DEFAULTS))
    if unknown:
        raise GradlabError(
            f"unknown model option {unknown[0]!r}; valid options: {', '.join(MODEL_DEFAULTS)}"
        )
    out = {**MODEL_DEFAULTS, **opts}
    for key, choices in _CHOICES.items():
        if out[key] not in choices:
            raise GradlabError(f"invalid {key}: {out[key]!r}; choose from: {', '.join(choices)}")
    out["depth"] = _check_int("depth", out["depth"], 1)
    out["width"] = _check_int("width", out["width"], 1)
    out["sigma_w"] = _check_float("sigma_w", out["sigma_w"], low=0.0, low_inclusive=False)
    out["sigma_b"] = _check_float("sigma_b", out["sigma_b"], low=0.0, low_inclusive=True)
    out["dropout"] = _check_float("dropout", out["dropout"], low=0.0, low_inclusive=True, high=1.0)
    if not isinstance(out["residual"], bool):
        raise GradlabError(f"invalid residual: {out['residual']!r} (must be true or false)")
    if out["init"] not in ("gaussian", "orthogonal"):
        for key in ("sigma_w", "sigma_b"):
            if out[key] != MODEL_DEFAULTS[key]:
                raise GradlabError(
                    f"{key}={out[key]} only applies with init gaussian or orthogonal (init is {out['init']!r})"
                )
    return out


def check_applicable(model: str, opts: dict, used: set[str]) -> None:
    """Reject an option the model would silently ignore (set away from its default)."""
    for key, value in opts.items():
        if key not in used and value != MODEL_DEFAULTS[key]:
            valid = ", ".join(sorted(used)) or "none"
            raise GradlabError(f"option {key}={value!r} does not apply to model {model!r} (its options: {valid})")


def make_act(name: str) -> nn.Module:
    """A fresh activation module (never in-place: probes take double-backward through it)."""
    return {"relu": nn.ReLU, "tanh": nn.Tanh, "linear": nn.Identity, "gelu": nn.GELU, "sigmoid": nn.Sigmoid}[
        name
    ]()


def make_norm(kind: str, channels: int, spatial_dims: int) -> nn.Module:
    """Normalisation after a linear map (``spatial_dims=0``) or a 1-D/2-D convolution.

    ``layer`` on conv features is GroupNorm with one group (normalise over C and space per sample).
    """
    if kind == "none":
        return nn.Identity()
    if kind == "layer":
        return nn.LayerNorm(channels) if spatial_dims == 0 else nn.GroupNorm(1, channels)
    return {0: nn.BatchNorm1d, 1: nn.BatchNorm1d, 2: nn.BatchNorm2d}[spatial_dims](channels)


_KAIMING_NONLIN = {"relu": "relu", "gelu": "relu", "tanh": "tanh", "sigmoid": "sigmoid", "linear": "linear"}


@torch.no_grad()
def init_weights(model: nn.Module, init: str, act: str, sigma_w: float, sigma_b: float) -> None:
    """Re-initialise every Linear/Conv layer of ``model`` in place (see the module docstring)."""
    if init == "default":
        return
    for m in model.modules():
        if not isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            continue
        w, b = m.weight, m.bias
        if init == "xavier":
            nn.init.xavier_uniform_(w)
        elif init == "kaiming":
            nn.init.kaiming_normal_(w, mode="fan_in", nonlinearity=_KAIMING_NONLIN[act])
        elif init == "orthogonal":
            nn.init.orthogonal_(w, gain=sigma_w)
        else:  # gaussian
            fan_in = w[0].numel()  # in_features, or in_channels * kernel size
            nn.init.normal_(w, 0.0, sigma_w / math.sqrt(fan_in))
        if b is not None:
            if init in ("orthogonal", "gaussian") and sigma_b > 0:
                nn.init.normal_(b, 0.0, sigma_b)
            else:
                nn.init.zeros_(b)
