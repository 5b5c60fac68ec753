"""``--precision fp32|bf16|fp16``: the one declaration and the autocast helpers behind it.

Training (:mod:`gradlab.training.precision`), attacks (:class:`gradlab.attacks.base.Attack`) and
landscape evaluation (grids, curves, simplexes) take the same option. In every case only the
model's forward pass runs under ``torch.autocast`` (matrix products and convolutions in the low
precision, reductions and losses in float32 as autocast decides); what the caller accumulates
(perturbations, projections, losses summed over batches, curvature) stays in float32 or float64:
:func:`gradlab.core.autocast.upcast` casts a low-precision output back before anyone uses it.
"""

from __future__ import annotations

from gradlab.core.options import Option

PRECISIONS = ("fp32", "bf16", "fp16")


def precision_option(help: str) -> Option:
    """The ``precision`` option (one name, one set of choices) with a command's own help."""
    return Option("precision", str, "fp32", help, choices=PRECISIONS)


__all__ = ["PRECISIONS", "precision_option"]
