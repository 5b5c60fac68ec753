"""scikit-learn's bundled 8x8 handwritten digits (the UCI optical digits test set; 1797 images).

The offline default dataset: no download, loads in milliseconds. Pixel values 0..16 are
divided by 16 into [0, 1]; inputs ``(N, 1, 8, 8)``; stratified seeded split (``test_fraction``,
default 20%, i.e. about 1437 train / 360 test).
"""

from __future__ import annotations

import numpy as np

from gradlab.data.common import make_bundle, stratified_split
from gradlab.core.options import Options
from gradlab.data.options import MAX_TRAIN, TEST_FRACTION
from gradlab.data.registry import DATASETS


def load_digits(seed, data_dir, opts):
    from sklearn.datasets import load_digits as sk_load_digits  # scikit-learn is slow to import

    raw = sk_load_digits()
    x = (raw.images.astype(np.float32) / 16.0)[:, None]  # (1797, 1, 8, 8)
    y = raw.target.astype(np.int64)
    tr, te = stratified_split(y, opts["test_fraction"], seed)
    return make_bundle("digits", x[tr], y[tr], x[te], y[te], 10)


DATASETS.add("digits", load_digits, "scikit-learn's bundled 8x8 handwritten digits (offline default)",
             options=Options(TEST_FRACTION, MAX_TRAIN), paper="Alpaydin & Kaynak 1998 (UCI optical digits)")
