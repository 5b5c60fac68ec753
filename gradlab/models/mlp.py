"""Logistic regression and the fully connected network (the default ``gradlab train`` model).

Shapes: input ``(N, *input_shape)`` in [0, 1]; the first block flattens it to ``(N, d)`` with
``d = prod(input_shape)``; each hidden block maps ``(N, d_in) -> (N, width)``; the head maps
``(N, width) -> (N, num_classes)`` logits.
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from gradlab.models.base import GradlabNet, Normalize
from gradlab.core.options import Option, Options
from gradlab.models.options import ACT, DROPOUT, INIT, NORM, SIGMA_B, SIGMA_W, init_weights, make_act, make_norm
from gradlab.models.registry import MODELS


class DenseBlock(nn.Module):
    """One hidden layer ``dropout(act(norm(W h + b)))``, optionally residual: ``h + scale * f(h)``.

    ``scale`` (``--residual-scale``, eps) scales the residual branch, so the block's Jacobian is
    ``I + eps A`` with ``A`` the branch's Jacobian (eps = 0: the identity). The residual form (as in He et al. 2016, for fully connected layers) is used only when the
    input and output widths match; the first block (input dim -> width) usually stays plain.
    ``flatten`` makes the block accept image-shaped input (the first block of an MLP).
    """

    #: forward is piecewise linear in its input given its children (see gradlab.curvature.gauss_newton)
    gradlab_piecewise_linear = True

    def __init__(self, d_in: int, d_out: int, act: str, norm: str, dropout: float, residual: bool, flatten: bool,
                 scale: float = 1.0):
        super().__init__()
        self.flatten = flatten
        self.residual = residual and d_in == d_out
        self.scale = float(scale)
        layers = [nn.Linear(d_in, d_out), make_norm(norm, d_out, 0), make_act(act)]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        self.f = nn.Sequential(*layers)

    def forward(self, h: Tensor) -> Tensor:
        if self.flatten:
            h = h.flatten(1)  # (N, *input_shape) -> (N, d)
        out = self.f(h)
        if not self.residual:
            return out
        return h + out if self.scale == 1.0 else h + self.scale * out

    def extra_repr(self) -> str:
        scale = f", scale={self.scale:g}" if self.residual and self.scale != 1.0 else ""
        return f"residual={self.residual}{scale}, flatten={self.flatten}"


def _in_features(spec) -> int:
    return math.prod(spec.input_shape)


def build_logreg(spec, opts: dict) -> GradlabNet:
    """Multinomial logistic regression: no hidden blocks, head = flatten + linear."""
    head = nn.Sequential(nn.Flatten(1), nn.Linear(_in_features(spec), spec.num_classes))
    net = GradlabNet(Normalize(spec.mean, spec.std), [], head)
    init_weights(net, opts["init"], "linear", opts["sigma_w"], opts["sigma_b"])
    return net


def build_mlp(spec, opts: dict) -> GradlabNet:
    """``depth`` hidden :class:`DenseBlock` s of ``width`` units, then a linear head
    (``residual_scale`` given: residual blocks ``h + eps f(h)``)."""
    norm = "none" if opts["norm"] == "auto" else opts["norm"]
    blocks, d_in = [], _in_features(spec)
    eps = opts.get("residual_scale")
    residual = opts["residual"] or eps is not None
    for i in range(opts["depth"]):
        blocks.append(DenseBlock(d_in, opts["width"], opts["act"], norm, opts["dropout"], residual, i == 0,
                                 scale=1.0 if eps is None else eps))
        d_in = opts["width"]
    net = GradlabNet(Normalize(spec.mean, spec.std), blocks, nn.Linear(d_in, spec.num_classes))
    init_weights(net, opts["init"], opts["act"], opts["sigma_w"], opts["sigma_b"])
    return net


DEPTH = Option("depth", int, 2, "MLP hidden layers", low=1)
WIDTH = Option("width", int, 128, "MLP hidden units per layer", low=1)
RESIDUAL = Option("residual", bool, False, "MLP skip connections h + f(h) for every hidden block whose widths match",
                  paper="He et al. 2016")
RESIDUAL_SCALE = Option("residual_scale", float, None, "MLP residual blocks h + eps*f(h) with this eps (implies "
                        "--residual; 0: identity blocks; default 1 with --residual)", low=0)

MODELS.add("logreg", build_logreg, "multinomial logistic regression (a single linear layer)",
           options=Options(INIT, SIGMA_W, SIGMA_B))
MODELS.add("mlp", build_mlp, "fully connected net: depth hidden layers of width units",
           options=Options(DEPTH, WIDTH, ACT, INIT, SIGMA_W, SIGMA_B, RESIDUAL, RESIDUAL_SCALE, NORM, DROPOUT))
