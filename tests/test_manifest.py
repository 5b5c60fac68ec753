"""The manifest: the registries' declarations without importing the plug-ins."""

from __future__ import annotations

import json
import subprocess
import sys

from gradlab.core.manifest import REGISTRIES, RegistryView, real_registry, registry_view, write_manifest

_CODE = ("import sys\nfrom gradlab.core.manifest import registry_view\n"
         "print(len(registry_view('optimizers').names()), 'torch' in sys.modules)")


def _run(tmp_path):
    env = {"GRADLAB_CACHE": str(tmp_path), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-c", _CODE], capture_output=True, text=True, env=env, check=True)


def test_the_written_manifest_equals_the_real_registries(tmp_path):
    path = tmp_path / "m.json"
    write_manifest(path)
    doc = json.loads(path.read_text())
    for kind in REGISTRIES:
        real, view = real_registry(kind), RegistryView(kind, doc[kind])
        assert view.names() == real.names() and view.kind == real.kind
        for e in real:
            v = view.entry(e.name)
            assert (v.description, v.paper, v.option_flags) == (e.description, e.paper, e.option_flags)
            assert list(v.options) == list(e.options)  # Option is a frozen dataclass: field-equal
        assert registry_view(kind).names() == real.names()  # imported here: read live


def test_processes_read_the_manifest_without_torch(tmp_path):
    n = len(real_registry("optimizers").names())
    first = _run(tmp_path)  # builds it in a child process of its own
    assert first.stdout.split() == [str(n), "False"]
    assert len(list(tmp_path.glob("manifest-*.json"))) == 1
    assert _run(tmp_path).stdout.split() == [str(n), "False"]


def test_a_damaged_manifest_is_rebuilt(tmp_path):
    _run(tmp_path)
    path = next(tmp_path.glob("manifest-*.json"))
    path.write_text("{not json")
    n = len(real_registry("optimizers").names())
    assert _run(tmp_path).stdout.split() == [str(n), "False"]
    assert set(json.loads(path.read_text())) == set(REGISTRIES)


def test_a_plugin_registered_at_run_time_is_seen_but_never_cached(tmp_path):
    """A process that registered its own plug-in sees it (the registry is read live); the
    manifest other processes read is written by a fresh process and never holds it."""
    from gradlab.core.options import Options
    from gradlab.optim import OPTIMIZERS

    entries = dict(OPTIMIZERS._entries)
    try:
        OPTIMIZERS.add("mine", object, "a user's optimizer", Options())
        assert "mine" in registry_view("optimizers").names()
        _run(tmp_path)
        doc = json.loads(next(tmp_path.glob("manifest-*.json")).read_text())
        assert "mine" not in [e["name"] for e in doc["optimizers"]["entries"]]
    finally:
        OPTIMIZERS._entries.clear()
        OPTIMIZERS._entries.update(entries)
