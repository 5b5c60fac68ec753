"""Small synthetic classification problems, generated from the seed.

``kind``:

* ``moons``: two interleaving half circles (2-D, 2 classes); ``noise`` = std of Gaussian jitter.
* ``spirals``: ``n_classes`` interleaved Archimedean spiral arms (2-D); ``noise`` = jitter std
  relative to the outer radius 1.
* ``blobs``: ``n_classes`` isotropic Gaussian clusters in ``n_features`` dims, centres uniform
  in [-1, 1]^d; ``noise`` = cluster std.
* ``teacher-student``: inputs ``x ~ N(0, I_d)`` labelled by the argmax of a random teacher
  (one tanh hidden layer of 32 units, Gaussian weights with variance 1/fan_in), the classic
  student-teacher set-up (Gardner & Derrida 1989; Saad & Solla 1995); ``noise`` = probability
  that a label is replaced by a uniformly random class.

Inputs are min-max rescaled into [0, 1] with the training split's range (``input_shape (d,)``);
the split is stratified (``test_fraction``).
"""

from __future__ import annotations

import numpy as np

from gradlab.data.common import make_bundle, stratified_split, unit_rescale
from gradlab.core.options import Option, Options
from gradlab.data.options import MAX_TRAIN, N_SAMPLES, TEST_FRACTION
from gradlab.data.registry import DATASETS
from gradlab.core.errors import GradlabError

KINDS = ("moons", "spirals", "blobs", "teacher-student")


def _moons(rng, n, noise):
    t = rng.uniform(0, np.pi, n)
    y = rng.integers(0, 2, n)
    x = np.where(y[:, None] == 0, np.c_[np.cos(t), np.sin(t)], np.c_[1 - np.cos(t), 0.5 - np.sin(t)])
    return x + noise * rng.standard_normal((n, 2)), y


def _spirals(rng, n, noise, k):
    y = rng.integers(0, k, n)
    r = rng.uniform(0.05, 1.0, n)  # radius grows with the angle: 1.5 turns from centre to edge
    theta = 3 * np.pi * r + 2 * np.pi * y / k
    x = np.c_[r * np.cos(theta), r * np.sin(theta)]
    return x + noise * rng.standard_normal((n, 2)), y


def _blobs(rng, n, noise, k, d):
    centres = rng.uniform(-1, 1, (k, d))
    y = rng.integers(0, k, n)
    return centres[y] + noise * rng.standard_normal((n, d)), y


def _teacher_student(rng, n, noise, k, d):
    hidden = 32
    w1 = rng.standard_normal((d, hidden)) / np.sqrt(d)
    w2 = rng.standard_normal((hidden, k)) / np.sqrt(hidden)
    x = rng.standard_normal((n, d))
    y = np.argmax(np.tanh(x @ w1) @ w2, axis=1)
    flip = rng.random(n) < noise
    y[flip] = rng.integers(0, k, int(flip.sum()))
    return x, y


def load_synthetic(seed, data_dir, opts):
    kind, n, noise = opts["kind"], opts["n_samples"], opts["noise"]
    k, d = opts["n_classes"], opts["n_features"]
    if kind == "moons" and k != 2:
        raise GradlabError(f"invalid n_classes: {k} (kind moons has exactly 2 classes)")
    if kind in ("moons", "spirals") and d != 2:
        raise GradlabError(f"invalid n_features: {d} (kind {kind} is 2-D)")
    if kind == "teacher-student" and noise > 1:
        raise GradlabError(f"invalid noise: {noise} (for teacher-student it is a label-flip probability in [0, 1])")
    rng = np.random.default_rng(seed)
    if kind == "moons":
        x, y = _moons(rng, n, noise)
    elif kind == "spirals":
        x, y = _spirals(rng, n, noise, k)
    elif kind == "blobs":
        x, y = _blobs(rng, n, noise, k, d)
    else:
        x, y = _teacher_student(rng, n, noise, k, d)
    tr, te = stratified_split(y, opts["test_fraction"], seed)
    x_train, x_test = unit_rescale(x[tr], x[te])
    return make_bundle("synthetic", x_train, y[tr], x_test, y[te], k)


OPTIONS = Options(
    Option("kind", str, "moons", "synthetic problem", choices=KINDS),
    N_SAMPLES,
    Option("noise", float, 0.1, "jitter std (moons, spirals), cluster std (blobs) or label-flip probability "
           "(teacher-student)", low=0),
    Option("n_classes", int, 2, "classes: spiral arms, blobs or teacher outputs (moons: 2)", low=2),
    Option("n_features", int, 2, "input dimension of blobs and teacher-student (moons, spirals: 2)", low=1),
    TEST_FRACTION,
    MAX_TRAIN,
)
DATASETS.add(
    "synthetic",
    load_synthetic,
    "2-D/low-dim toy problems: moons, spirals, blobs, teacher-student (generated from the seed)",
    options=OPTIONS,
)
