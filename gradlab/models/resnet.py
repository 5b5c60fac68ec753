"""CIFAR ResNets and their plain twins (He et al. 2016, "Deep Residual Learning", Sec. 4.2).

``6n + 2`` weight layers: a 3x3 conv stem with 16 channels, three stages of ``n`` basic blocks
(two 3x3 convs each) with 16, 32 and 64 channels (the first block of stages 2 and 3 halves the
spatial size with stride 2), global average pooling, and a linear head. ``resnet20/32/56`` have
n = 3/5/9. ``plainXX`` is the very same definition with the skip connection switched off, so
with option-A shortcuts (parameter-free) a plain net has exactly its ResNet's parameters and
differs in forward only by the missing ``+ x``.

Shortcuts when the shape changes: option A (the paper's CIFAR choice) subsamples with stride 2
and zero-pads the new channels; option B uses a strided 1x1 conv + norm projection (plain nets
then have no projection, as in the paper, so they have fewer parameters than their ResNet).

Blocks for per-layer probes: the stem, each basic block, and the pooling. Shapes for a
``(N, 3, 32, 32)`` input: stem -> (N, 16, 32, 32) -> stage 2 (N, 32, 16, 16) -> stage 3
(N, 64, 8, 8) -> pool (N, 64) -> head (N, classes). 8x8 digits work (8 -> 4 -> 2), and
sequences ``(C, L)`` get 1-D convs.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gradlab.models.base import GradlabNet, Normalize
from gradlab.models.convs import conv, global_avg_pool, spatial_dims
from gradlab.core.options import Option, Options
from gradlab.models.options import ACT, INIT, NORM, SIGMA_B, SIGMA_W, init_weights, make_act, make_norm
from gradlab.models.registry import MODELS

WIDTHS = (16, 32, 64)
SHORTCUT = Option("shortcut", str, "A", "ResNet shortcut when the shape changes: A = identity + zero channels, "
                  "B = 1x1 conv projection", choices=("A", "B"), paper="He et al. 2016")
OPTIONS = Options(ACT, INIT, SIGMA_W, SIGMA_B, NORM, SHORTCUT)


class ShortcutA(nn.Module):
    """Parameter-free shortcut: stride-2 subsampling, then zero channels appended."""

    #: forward is piecewise linear in its input given its children (see gradlab.curvature.gauss_newton)
    gradlab_piecewise_linear = True

    def __init__(self, nd: int, extra_channels: int, stride: int):
        super().__init__()
        self.nd, self.extra, self.stride = nd, extra_channels, stride

    def forward(self, x: Tensor) -> Tensor:
        x = x[(Ellipsis,) + (slice(None, None, self.stride),) * self.nd]
        pad = x.new_zeros((x.shape[0], self.extra) + tuple(x.shape[2:]))
        return torch.cat([x, pad], dim=1)


class BasicBlock(nn.Module):
    """``act(norm(conv(act(norm(conv(x))))) + shortcut(x))``; with ``skip=False`` the ``+ shortcut(x)`` is dropped."""

    #: forward is piecewise linear in its input given its children (see gradlab.curvature.gauss_newton)
    gradlab_piecewise_linear = True

    def __init__(self, nd: int, c_in: int, c_out: int, stride: int, act: str, norm: str, shortcut: str, skip: bool):
        super().__init__()
        bias = norm == "none"
        self.conv1 = conv(nd, c_in, c_out, 3, stride=stride, padding=1, bias=bias)
        self.norm1 = make_norm(norm, c_out, nd)
        self.act1 = make_act(act)
        self.conv2 = conv(nd, c_out, c_out, 3, padding=1, bias=bias)
        self.norm2 = make_norm(norm, c_out, nd)
        self.act2 = make_act(act)
        self.skip = skip
        self.shortcut: nn.Module | None = None
        if skip:
            if stride == 1 and c_in == c_out:
                self.shortcut = nn.Identity()
            elif shortcut == "A":
                self.shortcut = ShortcutA(nd, c_out - c_in, stride)
            else:
                self.shortcut = nn.Sequential(conv(nd, c_in, c_out, 1, stride=stride, bias=bias), make_norm(norm, c_out, nd))

    def forward(self, x: Tensor) -> Tensor:
        out = self.norm2(self.conv2(self.act1(self.norm1(self.conv1(x)))))
        if self.skip:
            out = out + self.shortcut(x)
        return self.act2(out)

    def extra_repr(self) -> str:
        return f"skip={self.skip}"


class GlobalPool(nn.Module):
    """``(N, C, *spatial) -> (N, C)`` by averaging over space."""

    #: forward is piecewise linear in its input given its children (see gradlab.curvature.gauss_newton)
    gradlab_piecewise_linear = True

    def __init__(self, nd: int):
        super().__init__()
        self.pool = global_avg_pool(nd)

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(x).flatten(1)


def build_resnet(spec, opts: dict, *, layers: int, skip: bool) -> GradlabNet:
    """A ``layers = 6n + 2`` CIFAR ResNet (``skip=True``) or its plain twin (``skip=False``)."""
    name = f"{'resnet' if skip else 'plain'}{layers}"
    nd = spatial_dims(name, spec.input_shape)
    n = (layers - 2) // 6
    norm = "batch" if opts["norm"] == "auto" else opts["norm"]
    act = opts["act"]
    stem = nn.Sequential(
        conv(nd, spec.input_shape[0], WIDTHS[0], 3, padding=1, bias=norm == "none"),
        make_norm(norm, WIDTHS[0], nd),
        make_act(act),
    )
    blocks: list[nn.Module] = [stem]
    c_in = WIDTHS[0]
    for stage, c_out in enumerate(WIDTHS):
        for i in range(n):
            stride = 2 if stage > 0 and i == 0 else 1
            blocks.append(BasicBlock(nd, c_in, c_out, stride, act, norm, opts["shortcut"], skip))
            c_in = c_out
    blocks.append(GlobalPool(nd))
    net = GradlabNet(Normalize(spec.mean, spec.std), blocks, nn.Linear(WIDTHS[-1], spec.num_classes))
    init_weights(net, opts["init"], act, opts["sigma_w"], opts["sigma_b"])
    return net


def _register() -> None:
    for layers in (20, 32, 56):
        n = (layers - 2) // 6
        for skip, prefix, what in ((True, "resnet", "CIFAR ResNet"), (False, "plain", "plain twin (no skips) of resnet")):
            def builder(spec, opts, _layers=layers, _skip=skip):
                return build_resnet(spec, opts, layers=_layers, skip=_skip)

            label = f"{what}{layers}" if not skip else f"{what}-{layers} (He et al. 2016)"
            MODELS.add(f"{prefix}{layers}", builder, f"{label}: 3 stages x {n} blocks, widths 16/32/64",
                       options=OPTIONS, paper="He et al. 2016")


_register()
