"""Which parameters a curvature operator differentiates: all, a list of tensors, or name patterns.

Every model-based operator (:class:`~gradlab.curvature.HessianOperator`,
:class:`~gradlab.curvature.GGNOperator`, the Fisher operators, :class:`~gradlab.curvature.KFACOperator`)
takes the same ``params`` argument, resolved here once:

* ``None``: every parameter with ``requires_grad``;
* a sequence of tensors: exactly those, in that order;
* a string or a sequence of strings: name patterns, comma-separated or listed. A parameter is
  chosen when its name (``model.named_parameters()``) matches a pattern as a glob
  (``"*.weight"``, ``"0.*"``) or lies under it as a module prefix (``"fc1"`` picks
  ``fc1.weight`` and ``fc1.bias``). Chosen parameters keep the model's order.

The operator's flat vector is the concatenation of the chosen parameters, flattened row-major.
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Optional, Sequence, Union

from torch import Tensor, nn

from gradlab.core.errors import GradlabError

ParamSpec = Union[None, str, Sequence[Union[str, Tensor]]]


def _patterns(spec) -> list[str]:
    parts = [spec] if isinstance(spec, str) else list(spec)
    return [p.strip() for part in parts for p in part.split(",") if p.strip()]


def _matches(name: str, pattern: str) -> bool:
    return fnmatchcase(name, pattern) or name.startswith(pattern + ".")


def select_params(model: nn.Module, params: ParamSpec = None) -> tuple[list[Tensor], list[Optional[str]]]:
    """``(tensors, names)`` chosen by ``params`` (module docstring); a name is None for a tensor
    that is not registered in ``model``.

    Raises:
        GradlabError: nothing chosen (no trainable parameters, or a pattern that matches none,
            with the valid names in the message), or a list that mixes names and tensors.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if params is None:
        chosen = [p for _, p in named]
    elif isinstance(params, str) or (len(params) and all(isinstance(p, str) for p in params)):
        pats = _patterns(params)
        if not pats:
            raise GradlabError(f"empty parameter pattern {params!r}")
        for pat in pats:
            if not any(_matches(n, pat) for n, _ in named):
                valid = ", ".join(n for n, _ in named[:12]) + (", ..." if len(named) > 12 else "")
                raise GradlabError(f"parameter pattern {pat!r} matches no trainable parameter; names are: {valid}")
        chosen = [p for n, p in named if any(_matches(n, pat) for pat in pats)]
    elif all(isinstance(p, Tensor) for p in params):
        chosen = list(params)
    else:
        raise GradlabError("params must be None, name patterns, or a list of parameter tensors (not a mix)")
    if not chosen:
        raise GradlabError("no trainable parameters to take a curvature matrix over")
    names = {id(p): n for n, p in model.named_parameters()}
    return chosen, [names.get(id(p)) for p in chosen]
