"""Datasets: ``load_dataset(name, seed=0, data_dir=None, **opts) -> DataBundle``.

Registered (``gradlab list datasets``): ``digits`` (offline default), ``synthetic``, ``mnist``,
``fashion-mnist``, ``cifar10``, ``mnist1d``, ``imagefolder``. Every loader returns float32 inputs in [0, 1] of
shape ``(N, *input_shape)``, int64 labels, and the training split's mean/std (per channel for
images); splits are deterministic from ``seed``. With ``stream=true`` (cifar10, imagefolder) the
loader returns a :class:`~gradlab.data.stream.StreamingData` read batch by batch through a
``DataLoader`` (:mod:`gradlab.data.stream`).

Adding a dataset is one file that calls ``DATASETS.add(name, loader, description,
options=Options(...))`` (reusing the shared options of :mod:`gradlab.data.options`) plus one
import line below.
"""

from __future__ import annotations

from typing import Mapping

from gradlab.core.options import Options
from gradlab.data.base import DataBundle, DataSpec
from gradlab.data.common import limit_train
from gradlab.data.registry import DATASETS

# Registrations (import order = listing order).
from gradlab.data import digits as _digits  # noqa: F401,E402
from gradlab.data import synthetic as _synthetic  # noqa: E402
from gradlab.data import idx as _idx  # noqa: F401,E402
from gradlab.data import cifar as _cifar  # noqa: F401,E402
from gradlab.data import mnist1d as _mnist1d  # noqa: F401,E402
from gradlab.data import imagefolder as _imagefolder  # noqa: F401,E402

#: Every option a registered dataset declares (no two declare one name differently).
DATASET_OPTIONS = Options(*(opt for entry in DATASETS for opt in entry.options))
KINDS = _synthetic.KINDS

__all__ = ["DATASET_OPTIONS", "DATASETS", "DataBundle", "DataSpec", "dataset_option_names", "dataset_options",
           "dataset_options_in", "load_dataset"]


def dataset_options(name: str) -> Options:
    """The declared options of dataset ``name`` (GradlabError for an unknown name)."""
    return DATASETS.entry(name).options


def dataset_option_names(name: str) -> list[str]:
    """``["test_fraction", "max_train"]``: the option names dataset ``name`` takes."""
    return dataset_options(name).names()


def dataset_options_in(name: str, cfg: Mapping) -> dict:
    """The options of dataset ``name`` found in a flat config that holds every dataset option with
    its default (a train run's ``config.yaml``): its own, plus any other dataset's option set
    away from its default, which :func:`load_dataset` then rejects naming its owner."""
    own = dataset_options(name)
    return {k: v for k, v in cfg.items()
            if k in own or (k in DATASET_OPTIONS and v is not None and v != DATASET_OPTIONS[k].default)}


def load_dataset(name: str, seed: int = 0, data_dir=None, **opts) -> DataBundle:
    """Load dataset ``name`` split by ``seed``.

    Args:
        name: a registered dataset (see ``DATASETS.names()``).
        seed: fixes the split (and, for generated data, the samples themselves).
        data_dir: folder searched for downloaded files (mnist, fashion-mnist, cifar10); default
            ``$GRADLAB_DATA``, else ``~/.cache/gradlab``.
        **opts: the dataset's declared options (:func:`dataset_options`; missing ones take
            their defaults).
    Returns:
        A :class:`DataBundle` (inputs float32 in [0, 1], labels int64, train-split statistics).
    Raises:
        GradlabError: one line for an unknown name or option (with a "did you mean", or naming
            the dataset the option belongs to), a bad value, missing or corrupt files.
    """
    entry = DATASETS.entry(name)
    full = entry.options.resolve(opts, owner=f"dataset {name}", others=DATASETS.options_of_others(name))
    bundle = entry.obj(int(seed), data_dir, full)
    if getattr(bundle, "streamed", False):
        from gradlab.data.stream import limit_stream

        return limit_stream(bundle, full.get("max_train", 0), int(seed))
    return limit_train(bundle, full.get("max_train", 0), int(seed))
