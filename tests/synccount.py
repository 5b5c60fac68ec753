"""Count the tensor operations that read device memory back to the host (tests only).

On a GPU each of these waits for every queued kernel: ``item``, ``float``/``int``/``bool`` of a
tensor, ``tolist``, ``cpu``/``numpy``, ``nonzero`` and indexing or assigning with a boolean mask
(its count must be known on the host). Counted through ``torch.overrides.TorchFunctionMode``,
so the same code that runs on a GPU is measured on the CPU.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.overrides import TorchFunctionMode

READS = {"item", "__float__", "__int__", "__bool__", "__index__", "tolist", "cpu", "numpy", "nonzero",
         "masked_select", "unique", "argwhere"}


def _bool_mask(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


class HostSyncs(TorchFunctionMode):
    """``with HostSyncs() as s: ...``; then ``s.count`` (total) and ``s.calls`` (by name)."""

    def __init__(self):
        super().__init__()
        self.calls: Counter = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in READS or (name in ("__getitem__", "__setitem__") and len(args) > 1 and _bool_mask(args[1])):
            self.calls[name] += 1
        return func(*args, **(kwargs or {}))

    @property
    def count(self) -> int:
        return sum(self.calls.values())
