"""The model zoo: ``build_model(name, spec, **opts)`` and the ``MODELS`` registry.

Zoo models (``gradlab list models``): ``logreg``, ``mlp``, ``cnn``, ``resnet20/32/56`` and their
``plain20/32/56`` twins; each is a :class:`~gradlab.models.base.GradlabNet` taking inputs in
[0, 1] with the data's normalisation as a fixed first layer. ``name`` may also be a user model
``package.module:factory`` (see :mod:`gradlab.models.user`).

Adding a model is one file that calls ``MODELS.add(...)`` plus one import line below.
"""

from __future__ import annotations

from torch import nn

from gradlab.core.errors import GradlabError
from gradlab.models.base import GradlabNet, Normalize
from gradlab.models.options import ACTIVATIONS, INITS, MODEL_DEFAULTS, NORMS, SHORTCUTS, check_applicable, resolve_options
from gradlab.models.registry import MODELS, used_options

# Registrations (import order = listing order).
from gradlab.models import mlp as _mlp  # noqa: F401,E402
from gradlab.models import cnn as _cnn  # noqa: F401,E402
from gradlab.models import resnet as _resnet  # noqa: F401,E402
from gradlab.models.user import build_user_model, is_user_ref  # noqa: E402

__all__ = [
    "ACTIVATIONS",
    "INITS",
    "MODELS",
    "MODEL_DEFAULTS",
    "NORMS",
    "SHORTCUTS",
    "GradlabNet",
    "Normalize",
    "build_model",
]


def build_model(name: str, spec, **opts) -> nn.Module:
    """Build model ``name`` for data ``spec`` (a DataSpec, or anything with a ``.spec``).

    Args:
        name: a registered model, or ``package.module:factory`` for a user model.
        spec: input shape, number of classes and normalisation constants of the data.
        **opts: any of :data:`MODEL_DEFAULTS` (missing ones take their defaults).
    Returns:
        An ``nn.Module`` in train mode mapping ``(N, *spec.input_shape)`` to ``(N, num_classes)``.
    Raises:
        GradlabError: unknown model or option name, a value out of range, an option set away
            from its default that the model does not use, or a user model that fails to build.
    """
    if not isinstance(name, str) or not name:
        raise GradlabError(f"invalid model name {name!r}; choose from: {', '.join(MODELS.names())}")
    if not hasattr(spec, "input_shape") and hasattr(spec, "spec"):
        spec = spec.spec
    if spec.num_classes < 1 or not spec.input_shape:
        raise GradlabError(f"cannot build a model for data with shape {spec.input_shape} and {spec.num_classes} classes")
    full = resolve_options(opts)
    if is_user_ref(name):
        return build_user_model(name, spec, full)
    entry = MODELS.entry(name)
    check_applicable(name, full, used_options(entry.option_flags))
    return entry.obj(spec, full)
