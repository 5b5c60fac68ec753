"""Conv/pool layer factories shared by the CNN and the ResNets, picked by input rank.

Image-shaped inputs ``(C, H, W)`` get 2-D layers; sequence-shaped inputs ``(C, L)`` (MNIST-1D)
get the 1-D ones, so the same model definitions serve both.
"""

from __future__ import annotations

from torch import nn

from gradlab.core.errors import GradlabError


def spatial_dims(model: str, input_shape) -> int:
    """2 for ``(C, H, W)``, 1 for ``(C, L)``; GradlabError for flat feature vectors."""
    if len(input_shape) not in (2, 3):
        raise GradlabError(
            f"model {model!r} needs image (C, H, W) or sequence (C, L) inputs; the data has shape "
            f"{tuple(input_shape)} (use mlp or logreg)"
        )
    return len(input_shape) - 1


def conv(nd: int, c_in: int, c_out: int, kernel: int, stride: int = 1, padding: int = 0, bias: bool = True) -> nn.Module:
    cls = nn.Conv2d if nd == 2 else nn.Conv1d
    return cls(c_in, c_out, kernel, stride=stride, padding=padding, bias=bias)


def max_pool(nd: int) -> nn.Module:
    return nn.MaxPool2d(2) if nd == 2 else nn.MaxPool1d(2)


def global_avg_pool(nd: int) -> nn.Module:
    return nn.AdaptiveAvgPool2d(1) if nd == 2 else nn.AdaptiveAvgPool1d(1)
