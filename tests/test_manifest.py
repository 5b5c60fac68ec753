"""The manifest: the registries' declarations without importing the plug-ins."""

from __future__ import annotations

import json
import subprocess
import sys

from gradlab.core.manifest import REGISTRIES, real_registry, registry_view


def test_view_equals_the_real_registry(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADLAB_CACHE", str(tmp_path))
    from gradlab.core import manifest

    manifest._loaded.clear()
    for kind in REGISTRIES:
        real, view = real_registry(kind), registry_view(kind)
        assert view.names() == real.names() and view.kind == real.kind
        for e in real:
            v = view.entry(e.name)
            assert (v.description, v.paper, v.option_flags) == (e.description, e.paper, e.option_flags)
            assert list(v.options) == list(e.options)  # Option is a frozen dataclass: field-equal
    assert len(list(tmp_path.glob("manifest-*.json"))) == 1


def test_second_process_reads_the_manifest_without_torch(tmp_path):
    code = ("import sys\nfrom gradlab.core.manifest import registry_view\n"
            "print(len(registry_view('optimizers').names()), 'torch' in sys.modules)")
    env = {"GRADLAB_CACHE": str(tmp_path), "PATH": "/usr/bin:/bin"}
    first = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    second = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    n = len(real_registry("optimizers").names())
    assert first.stdout.split() == [str(n), "True"] and second.stdout.split() == [str(n), "False"]


def test_a_damaged_manifest_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADLAB_CACHE", str(tmp_path))
    from gradlab.core import manifest

    manifest._loaded.clear()
    registry_view("models")
    path = next(tmp_path.glob("manifest-*.json"))
    path.write_text("{not json")
    manifest._loaded.clear()
    assert registry_view("models").names() == real_registry("models").names()
    assert set(json.loads(path.read_text())) == set(REGISTRIES)
