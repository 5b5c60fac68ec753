"""Datasets: ``load_dataset(name, seed=0, data_dir=None, **opts) -> DataBundle``.

Registered (``gradlab list datasets``): ``digits`` (offline default), ``synthetic``, ``mnist``,
``fashion-mnist``, ``cifar10``, ``mnist1d``. Every loader returns float32 inputs in [0, 1] of
shape ``(N, *input_shape)``, int64 labels, and the training split's mean/std (per channel for
images); splits are deterministic from ``seed``.

Adding a dataset is one file that calls ``DATASETS.add(...)`` plus one import line below.
"""

from __future__ import annotations

import math

from gradlab.data.base import DataBundle, DataSpec
from gradlab.data.common import limit_train
from gradlab.data.registry import DATASETS
from gradlab.core.errors import GradlabError

# Registrations (import order = listing order).
from gradlab.data import digits as _digits  # noqa: F401,E402
from gradlab.data import synthetic as _synthetic  # noqa: E402
from gradlab.data import idx as _idx  # noqa: F401,E402
from gradlab.data import cifar as _cifar  # noqa: F401,E402
from gradlab.data import mnist1d as _mnist1d  # noqa: F401,E402

__all__ = ["DATASETS", "DATASET_DEFAULTS", "DataBundle", "DataSpec", "load_dataset"]

DATASET_DEFAULTS: dict = {
    "test_fraction": 0.2,  # held-out share where the data has no official split
    "n_samples": 5000,  # synthetic and mnist1d: examples generated (train + test)
    "noise": 0.1,  # synthetic: jitter std (moons/spirals), cluster std (blobs), label-flip prob (teacher-student)
    "kind": "moons",  # synthetic: moons|spirals|blobs|teacher-student
    "n_classes": 2,  # synthetic: classes (spirals arms, blobs, teacher outputs)
    "n_features": 2,  # synthetic: input dimension (blobs, teacher-student)
    "max_train": 0,  # keep at most this many training examples (seeded subset); 0 = all
    "download": True,  # mnist/fashion-mnist/cifar10: fetch missing files
}
KINDS = _synthetic.KINDS


def _int(key: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or float(value) != int(value):
        raise GradlabError(f"invalid {key}: {value!r} (must be an integer >= {low})")
    if value < low:
        raise GradlabError(f"invalid {key}: {value} (must be >= {low})")
    return int(value)


def _number(key: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise GradlabError(f"invalid {key}: {value!r} (must be a finite number)")
    return float(value)


def resolve_options(opts: dict) -> dict:
    """Fill defaults into ``opts`` and validate every value; GradlabError on the first bad one."""
    unknown = sorted(set(opts) - set(DATASET_DEFAULTS))
    if unknown:
        raise GradlabError(f"unknown dataset option {unknown[0]!r}; valid options: {', '.join(DATASET_DEFAULTS)}")
    out = {**DATASET_DEFAULTS, **opts}
    out["test_fraction"] = _number("test_fraction", out["test_fraction"])
    if not 0 < out["test_fraction"] < 1:
        raise GradlabError(f"invalid test_fraction: {out['test_fraction']} (must be > 0 and < 1)")
    out["n_samples"] = _int("n_samples", out["n_samples"], 20)
    out["noise"] = _number("noise", out["noise"])
    if out["noise"] < 0:
        raise GradlabError(f"invalid noise: {out['noise']} (must be >= 0)")
    if out["kind"] not in KINDS:
        raise GradlabError(f"invalid kind: {out['kind']!r}; choose from: {', '.join(KINDS)}")
    out["n_classes"] = _int("n_classes", out["n_classes"], 2)
    out["n_features"] = _int("n_features", out["n_features"], 1)
    out["max_train"] = _int("max_train", out["max_train"], 0)
    if not isinstance(out["download"], bool):
        raise GradlabError(f"invalid download: {out['download']!r} (must be true or false)")
    return out


def load_dataset(name: str, seed: int = 0, data_dir=None, **opts) -> DataBundle:
    """Load dataset ``name`` split by ``seed``.

    Args:
        name: a registered dataset (see ``DATASETS.names()``).
        seed: fixes the split (and, for generated data, the samples themselves).
        data_dir: folder searched for downloaded files (mnist, fashion-mnist, cifar10); default
            ``$GRADLAB_DATA``, else ``~/.cache/gradlab``.
        **opts: any of :data:`DATASET_DEFAULTS`.
    Returns:
        A :class:`DataBundle` (inputs float32 in [0, 1], labels int64, train-split statistics).
    Raises:
        GradlabError: unknown name/option, bad value, an option set away from its default that
            the dataset does not use, missing or corrupt files.
    """
    entry = DATASETS.entry(name)
    full = resolve_options(opts)
    used = {tok.lstrip("-").replace("-", "_") for tok in entry.option_flags.split()}
    for key, value in full.items():
        if key not in used and value != DATASET_DEFAULTS[key]:
            raise GradlabError(
                f"option {key}={value!r} does not apply to dataset {name!r} (its options: {', '.join(sorted(used))})"
            )
    bundle = entry.obj(int(seed), data_dir, full)
    return limit_train(bundle, full["max_train"], int(seed))
