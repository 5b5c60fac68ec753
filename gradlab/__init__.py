"""gradlab: see why neural-network training works or fails.

The core library: model zoo, datasets, optimizers, the curvature engine, probes and attacks.
It never imports the CLI framework and never prints; it returns data (dataclasses, tensors,
DataFrames) and raises :class:`gradlab.core.errors.GradlabError` for user mistakes.

Importing ``gradlab`` is cheap: submodules (and torch) load when used.
"""

__version__ = "0.1.0"

from gradlab.core.errors import GradlabError  # noqa: E402  (cheap, torch-free)

__all__ = ["GradlabError", "__version__"]
