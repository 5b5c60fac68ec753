"""`gradlab train` against a bare PyTorch loop, and the CLI's start-up against `import torch`.

What is timed, per case (issue 13's three):

* gradlab: ``Trainer(cfg).fit(run)`` with its default callbacks into a real run folder in a
  temporary directory, then ``run.finish`` (summary.csv, writers closed), at the defaults of
  ``gradlab train``: a ``train-step`` row (loss, lr, gradient norm) in metrics.csv and TensorBoard
  every ``log_every_steps`` = 10 steps, gradient histograms every ``log_every`` = 50 steps, train
  and test rows at each epoch's end, and ``checkpoints/last.pt`` at an epoch's end at most once per
  ``checkpoint_seconds`` = 30 s and always at the end (written on a background thread; ``fit``
  waits for it). The config is resolved from the declarations exactly as the CLI does
  (``resolve_config`` over the training and run options and the chosen plug-ins' options).
* bare: the loop a user writes over the same tensors, with the same optimizer object type and
  options (``gradlab.optim.build_optimizer`` with the config's optimizer options), seeded
  shuffled batches, ``zero_grad; backward; step``, and an evaluation on the test split once per
  epoch. Data, model and optimizer are built outside the timed part in both.

Cases: the default digits MLP (batch 64, target <= 1.20); the CNN on 28x28 inputs at batch 128
(MNIST's test-set files from ``$GRADLAB_DATA`` or ``/work/shared/data/mnist``, which gradlab
splits 80/20, else seeded noise images; target <= 1.05); resnet20 on 3x32x32 seeded noise
images, 10 classes, at batch 128 (target <= 1.05). The noise images come from a dataset
registered here through the dataset registry, as a plug-in would.

Each round runs both loops once, alternating which goes first; the ratio is the median over
rounds of the ratio within a round (the shared machine's speed drifts over seconds, and this
cancels it), with the interquartile range beside it: a median within that range's width of the
target is not a clear pass or fail.

Start-up: ``gradlab --help`` (imports only the command table) and ``gradlab train --help`` (reads
the JSON manifest of the plug-in declarations; timed warm, after one call has written it) against
``python -c "import torch"``; target <= 0.5.

    python benchmarks/bench_train.py [--rounds 11] [--epochs N] [--cases mlp,cnn,resnet20,startup] [--threads 1]
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from gradlab.core.options import Option, Options
from gradlab.data.common import make_bundle, stratified_split
from gradlab.data.options import N_SAMPLES, TEST_FRACTION
from gradlab.data.registry import DATASETS

NOISE = "bench-noise-images"


def load_noise_images(seed, data_dir, opts):
    """``n_samples`` images ``(C, S, S)`` uniform in [0, 1] with uniform labels in ``[0, classes)``,
    from ``seed``; stratified split. Nothing to learn: only the shapes matter for timing."""
    rng = np.random.default_rng(seed)
    c, s, k, n = opts["image_channels"], opts["image_size"], opts["classes"], opts["n_samples"]
    x = rng.random((n, c, s, s), dtype=np.float32)
    y = rng.integers(0, k, n)
    tr, te = stratified_split(y, opts["test_fraction"], seed)
    return make_bundle(NOISE, x[tr], y[tr], x[te], y[te], k)


DATASETS.add(NOISE, load_noise_images, "seeded noise images for bench_train.py", options=Options(
    Option("image_channels", int, 1, "channels of each image", low=1),
    Option("image_size", int, 28, "height and width of each image", low=4),
    Option("classes", int, 10, "number of classes", low=2),
    N_SAMPLES, TEST_FRACTION))


@dataclass
class Case:
    label: str
    flags: dict
    epochs: int
    target: float
    bare: list = field(default_factory=list)  # seconds per step, one per round
    ours: list = field(default_factory=list)


def mnist_root():
    """The first folder (``$GRADLAB_DATA``, then /work/shared/data) holding MNIST's test-set pair."""
    from gradlab.data.files import candidate_dirs, find_file
    from gradlab.data.idx import SUBDIRS, TEST_IMAGES, TEST_LABELS

    roots = [Path(p) for p in (os.environ.get("GRADLAB_DATA"), "/work/shared/data") if p]
    for root in roots:
        for d in candidate_dirs(root, SUBDIRS["mnist"]):
            if find_file(d, TEST_IMAGES) and find_file(d, TEST_LABELS):
                return root
    return None


def make_cases() -> dict[str, Case]:
    root = mnist_root()
    if root is not None:
        cnn_data, where = {"dataset": "mnist", "data_dir": str(root), "download": False}, f"MNIST test set in {root}"
    else:
        cnn_data, where = {"dataset": NOISE, "n_samples": 10000}, "noise 1x28x28"
    return {
        "mlp": Case("default: mlp 2x128 on digits, batch 64", {}, 15, 1.20),
        "cnn": Case(f"cnn, batch 128 ({where}, 80/20 split)", {"model": "cnn", "batch_size": 128, **cnn_data}, 3, 1.05),
        "resnet20": Case("resnet20, batch 128 (noise 3x32x32, 1536 train / 384 test)",
                         {"model": "resnet20", "batch_size": 128, "dataset": NOISE, "image_channels": 3,
                          "image_size": 32, "n_samples": 1920}, 2, 1.05),
    }


def resolve(flags: dict) -> dict:
    """The config ``gradlab train`` would resolve from these flags (in-process registries, so the
    dataset registered above is a valid choice)."""
    from gradlab.core.config import Slot, resolve_config
    from gradlab.models import MODELS
    from gradlab.optim import OPTIMIZERS
    from gradlab.training.options import TRAIN_OPTIONS, validate_train_config
    from gradlab_cli._common import run_options

    slots = [Slot("model", MODELS), Slot("dataset", DATASETS), Slot("opt", OPTIMIZERS)]
    cfg = resolve_config(run_options() + TRAIN_OPTIONS, slots, [("", {"device": "cpu", **flags})], command="train")
    return validate_train_config(cfg)


def bare_loop(cfg) -> tuple[float, int]:
    """The loop a user writes, with the optimizer object gradlab builds for this config."""
    from gradlab.data import dataset_options_in, load_dataset
    from gradlab.models import build_model, model_options_in
    from gradlab.optim import OPTIMIZERS, build_optimizer
    from gradlab.training.callbacks import evaluate

    torch.manual_seed(cfg["seed"])
    data = load_dataset(cfg["dataset"], seed=cfg["seed"], data_dir=cfg.get("data_dir"),
                        **dataset_options_in(cfg["dataset"], cfg))
    model = build_model(cfg["model"], data.spec, **model_options_in(cfg["model"], cfg))
    own = OPTIMIZERS.entry(cfg["opt"]).options.names()
    opt = build_optimizer(cfg["opt"], model.parameters(), seed=cfg["seed"],
                          **{**{k: cfg[k] for k in own if k in cfg}, "lr": cfg["lr"]})
    x, y, n, bs = data.x_train, data.y_train, len(data.x_train), cfg["batch_size"]
    steps = 0
    gc.collect()
    t0 = time.perf_counter()
    for epoch in range(cfg["epochs"]):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg["seed"] + epoch))
        model.train()
        for i in range(0, n, bs):
            idx = perm[i : i + bs]
            # gradients freed before the forward pass, as gradlab's step and torch's examples do:
            # freed after it, the allocator's pattern differs and the CNNs' steps get slower
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            steps += 1
        evaluate(model, data.x_test, data.y_test)
    return time.perf_counter() - t0, steps


def gradlab_fit(cfg) -> tuple[float, int]:
    """``gradlab train``'s work after the config: fit into a fresh run folder, then finish it."""
    from gradlab.runs import RunDir
    from gradlab.training.loop import Trainer

    trainer = Trainer(cfg)  # data, model and optimizer: built outside the timed part, as in bare_loop
    with tempfile.TemporaryDirectory() as tmp:
        run = RunDir.create(tmp, "train", None, cfg)
        run.tb  # the first call imports TensorBoard's writer: a one-off start-up, not a per-step cost
        gc.collect()
        t0 = time.perf_counter()
        result = trainer.fit(run)
        run.finish(result.status, result.metrics)
        dt = time.perf_counter() - t0
        if result.status != "completed" or not (run.path / "checkpoints" / "last.pt").is_file():
            raise RuntimeError(f"the benchmark's training run did not complete: {result.status} {result.message}")
    return dt, result.metrics["steps"]


def ratio_stats(xs, ys) -> tuple[float, float, float]:
    """Median and quartiles of the within-round ratios ``x / y``."""
    rs = [x / y for x, y in zip(xs, ys)]
    med = statistics.median(rs)
    q1, _, q3 = statistics.quantiles(rs, n=4) if len(rs) > 1 else (med, med, med)
    return med, q1, q3


def time_cmd(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def bench_startup(rounds: int) -> list[tuple[str, float, float, float, float]]:
    exe = str(Path(sys.executable).with_name("gradlab"))
    cmds = {"gradlab --help": [exe, "--help"], "gradlab train --help": [exe, "train", "--help"],
            "import torch": [sys.executable, "-c", "import torch"]}
    time_cmd(cmds["gradlab train --help"])  # writes the manifest if it is missing or stale
    times: dict[str, list] = {k: [] for k in cmds}
    names = list(cmds)
    for r in range(rounds):
        for name in names[r % 3:] + names[:r % 3]:  # rotate which goes first
            times[name].append(time_cmd(cmds[name]))
    out = []
    for name in names[:2]:
        med, q1, q3 = ratio_stats(times[name], times["import torch"])
        out.append((name, statistics.median(times[name]), med, q1, q3))
    print(f"start-up, {rounds} rounds: import torch {statistics.median(times['import torch']) * 1e3:.0f} ms")
    for name, t, med, q1, q3 in out:
        verdict = "pass" if med <= 0.5 else "FAIL"
        print(f"  {name:22s} {t * 1e3:7.0f} ms   / import torch {med:.3f} (IQR {q1:.3f}-{q3:.3f})  "
              f"target <= 0.5: {verdict}")
    return out


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, torch threads {torch.get_num_threads()}, "
            f"Python {platform.python_version()}, load average {os.getloadavg()[0]:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=11, help="rounds (each runs both loops once per case)")
    ap.add_argument("--epochs", type=int, default=None, help="epochs for every case (default: 15 mlp, 3 cnn, 2 resnet20)")
    ap.add_argument("--cases", default="mlp,cnn,resnet20,startup", help="comma-separated: mlp, cnn, resnet20, startup")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    chosen = [c.strip() for c in args.cases.split(",") if c.strip()]
    cases = make_cases()
    unknown = [c for c in chosen if c not in (*cases, "startup")]
    if unknown:
        ap.error(f"unknown case {unknown[0]!r}; choose from: {', '.join([*cases, 'startup'])}")
    print(machine())
    rows = []
    for key in (c for c in chosen if c in cases):
        case = cases[key]
        cfg = resolve({**case.flags, "epochs": args.epochs or case.epochs})
        loops = [(bare_loop, case.bare), (gradlab_fit, case.ours)]
        t_start = time.perf_counter()
        for fn, _ in loops:  # one untimed fit of each: first calls (lazy imports, the allocator's growth)
            fn(cfg)
        for r in range(args.rounds):
            for fn, store in loops if r % 2 == 0 else loops[::-1]:
                t, steps = fn(cfg)
                store.append(t / steps)
        med, q1, q3 = ratio_stats(case.ours, case.bare)
        b, o = statistics.median(case.bare), statistics.median(case.ours)
        verdict = "pass" if med <= case.target else "FAIL"
        rows.append((case.label, b, o, med, q1, q3, case.target, verdict))
        print(f"{case.label}: {cfg['opt']}, {cfg['epochs']} epochs, {steps} steps a fit, "
              f"{args.rounds} rounds in {time.perf_counter() - t_start:.0f} s")
        print(f"  bare loop {b * 1e3:8.3f} ms/step   gradlab train {o * 1e3:8.3f} ms/step   "
              f"(+{(o - b) * 1e6:.0f} us/step)")
        print(f"  ratio {med:.3f} (IQR {q1:.3f}-{q3:.3f}), target <= {case.target:.2f}: {verdict}", flush=True)
    startup = bench_startup(args.rounds) if "startup" in chosen else []
    if rows:
        print("\n| case | bare ms/step | gradlab ms/step | ratio (IQR) | target | |")
        print("|---|---:|---:|---:|---:|---|")
        for label, b, o, med, q1, q3, target, verdict in rows:
            print(f"| {label} | {b * 1e3:.2f} | {o * 1e3:.2f} | {med:.3f} ({q1:.3f}-{q3:.3f}) | <= {target:.2f} | {verdict} |")
    for name, t, med, q1, q3 in startup:
        print(f"| {name} / import torch | | {t * 1e3:.0f} ms | {med:.3f} ({q1:.3f}-{q3:.3f}) | <= 0.50 | "
              f"{'pass' if med <= 0.5 else 'FAIL'} |")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
