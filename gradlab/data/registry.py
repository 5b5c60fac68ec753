"""The dataset registry: one entry per loader (``gradlab list datasets`` reads it).

A loader is registered as ``DATASETS.add(name, loader, description, options=Options(...))``
and called as ``loader(seed, data_dir, opts)`` with exactly its declared options, checked and
with the defaults filled in (:func:`gradlab.data.load_dataset` rejects any other).
"""

from gradlab.core.registry import Registry

DATASETS = Registry("dataset")
