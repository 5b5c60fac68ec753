"""User models given as ``package.module:factory`` (no registration needed).

The factory is called as ``factory(spec, **opts)`` with the options its signature accepts (all
of them if it takes ``**kwargs``), or as ``factory()`` if it takes no parameters. It must return
an ``nn.Module`` mapping ``(N, *spec.input_shape)`` inputs in [0, 1] to ``(N, num_classes)``
logits; unlike zoo models it need not be a GradlabNet (probes that walk blocks then refuse it).
The current directory is importable, as with ``python -m``.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys

from torch import nn

from gradlab.core.errors import GradlabError


def is_user_ref(name: str) -> bool:
    return ":" in name


def _import_factory(ref: str):
    module_name, _, attr = ref.partition(":")
    if not module_name or not attr:
        raise GradlabError(f"invalid user model {ref!r} (expected package.module:factory)")
    added = os.getcwd() not in sys.path
    if added:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any import failure is the user's module, not gradlab
        raise GradlabError(f"cannot import module {module_name!r} for user model {ref!r}: {exc}") from None
    finally:
        if added:
            sys.path.remove(os.getcwd())
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise GradlabError(f"module {module_name!r} has no attribute {attr!r} (user model {ref!r})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise GradlabError(f"user model {ref!r} is not callable")
    return obj


def build_user_model(ref: str, spec, opts: dict, defaults: dict) -> nn.Module:
    """Import and call the factory with the checked ``opts`` (every zoo option) it accepts;
    GradlabError if one it does not accept is set away from its ``defaults``, if the call fails
    or if it returns a non-Module."""
    factory = _import_factory(ref)
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # builtins without a signature: pass everything
        params = None
    if params is not None and len(params) == 0:
        args, kwargs = (), {}
        accepted: set[str] = set()
    else:
        takes_all = params is None or any(p.kind is p.VAR_KEYWORD for p in params.values())
        accepted = set(opts) if takes_all else set(opts) & set(params)
        args, kwargs = (spec,), {k: opts[k] for k in accepted}
    for key, value in opts.items():
        if key not in accepted and value != defaults[key]:
            raise GradlabError(f"option {key}={value!r} is not accepted by user model {ref!r}")
    try:
        model = factory(*args, **kwargs)
    except GradlabError:
        raise
    except Exception as exc:
        raise GradlabError(f"user model {ref!r} failed to build: {type(exc).__name__}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise GradlabError(f"user model {ref!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model
