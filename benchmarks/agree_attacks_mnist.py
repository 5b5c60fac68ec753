"""Robust accuracy of gradlab's APGD, APGD-T and AutoAttack against torchattacks' on an MNIST model.

Issue 16 asks for agreement within 0.5 percentage points on the digits *and* MNIST models; the
digits case is in the tests (``tests/test_attacks_apgd.py``, ``test_attacks_autoattack.py``),
which cannot rely on the MNIST files or on torchattacks being installed. This script makes the
MNIST comparison: it takes a trained gradlab run (``--run``; by default it trains the digits-zoo
MLP on MNIST for 3 epochs into a temporary runs folder), the first ``--n`` test images, and for
each eps prints gradlab's and torchattacks' robust accuracy like for like (100 steps, the same
Square budget inside AutoAttack, torchattacks' members in a ``MultiAttack`` because its own
``AutoAttack`` runs 10 steps), their difference in points, and PGD-20's as the ceiling both must
stay under. Not a timing: accuracy only.

    GRADLAB_DATA=DIR python benchmarks/agree_attacks_mnist.py [--run RUN] [--n 500] [--eps 0.1,0.3]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile

import torch


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return float((model(x).argmax(dim=1) == y).float().mean())


def trained_run(folder: str) -> str:
    out = subprocess.run([sys.executable, "-m", "gradlab", "train", "--dataset", "mnist", "--model", "mlp",
                          "--epochs", "3", "--runs-dir", folder, "--quiet", "--device", "cpu"],
                         capture_output=True, text=True, check=True).stdout
    return [line[5:].strip() for line in out.splitlines() if line.startswith("run: ")][-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", help="a trained MNIST run (default: train one for 3 epochs)")
    ap.add_argument("--n", type=int, default=500, help="test images attacked")
    ap.add_argument("--eps", default="0.1,0.3")
    ap.add_argument("--queries", type=int, default=1000, help="Square's budget inside AutoAttack")
    args = ap.parse_args()
    import torchattacks

    from gradlab.attacks import build_attack
    from gradlab.training.load import load_run

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        run = load_run(args.run or trained_run(tmp), device="cpu")
    model = run.model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x, y = run.data.x_test[: args.n], run.data.y_test[: args.n]
    print(f"# {args.n} MNIST test images, clean accuracy {accuracy(model, x, y):.4f}; linf; 100 steps")
    print(f"{'eps':>5} {'attack':<11} {'gradlab':>8} {'torchattacks':>12} {'diff (pts)':>10} {'PGD-20':>7}")
    for eps in (float(e) for e in args.eps.split(",")):
        pgd = accuracy(model, build_attack("pgd", model, eps, steps=20, seed=0)(x, y), y)
        pairs = {
            "APGD-CE": (build_attack("apgd", model, eps, seed=0), torchattacks.APGD(model, eps=eps, steps=100, seed=0)),
            "APGD-T": (build_attack("apgd", model, eps, loss="dlr", targeted=True, seed=0),
                       torchattacks.APGDT(model, eps=eps, steps=100, n_classes=10, seed=0)),
            "AutoAttack": (build_attack("autoattack", model, eps, n_queries=args.queries, seed=0),
                           torchattacks.MultiAttack([
                               torchattacks.APGD(model, eps=eps, steps=100, seed=0),
                               torchattacks.APGDT(model, eps=eps, steps=100, n_classes=10, seed=0),
                               torchattacks.FAB(model, eps=eps, steps=100, multi_targeted=True, n_classes=10, seed=0),
                               torchattacks.Square(model, eps=eps, n_queries=args.queries, seed=0)])),
        }
        for name, (ours, theirs) in pairs.items():
            a, b = accuracy(model, ours(x, y), y), accuracy(model, theirs(x, y), y)
            print(f"{eps:>5g} {name:<11} {a:>8.4f} {b:>12.4f} {100 * (a - b):>+10.1f} {pgd:>7.4f}", flush=True)


if __name__ == "__main__":
    main()
