"""Device selection."""

from __future__ import annotations

from gradlab.core.errors import GradlabError

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str = "auto"):
    """``auto`` picks CUDA when available, else CPU; asking for CUDA without it is a user error."""
    import torch

    if name not in DEVICES:
        raise GradlabError(f"unknown device {name!r}; choose from: {', '.join(DEVICES)}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise GradlabError("--device cuda asked for, but torch sees no CUDA device (use --device cpu)")
    return torch.device(name)
