"""What the training-time instruments cost: a run with them every 10 steps against one without,
for gradlab and, side by side in the same process, for Cockpit with its comparable quantities.

gradlab: ``Trainer(cfg).fit`` of the digits MLP (64-128-128-10) and the zoo CNN (LeNet-style)
on digits, Adam, batch 64, 15 epochs (345 steps, gradlab train's defaults), without probes and with ``--probe
gradstats:every=10,stepquality:every=10`` (variance, SNR, B_simple, norm / inner-product /
orthogonality tests, alpha, update/weight ratios, distance from init, the dashboard and the
overview PNG at the end). The timed fit includes what every run does (per-epoch evaluation,
checkpoints, metric rows).

Cockpit: a plain PyTorch loop over the same batches of an equivalent ``nn.Sequential`` (BackPACK
cannot extend gradlab's input normalisation), without Cockpit and with ``Cockpit(quantities=
[Alpha, Distance, UpdateSize, GradNorm, NormTest, InnerTest, OrthoTest, MeanGSNR])`` on
``schedules.linear(10)``: the same instruments. Each framework's overhead is its own ratio
(with / without), so the two loops' different fixed costs do not enter.

Each round runs the four configurations once, rotating the order; printed: medians over rounds
of the within-round ratios, with their interquartile range, and median times, by the wall clock
and by this process's CPU time (``time.process_time``: on a loaded machine the wall clock also
counts the time the process waited for a core; the CPU time does not). gradlab's row is also
given without the end-of-run overview figure (the Dashboard's ``on_fit_end``, timed inside the
run): a fixed cost per run, not per step, which Cockpit's loop does not pay (its figures are a
separate ``CockpitPlotter`` call).

``--curvature`` adds the curvature instruments, which Cockpit keeps out of its cheap
("economy") configuration and puts in "business"/"full": gradlab's ``hessian:every=10``
(lambda_max and trace) against Cockpit's ``HessMaxEV`` and ``HessTrace`` on the same schedule.

    python benchmarks/bench_instruments.py [--rounds 5] [--threads 1] [--epochs 15] [--curvature]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings

import torch
from torch import nn

INSTRUMENTS = "gradstats:every=10,stepquality:every=10"
CURVATURE = "hessian:every=10"


class Times:
    """Wall and CPU seconds of one run, and the part of them the overview figure took."""

    def __init__(self, wall, cpu, fig_wall=0.0, fig_cpu=0.0):
        self.wall, self.cpu, self.fig_wall, self.fig_cpu = wall, cpu, fig_wall, fig_cpu


def gradlab_fit(model: str, epochs: int, probe):
    from gradlab.runs.folder import RunDir
    from gradlab.training.loop import Trainer
    from gradlab.training.options import train_defaults, validate_train_config

    def run():
        with tempfile.TemporaryDirectory() as tmp:
            cfg = validate_train_config({**train_defaults(), "runs_dir": tmp, "name": None, "seed": 0, "device": "cpu",
                                         "model": model, "dataset": "digits", "epochs": epochs, "probe": probe})
            t0, c0 = time.perf_counter(), time.process_time()
            trainer = Trainer(cfg)
            fig = [0.0, 0.0]
            for cb in trainer.callbacks:
                if type(cb).__name__ == "Dashboard":
                    cb.on_fit_end = timed(cb.on_fit_end, fig)
            r = RunDir.create(tmp, "train", None, cfg, argv=["bench"])
            result = trainer.fit(r)
            r.finish(result.status, result.metrics)
            return Times(time.perf_counter() - t0, time.process_time() - c0, *fig)

    return run


def timed(fn, acc):
    def wrapper(*args, **kwargs):
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            acc[0] += time.perf_counter() - t0
            acc[1] += time.process_time() - c0
    return wrapper


def sequential(model: str) -> nn.Module:
    if model == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                             nn.Linear(128, 10))
    return nn.Sequential(nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5, padding=2),
                         nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64, 120), nn.ReLU(), nn.Linear(120, 84),
                         nn.ReLU(), nn.Linear(84, 10))


def cockpit_fit(model: str, epochs: int, with_cockpit: bool, curvature: bool = False):
    import pkg_resources  # noqa: F401  (cockpit imports it)
    from backpack import extend
    from cockpit import Cockpit, quantities
    from cockpit.utils import schedules

    from gradlab.data import load_dataset

    data = load_dataset("digits", seed=0)
    x_all, y_all = data.x_train.float(), data.y_train

    def run():
        torch.manual_seed(0)
        net = extend(sequential(model))
        loss_fn = extend(nn.CrossEntropyLoss())
        per_example = nn.CrossEntropyLoss(reduction="none")
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        cockpit = None
        if with_cockpit:
            every = schedules.linear(10)
            chosen = ((quantities.HessMaxEV, quantities.HessTrace) if curvature else
                      (quantities.Alpha, quantities.Distance, quantities.UpdateSize, quantities.GradNorm,
                       quantities.NormTest, quantities.InnerTest, quantities.OrthoTest, quantities.MeanGSNR))
            qs = [q(every) for q in chosen]
            cockpit = Cockpit(net.parameters(), quantities=qs)
        t0, c0 = time.perf_counter(), time.process_time()
        step = 0
        for epoch in range(epochs):
            order = torch.randperm(len(x_all), generator=torch.Generator().manual_seed(epoch))
            for idx in order.split(64):
                x, y = x_all[idx], y_all[idx]
                opt.zero_grad()
                out = net(x)
                loss = loss_fn(out, y)
                if cockpit is None:
                    loss.backward()
                else:
                    info = {"batch_size": len(x), "individual_losses": per_example(out, y), "loss": loss,
                            "optimizer": opt}
                    with cockpit(step, info=info):
                        loss.backward(create_graph=cockpit.create_graph(step))
                opt.step()
                step += 1
        return Times(time.perf_counter() - t0, time.process_time() - c0)

    return run


def iqr(values):
    if len(values) < 2:
        return values[0], values[0]
    q1, _, q3 = statistics.quantiles(values, n=4)
    return q1, q3


def bench(model: str, epochs: int, rounds: int, curvature: bool = False) -> None:
    methods = {"gradlab": gradlab_fit(model, epochs, None), "gradlab+instruments": gradlab_fit(model, epochs, INSTRUMENTS)}
    pairs = [("gradlab+instruments", "gradlab")]
    if curvature:
        methods["gradlab+curvature"] = gradlab_fit(model, epochs, CURVATURE)
        pairs.append(("gradlab+curvature", "gradlab"))
    try:
        methods["cockpit loop"] = cockpit_fit(model, epochs, False)
        methods["cockpit loop+quantities"] = cockpit_fit(model, epochs, True)
        pairs.append(("cockpit loop+quantities", "cockpit loop"))
        if curvature:
            methods["cockpit loop+curvature"] = cockpit_fit(model, epochs, True, curvature=True)
            pairs.append(("cockpit loop+curvature", "cockpit loop"))
    except ImportError as e:
        print(f"{model}: Cockpit is not importable ({e}); gradlab alone")
    for f in methods.values():  # warm-up
        f()
    names, times = list(methods), {k: [] for k in methods}
    load = [os.getloadavg()[0]]
    for r in range(rounds):
        for k in names[r % len(names):] + names[: r % len(names)]:
            times[k].append(methods[k]())
        load.append(os.getloadavg()[0])
    print(f"\n{model} on digits, {epochs} epochs; load average (1 min) {min(load):.1f}-{max(load):.1f} over the rounds")
    print("  median s (wall / cpu): " + ", ".join(
        f"{k} {statistics.median(t.wall for t in v):.2f} / {statistics.median(t.cpu for t in v):.2f}"
        for k, v in times.items()))
    for slow, base in pairs:
        for clock in ("wall", "cpu"):
            rows = [(getattr(a, clock) / getattr(b, clock), (getattr(a, clock) - getattr(a, f"fig_{clock}"))
                     / getattr(b, clock)) for a, b in zip(times[slow], times[base])]
            line = f"  {clock:4s} {slow} / {base} = {fmt([r[0] for r in rows])}"
            if slow.startswith("gradlab") and any(t.fig_cpu for t in times[slow]):
                figs = [getattr(t, f"fig_{clock}") for t in times[slow]]
                line += f"; without the overview figure {fmt([r[1] for r in rows])} (figure {statistics.median(figs):.2f} s)"
            print(line)


def fmt(ratios) -> str:
    q1, q3 = iqr(ratios)
    return f"{statistics.median(ratios):.2f} (IQR {q1:.2f}-{q3:.2f}, range {min(ratios):.2f}-{max(ratios):.2f})"


COLD = """
import time
import pandas as pd
import torch  # noqa: F401  (both kinds of run have it)
c = time.process_time()
import matplotlib.backends.backend_agg, matplotlib.collections, matplotlib.figure, PIL.Image  # noqa: E401,F401
from gradlab.training.overview import overview_figure
from gradlab.training.overview_draw import png_bytes
frame = pd.DataFrame({"step": list(range(10, 350, 10)) * 3, "split": ["train-step"] * 102,
                      "metric": ["loss"] * 34 + ["grad_norm"] * 34 + ["lr"] * 34, "value": [1.0] * 102})
t1 = time.process_time()
png_bytes(overview_figure(frame, "cold")[0])
t2 = time.process_time()
png_bytes(overview_figure(frame, "warm")[0])
print(f"{t1 - c:.3f} {t2 - t1:.3f} {time.process_time() - t2:.3f}")
"""


def cold_figure_cost() -> str:
    """What a fresh process pays for its first overview figure (the ``gradlab train`` case; the
    rounds above run in one process, which imported matplotlib in the warm-up): the import, the
    first figure, a second one (3 panels), CPU seconds, in a child process."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", COLD], capture_output=True, text=True, check=True).stdout.split()
    return f"matplotlib import {out[0]} s, first 3-panel figure {out[1]} s, the next {out[2]} s (CPU)"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=15, help="epochs per run (15: gradlab train's default)")
    ap.add_argument("--curvature", action="store_true", help="also time the curvature instruments (Cockpit's "
                    "HessMaxEV + HessTrace against gradlab's hessian probe)")
    ap.add_argument("--models", default="mlp,cnn")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    print(f"# instruments every 10 steps: torch {torch.__version__}, {args.threads} thread(s), {args.rounds} rounds")
    for model in args.models.split(","):
        bench(model, args.epochs, args.rounds, args.curvature)
    print("\nfixed cost of the figure in a fresh process (a run without instruments imports no matplotlib): "
          + cold_figure_cost())


if __name__ == "__main__":
    main()
