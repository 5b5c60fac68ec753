"""How fast a typo is answered: the CLI's error path against ``gradlab --help``.

Issue 14 asks that names and numbers be checked "in about a second", before torch is imported
and before any data is loaded. Timed, each as a fresh ``gradlab`` process (the installed console
script next to this interpreter), every one of which must exit 2 with one line on stderr:

* ``gradlab train --opt adamm``: an unknown optimizer (the manifest's declarations answer);
* ``gradlab train --lr fast``: a value that is not a number (the flag's type answers);
* ``gradlab run FILE``: an experiment whose second combination has an unknown key;
* ``gradlab run FILE``: an experiment whose sweep names an unknown optimizer;
* ``gradlab probe hessian --top-k 0`` and ``gradlab attack fgsm --norm l3``: a probe's and an
  attack's option out of range (their flags and checks come from the manifest too);

against ``gradlab --help`` (imports only the table of commands), with ``python -c "import
torch"`` beside them for scale. The manifest is written once before timing. Each round runs every
command once, rotating which goes first; the ratio is the median over rounds of the ratio within
a round (the shared machine's speed drifts over seconds, and this cancels it), with its
interquartile range. Target: a typo costs at most 3x ``gradlab --help`` (the same order as
start-up alone, far from an import of torch); the absolute medians are printed too.

    python benchmarks/bench_cli.py [--rounds 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_RATIO = 3.0


def time_error(cmd: list[str], cwd: str) -> float:
    """Seconds for ``cmd`` to answer; it must be a user mistake (exit 2, one stderr line)."""
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    dt = time.perf_counter() - t0
    lines = p.stderr.strip().splitlines()
    if p.returncode != 2 or len(lines) != 1:
        raise SystemExit(f"{' '.join(cmd)}: expected exit 2 with one line, got {p.returncode}: {p.stderr[-500:]}")
    return dt


def time_ok(cmd: list[str], cwd: str) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=cwd)
    return time.perf_counter() - t0


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return statistics.median(xs), q[0], q[2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7, help="rounds (each runs every command once)")
    args = ap.parse_args()
    exe = str(Path(sys.executable).with_name("gradlab"))
    with tempfile.TemporaryDirectory(prefix="bench-cli-") as tmp:
        Path(tmp, "key.yaml").write_text("command: train\nepochs: 1\nsweep:\n  seed: [0, 1]\n  epochz: [1, 2]\n")
        Path(tmp, "name.yaml").write_text("command: train\nepochs: 1\nsweep:\n  opt: [sgd, adamm]\n")
        errors = {
            "train --opt adamm": [exe, "train", "--opt", "adamm"],
            "train --lr fast": [exe, "train", "--lr", "fast"],
            "run FILE (bad key)": [exe, "run", "key.yaml"],
            "run FILE (bad name)": [exe, "run", "name.yaml"],
            "probe hessian --top-k 0": [exe, "probe", "hessian", "--top-k", "0"],
            "attack fgsm --norm l3": [exe, "attack", "fgsm", "--norm", "l3"],
        }
        base = [exe, "--help"]
        torch_cmd = [sys.executable, "-c", "import torch"]
        time_ok([exe, "train", "--help"], tmp)  # writes the manifest if it is missing or stale
        names = [*errors, "--help", "import torch"]
        times: dict[str, list] = {n: [] for n in names}
        for r in range(args.rounds):
            k = r % len(names)
            for name in names[k:] + names[:k]:
                if name in errors:
                    times[name].append(time_error(errors[name], tmp))
                else:
                    times[name].append(time_ok(base if name == "--help" else torch_cmd, tmp))
    help_med = statistics.median(times["--help"])
    print(f"CLI error path, {args.rounds} rounds, load average {os.getloadavg()[0]:.2f}: "
          f"gradlab --help {help_med * 1e3:.0f} ms")
    ratio, q1, q3 = quartiles([t / h for t, h in zip(times["import torch"], times["--help"])])
    print(f"  {'import torch (for scale)':30s} {statistics.median(times['import torch']) * 1e3:6.0f} ms  "
          f"/ --help {ratio:.2f} (IQR {q1:.2f}-{q3:.2f})")
    for name in errors:
        ratio, q1, q3 = quartiles([t / h for t, h in zip(times[name], times["--help"])])
        med = statistics.median(times[name])
        verdict = "pass" if ratio <= TARGET_RATIO else "FAIL"
        print(f"  gradlab {name:22s} {med * 1e3:6.0f} ms  / --help {ratio:.2f} (IQR {q1:.2f}-{q3:.2f})  "
              f"target <= {TARGET_RATIO:g}: {verdict}")


if __name__ == "__main__":
    main()
