"""MNIST-1D (Greydanus 2020, "Scaling down deep learning"), generated procedurally.

Ten hand-made 1-D digit templates of length 12 (the published values, below) are each
standardised, shifted to start at 0 and divided by 6. Every example then goes through the
published recipe with its default constants:

1. pad with ``p ~ U{36..60}`` zeros on the right, then linearly resample to length 12 + 60 = 72
   (so a longer pad means a narrower digit);
2. scale the amplitude by ``1 + 0.4 (u - 1/2)``, ``u ~ U(0, 1)``;
3. translate (circular shift right) by ``k ~ U{0..47}``;
4. replace the zero background by correlated noise (Gaussian noise of std 0.25 smoothed by a
   Gaussian filter with sigma 2), then add i.i.d. noise of std 0.02 everywhere;
5. shear: subtract ``c * linspace(-1/2, 1/2, 72)`` with ``c = 0.75 (u - 1/2)``;
6. linearly resample to the final length 40.

``n_samples // 10`` examples per class (default 5000 -> 4000 train / 1000 test as in the paper),
random draws from ``numpy.random.default_rng(seed)``: the same distribution as the published
set, not the same samples. Inputs are min-max rescaled into [0, 1] with the training range;
``input_shape`` ``(1, 40)``.
"""

from __future__ import annotations

import numpy as np

from gradlab.data.common import make_bundle, stratified_split, unit_rescale
from gradlab.core.options import Options
from gradlab.data.options import MAX_TRAIN, N_SAMPLES, TEST_FRACTION
from gradlab.data.registry import DATASETS

# Published template values (Greydanus 2020), digits 0..9, before standardisation.
_TEMPLATES = np.array(
    [
        [5, 6, 6.5, 6.75, 7, 7, 7, 7, 6.75, 6.5, 6, 5],
        [5, 3, 3, 3.4, 3.8, 4.2, 4.6, 5, 5.4, 5.8, 5, 5],
        [5, 6, 6.5, 6.5, 6, 5.25, 4.75, 4, 3.5, 3.5, 4, 5],
        [5, 6, 6.5, 6.5, 6, 5, 5, 6, 6.5, 6.5, 6, 5],
        [5, 4.4, 3.8, 3.2, 2.6, 2.6, 5, 5, 5, 5, 5, 5],
        [5, 3, 3, 3, 3, 5, 6, 6.5, 6.5, 6, 4.5, 5],
        [5, 4, 3.5, 3.25, 3, 3, 3, 3, 3.25, 3.5, 4, 5],
        [5, 7, 7, 6.6, 6.2, 5.8, 5.4, 5, 4.6, 4.2, 5, 5],
        [5, 4, 3.5, 3.5, 4, 5, 5, 4, 3.5, 3.5, 4, 5],
        [5, 4, 3.5, 3.5, 4, 5, 5, 5, 5, 4.7, 4.3, 5],
    ]
)
PADDING = (36, 60)
SCALE_COEFF = 0.4
MAX_TRANSLATION = 48
CORR_NOISE, IID_NOISE = 0.25, 0.02
SHEAR_SCALE = 0.75
LENGTH = 40


def templates() -> np.ndarray:
    """``(10, 12)`` templates: standardised per digit, starting at 0, divided by 6."""
    t = _TEMPLATES - _TEMPLATES.mean(1, keepdims=True)
    t = t / t.std(1, keepdims=True)
    return (t - t[:, :1]) / 6.0


def _resample_rows(x: np.ndarray, lengths: np.ndarray, n_out: int) -> np.ndarray:
    """Linearly resample row ``i``'s first ``lengths[i]`` entries onto ``n_out`` evenly spaced points.

    ``x``: ``(n, m)`` with ``lengths <= m``; returns ``(n, n_out)``. Both grids span the same
    interval, so output point ``j`` sits at source position ``j / (n_out - 1) * (lengths - 1)``.
    """
    pos = np.linspace(0, 1, n_out)[None, :] * (lengths[:, None] - 1)  # (n, n_out)
    lo = np.minimum(np.floor(pos).astype(np.int64), lengths[:, None] - 2)
    frac = pos - lo
    rows = np.arange(len(x))[:, None]
    return (1 - frac) * x[rows, lo] + frac * x[rows, lo + 1]


def generate(n_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(x (10 * n_per_class, 40) float64, y int64)`` following the recipe in the module docstring."""
    from scipy.ndimage import gaussian_filter1d

    rng = np.random.default_rng(seed)
    base = templates()
    y = np.repeat(np.arange(10), n_per_class)
    n, wide = len(y), base.shape[1] + PADDING[1]
    pads = rng.integers(PADDING[0], PADDING[1] + 1, n)
    # Template then zero padding, laid out in a (n, wide) array; row i's signal is 12 + pads[i] long.
    # 1e-8 keeps the digit's own zeros distinguishable from the padding (background) zeros.
    padded = np.zeros((n, wide))
    padded[:, : base.shape[1]] = base[y] + 1e-8
    x = _resample_rows(padded, base.shape[1] + pads, wide)  # dilate: longer pad -> narrower digit
    x *= 1 + SCALE_COEFF * (rng.random((n, 1)) - 0.5)
    shifts = rng.integers(0, MAX_TRANSLATION, n)
    x = x[np.arange(n)[:, None], (np.arange(wide)[None, :] - shifts[:, None]) % wide]  # roll right
    background = gaussian_filter1d(CORR_NOISE * rng.standard_normal((n, wide)), sigma=2, axis=1)
    x = np.where(x != 0, x, background) + IID_NOISE * rng.standard_normal((n, wide))
    x -= SHEAR_SCALE * (rng.random((n, 1)) - 0.5) * np.linspace(-0.5, 0.5, wide)[None, :]
    return _resample_rows(x, np.full(n, wide), LENGTH), y


def load_mnist1d(seed, data_dir, opts):
    x, y = generate(opts["n_samples"] // 10, seed)
    tr, te = stratified_split(y, opts["test_fraction"], seed)
    x_train, x_test = unit_rescale(x[tr], x[te])
    return make_bundle("mnist1d", x_train[:, None], y[tr], x_test[:, None], y[te], 10)


DATASETS.add(
    "mnist1d",
    load_mnist1d,
    "MNIST-1D (Greydanus 2020): 10 classes of length-40 signals, generated from the seed",
    options=Options(N_SAMPLES, TEST_FRACTION, MAX_TRAIN),
    paper="Greydanus 2020",
)
