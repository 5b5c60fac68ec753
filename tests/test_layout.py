"""The layout the architecture promises: layers, file sizes, and no private names of torch."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted([*ROOT.joinpath("gradlab").rglob("*.py"), *ROOT.joinpath("cli").rglob("*.py"),
                  *ROOT.joinpath("benchmarks").rglob("*.py")])
# torch._foreach_* are the multi-tensor ops torch.optim itself is written in; every other
# underscore name of torch (torch._utils, torch.utils._foreach_utils, nn.modules.batchnorm._BatchNorm,
# storage._cdata, SummaryWriter._get_file_writer) may change or vanish in any release.
PRIVATE = re.compile(r"\b(?:torch|nn|F)(?:\.[A-Za-z]\w*)*\._(?!_)\w+|\._cdata\b|\._get_file_writer\b")
# only torch's own top-level ops: torch.utils._foreach_utils is private like any other
ALLOWED = re.compile(r"torch\._foreach_\w+")
LIMIT = 420  # "no file over ~400 lines"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_private_torch_names(path):
    hits = [f"{i}: {line.strip()}" for i, line in enumerate(path.read_text().splitlines(), 1)
            if any(not ALLOWED.fullmatch(m.group(0)) for m in PRIVATE.finditer(line))]
    assert not hits, "\n".join(hits)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_private_torch_imports(path):
    """``from torch.x import _y`` and ``import torch._x`` escape the regex above (no dot before _y)."""
    bad = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "torch":
            parts = node.module.split(".") + [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            parts = [p for a in node.names if a.name.split(".")[0] == "torch" for p in a.name.split(".")]
        else:
            continue
        if any(p.startswith("_") and not p.startswith("_foreach_") for p in parts):
            bad.append(f"{node.lineno}: {ast.unparse(node)}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("path", [p for p in SOURCES if "benchmarks" not in p.parts], ids=lambda p: str(p.relative_to(ROOT)))
def test_files_stay_small(path):
    n = len(path.read_text().splitlines())
    assert n <= LIMIT, f"{n} lines: a file this long holds two concepts"


@pytest.mark.parametrize("package, may_not", [
    ("core", ("gradlab.models", "gradlab.data", "gradlab.optim", "gradlab.curvature", "gradlab.probes",
              "gradlab.attacks", "gradlab.landscape", "gradlab.training", "gradlab.runs", "gradlab_cli", "typer")),
    ("runs", ("gradlab.models", "gradlab.data", "gradlab.optim", "gradlab.curvature", "gradlab.probes",
              "gradlab.attacks", "gradlab.landscape", "gradlab.training", "gradlab_cli", "typer")),
])
def test_lower_layers_do_not_import_upper_ones(package, may_not):
    for path in ROOT.joinpath("gradlab", package).rglob("*.py"):
        if path.name == "manifest.py":  # imports the registries by name, on purpose (importlib)
            continue
        bad = [m for m in _imports(path) if m.startswith(may_not)]
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_the_core_never_imports_typer_or_prints():
    for path in ROOT.joinpath("gradlab").rglob("*.py"):
        assert not any(m == "typer" or m.startswith("typer.") for m in _imports(path)), path
        tree = ast.parse(path.read_text())
        prints = [n.lineno for n in ast.walk(tree)
                  if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "print"]
        assert not prints, f"{path.relative_to(ROOT)} prints at lines {prints}"
