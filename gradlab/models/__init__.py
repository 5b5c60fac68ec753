"""The model zoo: ``build_model(name, spec, **opts)`` and the ``MODELS`` registry.

Zoo models (``gradlab list models``): ``logreg``, ``mlp``, ``cnn``, ``resnet20/32/56`` and their
``plain20/32/56`` twins; each is a :class:`~gradlab.models.base.GradlabNet` taking inputs in
[0, 1] with the data's normalisation as a fixed first layer. ``name`` may also be a user model
``package.module:factory`` (see :mod:`gradlab.models.user`).

Adding a model is one file that calls ``MODELS.add(name, builder, description,
options=Options(...))`` (reusing the shared options of :mod:`gradlab.models.options`) plus one
import line below.
"""

from __future__ import annotations

from typing import Mapping

from torch import nn

from gradlab.core.errors import GradlabError
from gradlab.core.options import Options
from gradlab.models.base import GradlabNet, Normalize
from gradlab.models.options import ACTIVATIONS, INITS, NORMS, check_init_scale
from gradlab.models.registry import MODELS

# Registrations (import order = listing order).
from gradlab.models import mlp as _mlp  # noqa: F401,E402
from gradlab.models import cnn as _cnn  # noqa: F401,E402
from gradlab.models import resnet as _resnet  # noqa: F401,E402
from gradlab.models.user import build_user_model, is_user_ref  # noqa: E402

#: Every option a zoo model declares: what a user model ``package.module:factory`` may take.
#: (Building it also proves that no two zoo models declare one name differently.)
ZOO_OPTIONS = Options(*(opt for entry in MODELS for opt in entry.options))

__all__ = [
    "ACTIVATIONS",
    "INITS",
    "MODELS",
    "NORMS",
    "ZOO_OPTIONS",
    "GradlabNet",
    "Normalize",
    "build_model",
    "model_option_names",
    "model_options",
    "model_options_in",
]


def model_options(name: str) -> Options:
    """The declared options of model ``name``: a zoo entry's own, or :data:`ZOO_OPTIONS` for a
    user model (``package.module:factory``). GradlabError for an unknown name."""
    if not isinstance(name, str) or not name:
        raise GradlabError(f"invalid model name {name!r}; choose from: {', '.join(MODELS.names())}")
    return ZOO_OPTIONS if is_user_ref(name) else MODELS.entry(name).options


def model_option_names(name: str) -> list[str]:
    """``["act", "init", ...]``: the option names model ``name`` takes."""
    return model_options(name).names()


def model_options_in(name: str, cfg: Mapping) -> dict:
    """The options of model ``name`` found in a flat config that holds every zoo option with its
    default (a train run's ``config.yaml``): its own, plus any other zoo option set away from
    its default, which :func:`build_model` then rejects naming its owner rather than dropping."""
    own = model_options(name)
    return {k: v for k, v in cfg.items()
            if k in own or (k in ZOO_OPTIONS and v is not None and v != ZOO_OPTIONS[k].default)}


def build_model(name: str, spec, **opts) -> nn.Module:
    """Build model ``name`` for data ``spec`` (a DataSpec, or anything with a ``.spec``).

    Args:
        name: a registered model, or ``package.module:factory`` for a user model.
        spec: input shape, number of classes and normalisation constants of the data.
        **opts: the model's declared options (:func:`model_options`; missing ones take their
            defaults).
    Returns:
        An ``nn.Module`` in train mode mapping ``(N, *spec.input_shape)`` to ``(N, num_classes)``.
    Raises:
        GradlabError: one line for an unknown model or option name (with a "did you mean", or
            naming the model the option belongs to), a value of the wrong type or out of range,
            or a user model that fails to build.
    """
    options = model_options(name)
    if not hasattr(spec, "input_shape") and hasattr(spec, "spec"):
        spec = spec.spec
    if spec.num_classes < 1 or not spec.input_shape:
        raise GradlabError(f"cannot build a model for data with shape {spec.input_shape} and {spec.num_classes} classes")
    if is_user_ref(name):
        full = options.resolve(opts, owner=f"user model {name}")
        check_init_scale(full)
        return build_user_model(name, spec, full, options.defaults())
    full = options.resolve(opts, owner=f"model {name}", others=MODELS.options_of_others(name))
    check_init_scale(full)
    return MODELS.get(name)(spec, full)
