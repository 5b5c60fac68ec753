"""The shape every zoo model shares, so probes can walk it without special cases.

A zoo model is a :class:`GradlabNet`::

    logits = head(blocks[-1](...blocks[0](normalize(x))))

* ``normalize``: a fixed (non-trainable) first layer holding the dataset's mean and std, so every
  model takes inputs in [0, 1] and attacks work in pixel space.
* ``blocks``: the units whose input->output maps the per-layer Jacobian probe studies (a hidden
  layer of an MLP, a residual block of a ResNet, ...).
* ``head``: the final map to logits.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn


class Normalize(nn.Module):
    """``(x - mean) / std`` with per-channel (or scalar) constants stored as buffers."""

    #: forward is piecewise linear in its input given its children (see gradlab.curvature.gauss_newton)
    gradlab_piecewise_linear = True

    def __init__(self, mean: Sequence[float], std: Sequence[float], channel_dim_size: int | None = None):
        super().__init__()
        mean_t = torch.as_tensor(list(mean), dtype=torch.float32)
        std_t = torch.as_tensor(list(std), dtype=torch.float32)
        if mean_t.numel() > 1:  # per channel: broadcast over (N, C, H, W)
            mean_t = mean_t.view(1, -1, 1, 1)
            std_t = std_t.view(1, -1, 1, 1)
        self.register_buffer("mean", mean_t)
        self.register_buffer("std", std_t)

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


class GradlabNet(nn.Module):
    """``normalize -> blocks -> head``; see the module docstring."""

    #: forward is piecewise linear in its input given its children (see gradlab.curvature.gauss_newton)
    gradlab_piecewise_linear = True

    def __init__(self, normalize: nn.Module, blocks: Sequence[nn.Module], head: nn.Module):
        super().__init__()
        self.normalize = normalize
        self.blocks = nn.ModuleList(blocks)
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_from(self.normalize(x), 0)

    def forward_from(self, h: Tensor, start: int) -> Tensor:
        """Run blocks ``start..`` and the head on an already normalised/intermediate input."""
        for block in self.blocks[start:]:
            h = block(h)
        return self.head(h)

    def block_inputs(self, x: Tensor) -> list[Tensor]:
        """Inputs to every block and to the head: ``[normalize(x), block0(...), ...]`` (len = n_blocks + 1)."""
        h = self.normalize(x)
        acts = [h]
        for block in self.blocks:
            h = block(h)
            acts.append(h)
        return acts
