"""``gradlab run FILE.yaml``: run an experiment file, one run per sweep combination."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import typer
from typing_extensions import Annotated

from gradlab_cli._common import console, err_console, render_table



def command(
    file: Annotated[Path, typer.Argument(help="Experiment YAML: a base config, optional `sweep:` grid, or `steps:`.")],
    runs_dir: Annotated[Optional[Path], typer.Option("--runs-dir", help="Put every run here (overrides the file).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List the runs without starting them.")] = False,
) -> None:
    """Run each combination of an experiment file as its own run; report failures at the end."""
    import pandas as pd
    import yaml
    from rich.markup import escape

    from gradlab.training.experiment import PREVIOUS, load_experiment, log_hparams

    stages = load_experiment(file)
    results, previous = [], [None]
    with tempfile.TemporaryDirectory(prefix="gradlab-exp-") as tmp:
        n = 0
        for si, stage in enumerate(stages, 1):
            made = []
            sources = previous if stage.base.get("run") == PREVIOUS else [None]
            for source in sources:
                for combo in stage.combinations():
                    n += 1
                    cfg = dict(combo)
                    if source is not None:
                        cfg["run"] = source
                    if runs_dir is not None:
                        cfg["runs_dir"] = str(runs_dir)
                    label = stage.label(combo)
                    if label and "name" not in cfg:
                        cfg["name"] = label
                    what = " ".join(stage.command + stage.args) + (f" [{label}]" if label else "")
                    if source is not None:
                        what += f" on {Path(source).name if not dry_run else source}"
                    if dry_run:
                        console.print(f"{n}. {escape(what)}", highlight=False)
                        continue
                    cfg_path = Path(tmp) / f"{n}.yaml"
                    cfg_path.write_text(yaml.safe_dump(cfg))
                    console.print(f"[bold]{n}.[/bold] {escape(what)}", highlight=False)
                    status, path, err = _run_one(stage.command, stage.args, cfg_path)
                    results.append({"#": n, "stage": si, "run": what, "status": status,
                                    "folder": path or "", "error": err})
                    if path:
                        made.append(path)
                        if stage.sweep and stage.command != ["train"]:  # a train run logs its own
                            _hparams(log_hparams, path, {k: combo[k] for k in stage.sweep})
            previous = made if not dry_run else [f"<each run of step {si}>"]
    if dry_run:
        return
    df = pd.DataFrame(results)
    render_table(df[["#", "run", "status", "folder"]], title=f"experiment {file}")
    bad = df[df["status"] != "completed"]
    for row in bad.itertuples(index=False):
        err_console.print(escape(f"{row[0]}. {row.run}: {row.status}" + (f": {row.error}" if row.error else "")),
                          highlight=False)
    if len(bad):
        raise typer.Exit(1)


def _run_one(cmd: list, args: list, cfg_path: Path):
    """Run one combination in a fresh process (a crash or divergence cannot take the sweep down)."""
    proc = subprocess.run(
        [sys.executable, "-m", "gradlab", *cmd, *args, "--config", str(cfg_path), "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    path = None
    for line in proc.stdout.splitlines():
        if line.startswith("run: "):
            path = line[5:].strip()
    err = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
    status = "completed" if proc.returncode == 0 else "failed"
    if path:
        summary = Path(path) / "summary.csv"
        if summary.is_file():
            import pandas as pd

            status = str(pd.read_csv(summary)["status"].iloc[0])
    return status, path, err


def _hparams(log_hparams, path: str, hparams: dict) -> None:
    import pandas as pd

    from gradlab.training.experiment import HPARAM_METRICS

    summary = Path(path) / "summary.csv"
    if not summary.is_file():
        return
    rec = pd.read_csv(summary).iloc[0].to_dict()
    metrics = {tag: float(rec[col]) for col, tag in HPARAM_METRICS.items() if col in rec and pd.notna(rec[col])}
    if metrics:
        log_hparams(path, hparams, metrics)
