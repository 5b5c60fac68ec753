"""LeNet-5 style convolutional net (LeCun et al. 1998), adapted to the input size.

Blocks: two conv stages (5x5 conv with 6 then 16 channels -> norm -> act -> 2x2 max-pool) and
two fully connected hidden layers (120 and 84 units); head: linear to the logits.

Sizes: the first conv is padded ("same", as LeNet-5's 32x32 input is MNIST's 28x28 padded by 2);
the second is unpadded when the map is at least 10 wide (28x28 MNIST: 28 -> 14 -> 10 -> 5, the
classic 16x5x5) and padded otherwise (8x8 digits: 8 -> 4 -> 4 -> 2). A pool is skipped when the
map is already 1 wide. Sequences ``(C, L)`` get the same layers in 1-D.
"""

from __future__ import annotations

import torch
from torch import nn

from gradlab.models.base import GradlabNet, Normalize
from gradlab.models.convs import conv, max_pool, spatial_dims
from gradlab.models.mlp import DenseBlock
from gradlab.core.options import Options
from gradlab.models.options import ACT, DROPOUT, INIT, NORM, SIGMA_B, SIGMA_W, init_weights, make_act, make_norm
from gradlab.models.registry import MODELS


def _stage(nd: int, c_in: int, c_out: int, size: int, padding: int, norm: str, act: str) -> tuple[nn.Module, int]:
    """conv -> norm -> act [-> pool]; returns the stage and the output spatial size (min over axes)."""
    size = size + 2 * padding - 4
    layers = [conv(nd, c_in, c_out, 5, padding=padding, bias=norm == "none"), make_norm(norm, c_out, nd), make_act(act)]
    if size >= 2:
        layers.append(max_pool(nd))
        size //= 2
    return nn.Sequential(*layers), size


def build_cnn(spec, opts: dict) -> GradlabNet:
    nd = spatial_dims("cnn", spec.input_shape)
    norm = "none" if opts["norm"] == "auto" else opts["norm"]
    act = opts["act"]
    c_in, size = spec.input_shape[0], min(spec.input_shape[1:])
    stage1, size = _stage(nd, c_in, 6, size, 2, norm, act)
    stage2, size = _stage(nd, 6, 16, size, 0 if size >= 10 else 2, norm, act)
    # The flattened size is measured rather than computed, so non-square inputs work too.
    with torch.no_grad():
        probe = torch.zeros(1, *spec.input_shape)
        flat = stage2.eval()(stage1.eval()(probe)).numel()
    fc1 = DenseBlock(flat, 120, act, norm, opts["dropout"], False, flatten=True)
    fc2 = DenseBlock(120, 84, act, norm, opts["dropout"], False, flatten=False)
    net = GradlabNet(Normalize(spec.mean, spec.std), [stage1, stage2, fc1, fc2], nn.Linear(84, spec.num_classes))
    net.train()
    init_weights(net, opts["init"], act, opts["sigma_w"], opts["sigma_b"])
    return net


MODELS.add(
    "cnn",
    build_cnn,
    "LeNet-5 style CNN: two 5x5 conv stages, two hidden dense layers (images or 1-D sequences)",
    options=Options(ACT, INIT, SIGMA_W, SIGMA_B, NORM, DROPOUT),
    paper="LeCun et al. 1998",
)
