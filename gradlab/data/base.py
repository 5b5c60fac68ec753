"""What every dataset loader returns."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class DataBundle:
    """A dataset held in memory, split deterministically from the seed.

    Inputs are float32 in [0, 1] with shape ``(N, *input_shape)``; labels are int64 in
    ``[0, num_classes)``. ``mean``/``std`` (one value, or one per channel) feed the model's fixed
    normalisation layer. ``notes`` are one-line messages for the user (e.g. "only the test-set
    files were found; split them 80/20").
    """

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    input_shape: tuple
    num_classes: int
    mean: list
    std: list
    notes: list = field(default_factory=list)

    @property
    def spec(self) -> "DataSpec":
        return DataSpec(self.name, tuple(self.input_shape), self.num_classes, list(self.mean), list(self.std))


@dataclass(frozen=True)
class DataSpec:
    """What a model builder needs to know about the data."""

    name: str
    input_shape: tuple
    num_classes: int
    mean: list
    std: list
