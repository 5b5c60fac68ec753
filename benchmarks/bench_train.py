"""`gradlab train` against a bare PyTorch loop, and `gradlab --help` against `import torch`.

Same model, data, batch size and optimizer; the bare loop also evaluates on the test split once
per epoch, as any real loop does. Repeats alternate the two (and which goes first), and the
overhead ratio is the median of the ratios of each adjacent pair, so that the shared machine's
speed, which drifts by 10-30% over seconds, cancels out; the ratio of the median times is printed
too. Targets (issue 2): training overhead at most 10%; `--help` at most half of `import torch`.

The ratio of one pair swings by +-15% here (bursts of other tenants' load slow either run), so
the default is 15 pairs and the interquartile range of the pair ratios is printed beside the
median: a median within that range's width of the target is not a clear pass or fail.

    python benchmarks/bench_train.py [--repeats 15] [--epochs 15]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def bare_loop(cfg) -> tuple[float, int]:
    from gradlab.data import load_dataset
    from gradlab.models import build_model
    from gradlab.train import evaluate

    torch.manual_seed(cfg["seed"])
    data = load_dataset(cfg["dataset"], seed=cfg["seed"])
    model = build_model(cfg["model"], data.spec, **{k: cfg[k] for k in ("width",) if cfg["model"] == "mlp"})
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
    n, bs = len(data.x_train), cfg["batch_size"]
    steps = 0
    t0 = time.perf_counter()
    for epoch in range(cfg["epochs"]):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg["seed"] + epoch))
        model.train()
        for i in range(0, n, bs):
            idx = perm[i : i + bs]
            loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
        evaluate(model, data.x_test, data.y_test)
    return time.perf_counter() - t0, steps


def gradlab_fit(cfg) -> tuple[float, int]:
    from gradlab.rundir import RunDir
    from gradlab.train import Trainer

    trainer = Trainer(cfg)  # data/model built outside the timed part, as in the bare loop
    with tempfile.TemporaryDirectory() as tmp:
        run = RunDir.create(tmp, "train", None, cfg)
        run.tb  # one-off start-up (importing TensorBoard's writer) is not a per-step cost
        t0 = time.perf_counter()
        result = trainer.fit(run)
        dt = time.perf_counter() - t0
        run.finish(result.status, result.metrics)
    return dt, result.metrics["steps"]


def time_cmd(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: stable on a shared machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from gradlab.train import train_defaults, validate_train_config

    base = {**train_defaults(), "runs_dir": "unused", "name": None, "seed": 0, "device": "cpu",
            "epochs": args.epochs}
    cases = [("default: mlp 2x128, batch 64", {}),
             ("mlp 2x512, batch 256", {"width": 512, "batch_size": 256}),
             ("cnn, batch 64", {"model": "cnn"})]
    for label, over in cases:
        cfg = validate_train_config({**base, **over})
        bare, ours = [], []
        for r in range(args.repeats):
            for run in ((bare_loop, bare), (gradlab_fit, ours))[:: 1 if r % 2 == 0 else -1]:
                t, s = run[0](cfg)
                run[1].append(t / s)
        b, o = statistics.median(bare), statistics.median(ours)
        ratios = [g / x for g, x in zip(ours, bare)]
        pairs = statistics.median(ratios)
        q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (pairs, pairs, pairs)
        print(f"train step, {label} (digits, adam, {args.epochs} epochs, torch threads {torch.get_num_threads()}):")
        print(f"  bare PyTorch loop  {b * 1e3:8.3f} ms/step   {1 / b:8.1f} steps/s")
        print(f"  gradlab train      {o * 1e3:8.3f} ms/step   {1 / o:8.1f} steps/s")
        print(f"  overhead ratio     {pairs:8.3f}  (median of {args.repeats} pairs, IQR {q1:.3f}-{q3:.3f}; "
              f"of the medians: {o / b:.3f}; target <= 1.10)")

    exe = str(Path(sys.executable).with_name("gradlab"))
    helps, imports = [], []
    for _ in range(args.repeats):
        helps.append(time_cmd([exe, "--help"]))
        imports.append(time_cmd([sys.executable, "-c", "import torch"]))
    h, i = statistics.median(helps), statistics.median(imports)
    print("startup:")
    print(f"  gradlab --help        {h * 1e3:8.1f} ms")
    print(f"  python -c import torch {i * 1e3:7.1f} ms")
    print(f"  ratio                 {h / i:8.3f}  (target <= 0.5)")


if __name__ == "__main__":
    main()
