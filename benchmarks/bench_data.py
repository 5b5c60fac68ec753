"""Full-dataset top-1 Hessian eigenvalue over a streamed dataset: gradlab vs PyHessian's dataloader mode.

Data (--case), written to a temporary folder and read back streamed (:mod:`gradlab.data.stream`):

* ``digits``: scikit-learn's 1,797 digits as 8x8 grayscale PNG files in class folders, read with
  ``imagefolder stream=true channels=gray`` (a user's own image folder);
* ``cifar``: CIFAR-10-format pickle batches (random blocky images labelled by a random teacher
  CNN, so the labels are learnable), read with ``cifar10 stream=true``.

One ``DataLoader`` of the first --batches batches of --batch-size training examples (--workers
worker processes) serves both libraries. Model: the zoo's LeNet-style ``cnn``, trained for
--train-epochs on the streamed data so the Hessian is that of a model in training.

Methods, each in its own child process so that its peak RSS (``VmHWM``) is its own; both load
the same model state and data:

* ``pyhessian``: ``hessian(model, criterion, dataloader=loader, cuda=False).eigenvalues(top_n=1)``
  (power iteration, its defaults ``maxIter=100, tol=1e-3``; one pass over the data per iteration);
* ``gradlab``: ``block_eigsh(StreamedOperator(model, None, loader), k=1, block=--block)``
  (block Krylov, default ``tol=1e-3`` on the exact residual; one pass over the data per block of
  products, a group of batches' graph in memory at a time);
* ``gradlab-tol``: the same at ``tol=--loose-tol`` (default 0.1), to compare at PyHessian's error
  level rather than far below it (the certified bound is then ``tol`` relative; the measured error
  is printed);
* ``lanczos``: ``eigsh(StreamedOperator(...), k=1)`` (one product per pass, tol 1e-3);
* ``in-memory`` (memory reference only): the 10 batches stacked in memory and
  ``eigsh(HessianOperator(...))``, which keeps up to 8 batch graphs alive.

Reference: Lanczos at tol 1e-10 on the float64 copy of the model over the same data (its residual
bounds its error). Times exclude loading the data and the model (the same for all); rounds are
interleaved (seeds differ by round, the same for both methods); the speed-up is the median over
rounds of PyHessian's time / gradlab's, with the range.

    nice python benchmarks/bench_data.py [--rounds 3] [--batches 10] [--batch-size 128] [--workers 0]
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from gradlab.curvature import HessianOperator, eigsh  # noqa: E402
from gradlab.curvature.block_krylov import block_eigsh  # noqa: E402
from gradlab.curvature.streamed import StreamedOperator  # noqa: E402
from gradlab.data import load_dataset  # noqa: E402
from gradlab.models import build_model  # noqa: E402


def write_cifar(folder: Path, per_file: int, seed: int) -> None:
    """Five training files and a test file in the real pickle format, labels from a random CNN."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    teacher = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 5, stride=4), torch.nn.Tanh(), torch.nn.Flatten(),
                                  torch.nn.Linear(8 * 7 * 7, 10))
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        smooth = rng.random((per_file, 3, 8, 8)).repeat(4, axis=2).repeat(4, axis=3)  # blocky, not white noise
        data = (255 * (0.7 * smooth + 0.3 * rng.random((per_file, 3, 32, 32)))).astype(np.uint8)
        with torch.no_grad():
            labels = teacher(torch.tensor(data, dtype=torch.float32) / 255).argmax(1).tolist()
        batch = {b"data": data.reshape(per_file, -1), b"labels": labels}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))


def write_digits(folder: Path) -> None:
    """scikit-learn's digits as 8x8 grayscale PNG files in ``folder/CLASS/`` (an image folder)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    raw = load_digits()
    for i, (img, label) in enumerate(zip(raw.images, raw.target)):
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray((img * 255 / 16).round().astype(np.uint8), mode="L").save(folder / str(label) / f"{i:04d}.png")


def stream(args):
    if args.case == "digits":
        return load_dataset("imagefolder", data_dir=args.data, stream=True, workers=args.workers, channels="gray")
    return load_dataset("cifar10", data_dir=args.data, stream=True, workers=args.workers)


class Counted:
    """A loader that counts the passes made over it."""

    def __init__(self, loader):
        self.loader, self.passes = loader, 0

    def __iter__(self):
        self.passes += 1
        return iter(self.loader)

    def __len__(self):
        return len(self.loader)


def peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM: getrusage's maxrss would include the parent's)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prepare(args) -> None:
    """Write the data, train the model briefly, save its state and the float64 reference."""
    if args.case == "digits":
        write_digits(Path(args.data))
    else:
        write_cifar(Path(args.data), per_file=max(1, -(-args.batches * args.batch_size // 5)), seed=0)
    data = stream(args)
    torch.manual_seed(0)
    model = build_model("cnn", data.spec)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    limit = args.batches * args.batch_size
    for _ in range(args.train_epochs):
        for x, y in data.loader("train", 64, limit=limit):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    torch.save(model.state_dict(), Path(args.data) / "model.pt")  # beside the data: not an image file
    ref = eigsh(StreamedOperator(model.double(), None, data.loader("train", args.batch_size, limit=limit)), k=1,
                tol=1e-10, max_iter=200)
    (Path(args.data) / "ref.json").write_text(json.dumps({"lambda": float(ref.values[0]),
                                                          "residual": float(ref.residuals[0])}))


def child(args) -> None:
    """One measurement; prints a JSON line."""
    torch.set_num_threads(args.threads)
    data = stream(args)
    model = build_model("cnn", data.spec)
    model.load_state_dict(torch.load(Path(args.data) / "model.pt", weights_only=True))
    model.eval()
    loader = data.loader("train", args.batch_size, limit=args.batches * args.batch_size)
    torch.manual_seed(args.seed)
    counted = Counted(loader)
    if args.child == "pyhessian":
        from pyhessian import hessian

        t0 = time.perf_counter()
        vals, _ = hessian(model, torch.nn.CrossEntropyLoss(), dataloader=counted, cuda=False).eigenvalues(top_n=1)
        elapsed, value = time.perf_counter() - t0, float(vals[0])
    else:
        if args.child == "in-memory":
            op = HessianOperator(model, None, [(x, y) for x, y in loader])
        else:
            op = StreamedOperator(model, None, counted)
        t0 = time.perf_counter()
        if args.child.startswith("gradlab"):
            tol = args.loose_tol if args.child == "gradlab-tol" else 1e-3
            res = block_eigsh(op, k=1, block=args.block, seed=args.seed, tol=tol)
        else:
            res = eigsh(op, k=1, seed=args.seed)
        elapsed, value = time.perf_counter() - t0, float(res.values[0])
        counted.passes = counted.passes if args.child != "in-memory" else res.num_matvecs
    passes = counted.passes
    print(json.dumps({"time": elapsed, "value": value, "passes": passes, "rss_mib": peak_rss_mib()}))


def run_child(args, method: str, seed: int) -> dict:
    cmd = [sys.executable, __file__, "--child", method, "--case", args.case, "--seed", str(seed), "--data", args.data,
           "--batches", str(args.batches), "--batch-size", str(args.batch_size), "--workers", str(args.workers),
           "--threads", str(args.threads), "--block", str(args.block),
           "--loose-tol", str(args.loose_tol)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", choices=("digits", "cifar"), default="digits")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batches", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--block", type=int, default=8, help="columns per pass of gradlab's block Krylov solver")
    p.add_argument("--train-epochs", type=int, default=3)
    p.add_argument("--loose-tol", type=float, default=0.1)
    p.add_argument("--child", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default=None)
    args = p.parse_args()
    if args.child:
        return child(args)
    with tempfile.TemporaryDirectory() as tmp:
        args.data = tmp
        torch.set_num_threads(args.threads)
        prepare(args)
        ref = json.loads((Path(tmp) / "ref.json").read_text())
        rows = {m: [] for m in ("pyhessian", "gradlab", "gradlab-tol", "lanczos", "in-memory")}
        for r in range(args.rounds):
            for m in rows:
                if m != "in-memory" or r == 0:
                    rows[m].append(run_child(args, m, seed=r))
    lam = ref["lambda"]
    print(f"{args.case}: top-1 eigenvalue of the cnn Hessian over {args.batches} streamed batches of {args.batch_size} "
          f"(workers {args.workers}, {args.threads} thread(s), load {os.getloadavg()[0]:.1f}); "
          f"reference {lam:.6g} (residual {ref['residual']:.1e})")
    print(f"{'method':<12} {'time s':>8} {'passes':>7} {'rel. error':>11} {'peak RSS MiB':>13}")
    for m, rs in rows.items():
        t = statistics.median(x["time"] for x in rs)
        err = statistics.median(abs(x["value"] - lam) / abs(lam) for x in rs)
        passes = f"{statistics.median(x['passes'] for x in rs):.0f}"
        print(f"{m:<12} {t:8.2f} {passes:>7} {err:11.2e} {max(x['rss_mib'] for x in rs):13.0f}")
    print("passes: over the data (in-memory: products through its kept graphs)")
    for m in ("gradlab", "gradlab-tol", "lanczos"):
        ratios = [a["time"] / b["time"] for a, b in zip(rows["pyhessian"], rows[m])]
        print(f"speed-up pyhessian / {m}: median {statistics.median(ratios):.2f} "
              f"[{min(ratios):.2f}, {max(ratios):.2f}] over {len(ratios)} rounds")


if __name__ == "__main__":
    main()
