"""`gradlab train` against a bare PyTorch loop, and `gradlab --help` against `import torch`.

Same model, data, batch size and optimizer object (gradlab's Adam is torch's with its fused
kernel); the bare loop also evaluates on the test split once per epoch, as any real loop does. A
third loop with ``torch.optim.Adam``'s defaults (the foreach kernel) shows what a hand-written loop
gets. Each round runs the three, rotating which goes first, and each ratio is the median over
rounds of the ratio within a round, so that the shared machine's speed, which drifts by 10-30%
over seconds, cancels out; the ratio of the median times is printed too. Targets (issue 2):
training overhead at most 10% (against the loop with the same optimizer); `--help` at most half
of `import torch`.

One round's ratio swings by +-15% here (bursts of other tenants' load slow any run), so the
default is 15 rounds and the interquartile range of the ratios is printed beside the median: a
median within that range's width of the target is not a clear pass or fail.

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


def bare_loop(cfg, same_optimizer: bool = True) -> tuple[float, int]:
    """The loop a user writes. ``same_optimizer``: the optimizer object gradlab builds (for Adam,
    torch's fused kernel), so that the ratio is gradlab's own overhead; otherwise
    ``torch.optim.Adam`` with torch's defaults (the foreach kernel), what a hand-written loop gets."""
    from gradlab.data import load_dataset
    from gradlab.models import build_model
    from gradlab.optim import OPTIMIZERS, build_optimizer
    from gradlab.training.loop import evaluate

    torch.manual_seed(cfg["seed"])
    data = load_dataset(cfg["dataset"], seed=cfg["seed"])
    model = build_model(cfg["model"], data.spec, **{k: cfg[k] for k in ("width",) if cfg["model"] == "mlp"})
    if same_optimizer:
        opts = {k: cfg[k] for k in OPTIMIZERS.entry(cfg["opt"]).options.names() if k in cfg}
        opt = build_optimizer(cfg["opt"], model.parameters(), **{**opts, "lr": cfg["lr"]})
    else:
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
    from gradlab.runs.folder import RunDir
    from gradlab.training.loop import Trainer

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
    ap.add_argument("--repeats", type=int, default=15, help="rounds (each runs the three loops once)")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: stable on a shared machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from gradlab.training.loop import train_defaults, validate_train_config

    base = {**train_defaults(), "runs_dir": "unused", "name": None, "seed": 0, "device": "cpu",
            "epochs": args.epochs}
    cases = [("default: mlp 2x128, batch 64", {}),
             ("mlp 2x512, batch 256", {"width": 512, "batch_size": 256}),
             ("cnn, batch 64", {"model": "cnn"})]
    for label, over in cases:
        cfg = validate_train_config({**base, **over})
        runs = {"bare": (lambda c: bare_loop(c, True), []), "torch": (lambda c: bare_loop(c, False), []),
                 "ours": (gradlab_fit, [])}
        for r in range(args.repeats):
            order = list(runs)
            for name in order[r % 3:] + order[:r % 3]:  # rotate which goes first
                t, s = runs[name][0](cfg)
                runs[name][1].append(t / s)
        bare, torch_default, ours = (runs[k][1] for k in ("bare", "torch", "ours"))
        b, d, o = statistics.median(bare), statistics.median(torch_default), statistics.median(ours)

        def ratio(xs, ys):
            rs = [g / x for g, x in zip(xs, ys)]
            med = statistics.median(rs)
            q1, _, q3 = statistics.quantiles(rs, n=4) if len(rs) > 1 else (med, med, med)
            return f"{med:8.3f}  (median of {len(rs)} rounds, IQR {q1:.3f}-{q3:.3f}"

        print(f"train step, {label} (digits, adam, {args.epochs} epochs, torch threads {torch.get_num_threads()}):")
        print(f"  bare loop, gradlab's optimizer          {b * 1e3:8.3f} ms/step   {1 / b:8.1f} steps/s")
        print(f"  bare loop, torch.optim.Adam's defaults  {d * 1e3:8.3f} ms/step   {1 / d:8.1f} steps/s")
        print(f"  gradlab train                           {o * 1e3:8.3f} ms/step   {1 / o:8.1f} steps/s")
        print(f"  overhead ratio (same optimizer)         {ratio(ours, bare)}; of the medians: {o / b:.3f}; "
              "target <= 1.10)")
        print(f"  against a loop with torch's default Adam {ratio(ours, torch_default)})")

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
