"""The dataset registry: one entry per loader (``gradlab list datasets`` reads it).

A loader is registered as ``DATASETS.add(name, loader, description, options)`` and called as
``loader(seed, data_dir, opts)`` with the full validated option dict; ``options`` names, as CLI
flags, exactly the options it uses, so :func:`gradlab.data.load_dataset` can reject the rest.
"""

from gradlab.core.registry import Registry

DATASETS = Registry("dataset")
