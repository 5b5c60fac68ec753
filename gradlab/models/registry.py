"""The model registry: one entry per zoo model (``gradlab list models`` reads it).

A builder is registered with its options declared once::

    MODELS.add(name, builder, description, options=Options(ACT, INIT, ...), paper="...")

and called as ``builder(spec, opts)`` with exactly its declared options, checked and with the
defaults filled in (:func:`gradlab.models.build_model`). Options several models share (``act``,
``init``, ``sigma_w``, ...) are the :class:`~gradlab.core.options.Option` objects of
:mod:`gradlab.models.options`, so a name means the same in every model.
"""

from gradlab.core.registry import Registry

MODELS = Registry("model")
