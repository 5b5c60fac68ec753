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
of the within-round ratios, with their interquartile range, and median wall times.

    python benchmarks/bench_instruments.py [--rounds 5] [--threads 1] [--epochs 15]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings

import torch
from torch import nn

INSTRUMENTS = "gradstats:every=10,stepquality:every=10"


def gradlab_fit(model: str, epochs: int, probe):
    from gradlab.runs.folder import RunDir
    from gradlab.training.loop import Trainer
    from gradlab.training.options import train_defaults, validate_train_config

    def run():
        with tempfile.TemporaryDirectory() as tmp:
            cfg = validate_train_config({**train_defaults(), "runs_dir": tmp, "name": None, "seed": 0, "device": "cpu",
                                         "model": model, "dataset": "digits", "epochs": epochs, "probe": probe})
            t0 = time.perf_counter()
            trainer = Trainer(cfg)
            r = RunDir.create(tmp, "train", None, cfg, argv=["bench"])
            result = trainer.fit(r)
            r.finish(result.status, result.metrics)
            return time.perf_counter() - t0

    return run


def sequential(model: str) -> nn.Module:
    if model == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                             nn.Linear(128, 10))
    return nn.Sequential(nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5, padding=2),
                         nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64, 120), nn.ReLU(), nn.Linear(120, 84),
                         nn.ReLU(), nn.Linear(84, 10))


def cockpit_fit(model: str, epochs: int, with_cockpit: bool):
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
            qs = [q(every) for q in (quantities.Alpha, quantities.Distance, quantities.UpdateSize, quantities.GradNorm,
                                     quantities.NormTest, quantities.InnerTest, quantities.OrthoTest,
                                     quantities.MeanGSNR)]
            cockpit = Cockpit(net.parameters(), quantities=qs)
        t0 = time.perf_counter()
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
        return time.perf_counter() - t0

    return run


def iqr(values):
    if len(values) < 2:
        return values[0], values[0]
    q1, _, q3 = statistics.quantiles(values, n=4)
    return q1, q3


def bench(model: str, epochs: int, rounds: int) -> None:
    methods = {"gradlab": gradlab_fit(model, epochs, None), "gradlab+instruments": gradlab_fit(model, epochs, INSTRUMENTS)}
    try:
        methods["cockpit loop"] = cockpit_fit(model, epochs, False)
        methods["cockpit loop+quantities"] = cockpit_fit(model, epochs, True)
    except ImportError as e:
        print(f"{model}: Cockpit is not importable ({e}); gradlab alone")
    for f in methods.values():  # warm-up
        f()
    names, times = list(methods), {k: [] for k in methods}
    for r in range(rounds):
        for k in names[r % len(names):] + names[: r % len(names)]:
            times[k].append(methods[k]())
    print(f"\n{model} on digits, {epochs} epochs: median s " + ", ".join(
        f"{k} {statistics.median(v):.2f}" for k, v in times.items()))
    pairs = [("gradlab+instruments", "gradlab")]
    if "cockpit loop" in times:
        pairs.append(("cockpit loop+quantities", "cockpit loop"))
    for slow, base in pairs:
        ratios = [a / b for a, b in zip(times[slow], times[base])]
        q1, q3 = iqr(ratios)
        print(f"  {slow} / {base} = {statistics.median(ratios):.2f} (IQR {q1:.2f}-{q3:.2f})")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=15, help="epochs per run (15: gradlab train's default)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    print(f"# instruments every 10 steps: torch {torch.__version__}, {args.threads} thread(s), {args.rounds} rounds")
    for model in ("mlp", "cnn"):
        bench(model, args.epochs, args.rounds)


if __name__ == "__main__":
    main()
