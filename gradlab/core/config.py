"""Configuration files: safe YAML loading and resolution of defaults < file < flags."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from gradlab.core.errors import GradlabError


def load_yaml(path: str | Path) -> dict:
    """Load a YAML mapping with the safe loader; one clear error naming the file otherwise."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise GradlabError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise GradlabError(f"malformed YAML in {p}{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise GradlabError(f"{p}: expected a mapping of option: value, got {type(data).__name__}")
    return data


def normalise_keys(cfg: Mapping[str, Any]) -> dict:
    """Accept both ``batch-size`` (flag spelling) and ``batch_size`` in files."""
    return {str(k).replace("-", "_"): v for k, v in cfg.items()}


def resolve(defaults: Mapping[str, Any], file_cfg: Mapping[str, Any] | None, flags: Mapping[str, Any]) -> dict:
    """Merge ``defaults`` < ``file_cfg`` < ``flags`` (flags set to None count as not given).

    Unknown keys in the file or flags raise :class:`GradlabError` listing the valid ones.
    """
    out = dict(defaults)
    for source, where in ((normalise_keys(file_cfg or {}), "config file"), (normalise_keys(flags), "options")):
        unknown = sorted(set(source) - set(defaults))
        if unknown:
            raise GradlabError(
                f"unknown key{'s' if len(unknown) > 1 else ''} in {where}: {', '.join(unknown)}; "
                f"valid keys: {', '.join(sorted(defaults))}"
            )
        out.update({k: v for k, v in source.items() if v is not None})
    return out
