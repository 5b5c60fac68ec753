"""Options several zoo models share, declared once, and the layers/initialisations they select.

Each model declares its options (``MODELS.register(..., options=Options(...))``) from the
:class:`~gradlab.core.options.Option` objects below plus its own (``depth`` and ``width`` in
:mod:`gradlab.models.mlp`, ``shortcut`` in :mod:`gradlab.models.resnet`), so a name has one
meaning across the zoo. Initialisations (applied to every ``Linear``/``Conv`` weight of a model,
head included):

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
from gradlab.core.options import Option

ACTIVATIONS = ("relu", "tanh", "linear", "gelu", "sigmoid")
INITS = ("default", "xavier", "kaiming", "orthogonal", "gaussian")
# "auto" = the model's standard normalisation: batch norm for the ResNets, none otherwise.
NORMS = ("auto", "none", "batch", "layer")

ACT = Option("act", str, "relu", "activation after every hidden layer", choices=ACTIVATIONS)
INIT = Option("init", str, "default", "weight initialisation of every linear and conv layer", choices=INITS,
              paper="Glorot & Bengio 2010; He et al. 2015; Saxe et al. 2014; Poole et al. 2016")
SIGMA_W = Option("sigma_w", float, 1.0, "weight scale for init gaussian (W ~ N(0, sigma_w^2/fan_in)) or "
                 "orthogonal (gain)", low=0, low_open=True, paper="Poole et al. 2016")
SIGMA_B = Option("sigma_b", float, 0.0, "bias std for init gaussian or orthogonal", low=0,
                 paper="Poole et al. 2016")
# Attacks have a `norm` of their own (the budget's, linf|l2): no command reads both (train's
# adversarial training takes adv_* keys), which tests/test_plugin_options.py checks.
NORM = Option("norm", str, "auto", "normalisation layers (auto: batch for the ResNets, none otherwise)",
              choices=NORMS, paper="Ioffe & Szegedy 2015; Ba et al. 2016")
DROPOUT = Option("dropout", float, 0.0, "dropout probability after every hidden dense layer", low=0, high=1,
                 high_open=True, paper="Srivastava et al. 2014")


def check_init_scale(opts: dict) -> None:
    """``sigma_w``/``sigma_b`` set away from their defaults with an init that ignores them: the
    user meant something else (they scale only the gaussian and orthogonal initialisations)."""
    if opts.get("init", INIT.default) in ("gaussian", "orthogonal"):
        return
    for opt in (SIGMA_W, SIGMA_B):
        value = opts.get(opt.name, opt.default)
        if value != opt.default:
            raise GradlabError(f"{opt.name}={value} only applies with init gaussian or orthogonal "
                               f"(init is {opts.get('init', INIT.default)!r})")


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
