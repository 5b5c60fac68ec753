"""docs/OPTIONS.md is made from the declarations and is current."""

from __future__ import annotations

import subprocess
import sys

from clihelp import ROOT


def test_options_reference_is_current():
    # a fresh process: the plug-ins that test files register (toys) are not gradlab's
    made = subprocess.run([sys.executable, "-m", "gradlab_cli.docs"], capture_output=True, text=True, check=True)
    on_disk = (ROOT / "docs" / "OPTIONS.md").read_text()
    assert on_disk == made.stdout, "docs/OPTIONS.md is stale: run `make docs`"
