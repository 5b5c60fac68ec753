"""The Morse index -- the fraction of negative Hessian eigenvalues -- from an SLQ density, the
one implementation every command uses (``gradlab probe hessian --density``, its ``--per-layer``
blocks and the training-time ``--probe hessian:density=true``).

It is counted with the Gauss-Radau rule that has a node prescribed at 0
(:meth:`gradlab.curvature.density.DensityResult.fraction_bracketed`): each start's share of the
spectrum below 0 lies exactly between the Radau weight below 0 and that plus the weight at 0 (the
Chebyshev-Markov-Stieltjes bracket). Ritz values within ``ZERO_TOL`` (relative to the largest
node) of 0 are numerically zero eigenvalues and count as ambiguous, so they count half in the
value. :func:`morse_index` gives

* ``morse_index``: the midpoint of each start's bracket, averaged over the starts;
* ``morse_index_stderr``: its standard error over the starts (NaN with one start);
* ``morse_index_low`` / ``morse_index_high``: the mean bracket widened by two standard errors;
* ``morse_index_error``: the reported error of the value, half the quadrature's ambiguous weight
  plus two standard errors.

The older Gauss count (the weight of the Lanczos nodes below 0) has no bracket and is biased by
the node nearest 0. A density without its tridiagonals (from the dense spectrum, ``--exact``)
falls back to it, which there is the exact count (every node is an eigenvalue).
"""

from __future__ import annotations

import math

ZERO_TOL = 1e-6  # Ritz values within this fraction of the largest |node| of 0 count as zero
KEYS = ("morse_index", "morse_index_stderr", "morse_index_low", "morse_index_high", "morse_index_error")


def morse_fraction(density):
    """The :class:`~gradlab.curvature.density.SpectralFraction` of ``density`` below 0 (the
    module docstring's rule)."""
    return density.fraction_bracketed(0.0, zero_tol=ZERO_TOL * float(density.nodes.abs().max()))


def morse_index(density) -> dict:
    """``{key: float}`` for the :data:`KEYS` of the module docstring."""
    m = morse_fraction(density)
    spread = 2 * m.std_error if m.starts > 1 and math.isfinite(m.std_error) else 0.0
    return {"morse_index": m.value, "morse_index_stderr": m.std_error, "morse_index_low": m.low,
            "morse_index_high": m.high, "morse_index_error": 0.5 * m.ambiguous + spread}


__all__ = ["KEYS", "ZERO_TOL", "morse_fraction", "morse_index"]
