"""The model registry: one entry per zoo model (``gradlab list models`` reads it).

A builder is registered as ``MODELS.add(name, builder, description, options)`` where ``options``
names, as CLI flags, exactly the options the model uses (``"--depth --width --act"``):
:func:`gradlab.models.build_model` reads that string to reject options that would be silently
ignored.
"""

from gradlab.core.registry import Registry

MODELS = Registry("model")


def used_options(options: str) -> set[str]:
    """``"--sigma-w --depth"`` -> ``{"sigma_w", "depth"}`` (flag spelling -> option key)."""
    return {tok.lstrip("-").replace("-", "_") for tok in options.split() if tok.startswith("--")}
