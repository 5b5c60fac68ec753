"""FGSM, 10-step PGD, APGD and AutoAttack: gradlab against torchattacks on the same model and batch.

Run: ``python benchmarks/bench_attacks.py [--batch 512] [--repeats 15] [--threads 1]
[--rounds 3 --strong-batch 256 --queries 5000 | --no-strong | --only-strong | --only-minnorm |
--resnet [--attacks apgd,autoattack,cw,deepfool] [--resnet-batch 16]]``.
Needs the ``bench`` extra for the comparison (``pip install -c constraints-cpu.txt torchattacks``);
without torchattacks it reports gradlab alone.

For each model (an MLP and a small CNN, trained here on sklearn's 8x8 digits, seeded) it prints:

* throughput in examples per second (median over ``--repeats`` timed calls after warm-up; the two
  libraries alternate call by call so machine noise hits both alike) and the ratio
  gradlab / torchattacks (>= 1 means gradlab is at least as fast);
* the max abs difference between the two libraries' FGSM examples (should be <= 1e-6), and
  between their PGD examples without random start (same arithmetic, so also ~0);
* for APGD (CE, 100 steps) and AutoAttack (standard: APGD-CE, APGD-T, FAB-T at 100 steps, Square
  with ``--queries``), ``--rounds`` alternating timed calls of each library on ``--strong-batch``
  examples: throughput medians, the median and the min-max spread of the per-round ratios, and
  both libraries' robust accuracy (the same work: survivors decide what the later members cost).
  torchattacks' ``AutoAttack`` runs its members with 10 steps (its defaults), so it is compared
  as a ``MultiAttack`` of the same members at the reference's 100 steps;
* ``--only-minnorm``: CW (one c = 1, 50 Adam steps, lr 0.01: torchattacks' CW has no binary
  search; early abort in both, torchattacks' per batch, ours per example) and DeepFool (L2, 50
  steps, overshoot 0.02) on ``--minnorm-batch`` examples of the digits models: ex/s medians,
  ratio median [min, max] over ``--rounds``, and both libraries' median L2 over the examples
  both broke; below each row the quartiles of the per-example ratio of the norms and the medians
  over the examples whose points are adversarial beyond rounding noise in both (see
  ``rounding_line``);
* ``--resnet [--attacks apgd,autoattack,cw,deepfool]``: the slow cases alone, on resnet20
  (untrained) with ``--resnet-batch`` random 3x32x32 inputs labelled by its own predictions:
  the chosen attacks among APGD-CE and AutoAttack (linf 8/255, as above) and CW and DeepFool
  (as ``--only-minnorm``), in the same table.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from gradlab.attacks import attack_batch, build_attack
from gradlab.attacks.minnorm import NOISE_ULPS, class_margin
from gradlab.models.base import GradlabNet, Normalize


def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    return x, torch.tensor(d.target, dtype=torch.long)


def make_models():
    norm = lambda: Normalize([0.3], [0.4])  # noqa: E731
    mlp = GradlabNet(norm(), [nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.ReLU()),
                              nn.Sequential(nn.Linear(256, 256), nn.ReLU())], nn.Linear(256, 10))
    cnn = GradlabNet(norm(), [nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU()),
                              nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))],
                     nn.Sequential(nn.Flatten(), nn.Linear(32 * 16, 10)))
    return {"mlp": mlp, "cnn": cnn}


def train(model, x, y, steps=200):
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        idx = torch.randint(0, len(y), (128,))
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    return model.eval()


def timed(fn, repeats):
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def strong_pairs(model, eps: float, queries: int, torchattacks):
    """``{name: (gradlab call, torchattacks call)}`` for APGD-CE and AutoAttack, like for like."""
    g_apgd = build_attack("apgd", model, eps, seed=0)
    g_aa = build_attack("autoattack", model, eps, n_queries=queries, seed=0)
    t_apgd = torchattacks.APGD(model, eps=eps, steps=100, seed=0)
    t_aa = torchattacks.MultiAttack([
        torchattacks.APGD(model, eps=eps, steps=100, seed=0),
        torchattacks.APGDT(model, eps=eps, steps=100, n_classes=10, seed=0),
        torchattacks.FAB(model, eps=eps, steps=100, multi_targeted=True, n_classes=10, seed=0),
        torchattacks.Square(model, eps=eps, n_queries=queries, seed=0)])
    return {"apgd": (g_apgd, t_apgd), "autoattack": (g_aa, t_aa)}


def strong_rounds(models: dict, x, y, eps: float, rounds: int, queries: int, torchattacks) -> None:
    """Print the APGD / AutoAttack table: ex/s medians, ratio median [min, max], robust accuracies."""
    print(f"\nAPGD-CE and AutoAttack (100 steps, Square {queries} queries), batch {len(y)}, eps {eps}, "
          f"{rounds} alternating rounds")
    header = (f"{'model':5} {'attack':10} {'gradlab ex/s':>13} {'torchattacks ex/s':>18} {'ratio':>6} "
              f"{'[min, max]':>13}  robust acc gradlab / torchattacks")
    print(header)
    print("-" * len(header))
    for mname, model in models.items():
        for aname, (ours, theirs) in strong_pairs(model, eps, queries, torchattacks).items():
            t_ours, t_theirs, acc = [], [], {}
            for _ in range(rounds):  # alternate so both see the same machine load
                for who, fn, times in (("ours", ours, t_ours), ("theirs", theirs, t_theirs)):
                    t0 = time.perf_counter()
                    adv = fn(x, y)
                    times.append(time.perf_counter() - t0)
                    with torch.no_grad():
                        acc[who] = (model(adv).argmax(dim=1) == y).float().mean().item()
            ratios = sorted(b / a for a, b in zip(t_ours, t_theirs))
            r_ours, r_theirs = len(y) / statistics.median(t_ours), len(y) / statistics.median(t_theirs)
            print(f"{mname:5} {aname:10} {r_ours:13.0f} {r_theirs:18.0f} {statistics.median(ratios):6.2f} "
                  f"[{ratios[0]:.2f}, {ratios[-1]:.2f}]  {acc['ours']:.4f} / {acc['theirs']:.4f}")


def minnorm_pairs(model, torchattacks) -> dict:
    """``{name: (gradlab call, torchattacks call)}`` for CW and DeepFool, like for like; both
    return the adversarial examples (gradlab's: the clean input where none was found)."""
    g_cw = build_attack("cw", model, 1.0, steps=50, binary_search_steps=1, initial_const=1.0, lr=0.01)
    g_df = build_attack("deepfool", model, 1.0, norm="l2", steps=50, overshoot=0.02)
    return {"cw": (g_cw, torchattacks.CW(model, c=1, kappa=0, steps=50, lr=0.01)),
            "deepfool": (g_df, torchattacks.DeepFool(model, steps=50, overshoot=0.02))}


def minnorm_rounds(models: dict, data: dict, rounds: int, torchattacks, extra=None, only_extra=False,
                   title="Minimum-norm attacks") -> None:
    """CW / DeepFool (and ``extra``: more pairs per model; ``only_extra``: those alone) ex/s, ratio
    spread, median L2 of both."""
    print(f"\n{title}, {rounds} alternating rounds (ratio = gradlab ex/s / torchattacks ex/s)")
    header = (f"{'model':8} {'attack':10} {'n':>4} {'gradlab ex/s':>12} {'ta ex/s':>8} {'ratio':>6} "
              f"{'[min, max]':>13}  median L2 gradlab / ta")
    print(header)
    print("-" * len(header))
    for mname, model in models.items():
        x, y = data[mname]
        pairs = {} if only_extra else minnorm_pairs(model, torchattacks)
        if extra is not None:
            pairs.update(extra(model))
        for aname, (ours, theirs) in pairs.items():
            t_ours, t_theirs, adv = [], [], {}
            for _ in range(rounds):  # alternate so both see the same machine load
                for who, fn, times in (("ours", ours, t_ours), ("theirs", theirs, t_theirs)):
                    t0 = time.perf_counter()
                    adv[who] = fn(x, y)
                    times.append(time.perf_counter() - t0)
            ratios = sorted(b / a for a, b in zip(t_ours, t_theirs))
            with torch.no_grad():
                both = (model(adv["ours"]).argmax(1) != y) & (model(adv["theirs"]).argmax(1) != y)
                both &= model(x).argmax(1) == y
            dist = {w: (adv[w] - x).flatten(1).norm(dim=1) for w in adv}
            med = {w: d[both].median().item() if both.any() else float("nan") for w, d in dist.items()}
            print(f"{mname:8} {aname:10} {len(y):4d} {len(y) / statistics.median(t_ours):12.1f} "
                  f"{len(y) / statistics.median(t_theirs):8.1f} {statistics.median(ratios):6.2f} "
                  f"[{ratios[0]:.2f}, {ratios[-1]:.2f}]  {med['ours']:.7f} / {med['theirs']:.7f}")
            rounding_line(model, x, y, adv, dist, both)


def rounding_line(model, x, y, adv: dict, dist: dict, both) -> None:
    """Below a minimum-norm row: the per-example ratio of the two L2 norms on the examples both
    broke (quartiles), and the medians again on those whose points are adversarial by more than
    rounding noise in both libraries (margin ``max_{j != y} Z_j - Z_y`` above gradlab's refinement
    guard, ``NOISE_ULPS`` float32 ulps of the largest logit): a point on the boundary to one ulp
    (or a tie broken by argmax) counts as broken above but would not survive a re-evaluation in
    another batch."""
    if not both.any():
        return
    r = (dist["ours"][both] / dist["theirs"][both]).quantile(torch.tensor([0.25, 0.5, 0.75]))
    clear = both.clone()
    with torch.no_grad():
        for w in adv:
            z = model(adv[w])
            clear &= class_margin(z, y) > NOISE_ULPS * torch.finfo(z.dtype).eps * z.abs().amax(dim=1)
    med = {w: d[clear].median().item() if clear.any() else float("nan") for w, d in dist.items()}
    print(f"  both {int(both.sum())}, ratio q1-3 {r[0]:.6f} {r[1]:.6f} {r[2]:.6f}; past rounding {int(clear.sum())}: "
          f"{med['ours']:.5f} / {med['theirs']:.5f}")


def resnet20():
    from gradlab.data.base import DataSpec
    from gradlab.models import build_model

    spec = DataSpec("cifar10", (3, 32, 32), 10, [0.49, 0.48, 0.45], [0.25, 0.24, 0.26])
    return build_model("resnet20", spec).eval()


RESNET_ATTACKS = ("apgd", "autoattack", "cw", "deepfool")


def resnet_rounds(args, torchattacks) -> None:
    """resnet20 (untrained) on random 3x32x32 inputs labelled by its own predictions, so every
    example starts correct: the ``--attacks`` selected among APGD, AutoAttack (linf 8/255), CW and
    DeepFool (L2), timed like the digits models (:func:`minnorm_rounds`)."""
    chosen = [a.strip() for a in args.attacks.split(",") if a.strip()]
    bad = sorted(set(chosen) - set(RESNET_ATTACKS))
    if bad or not chosen:
        raise SystemExit(f"--attacks: choose from {', '.join(RESNET_ATTACKS)} (got {args.attacks!r})")
    model = resnet20()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(args.resnet_batch, 3, 32, 32, generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)

    def pairs(m):
        both = {**minnorm_pairs(m, torchattacks), **strong_pairs(m, 8 / 255, args.queries, torchattacks)}
        return {a: both[a] for a in chosen}

    print(f"resnet20, {args.resnet_batch} random 3x32x32 inputs, attacks {', '.join(chosen)}, "
          f"Square {args.queries} queries")
    minnorm_rounds({"resnet20": model}, {"resnet20": (x, y)}, args.rounds, torchattacks, pairs, only_extra=True,
                   title="resnet20 (median L2 also for the linf attacks)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: steadier on a shared CPU)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating timed rounds of APGD and AutoAttack")
    ap.add_argument("--strong-batch", type=int, default=256, help="examples per APGD / AutoAttack call")
    ap.add_argument("--queries", type=int, default=5000, help="Square's budget inside AutoAttack")
    ap.add_argument("--no-strong", action="store_true", help="FGSM and PGD only")
    ap.add_argument("--only-strong", action="store_true", help="APGD and AutoAttack only")
    ap.add_argument("--only-minnorm", action="store_true", help="CW and DeepFool only, on the digits models")
    ap.add_argument("--minnorm-batch", type=int, default=128, help="examples per CW / DeepFool call")
    ap.add_argument("--resnet", action="store_true", help="resnet20 on 3x32x32 alone, the --attacks chosen (slow)")
    ap.add_argument("--attacks", default=",".join(RESNET_ATTACKS),
                    help="with --resnet: comma list of apgd, autoattack, cw, deepfool (default: all four)")
    ap.add_argument("--resnet-batch", type=int, default=16, help="examples per call on resnet20")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    try:
        import torchattacks
    except Exception as e:  # noqa: BLE001 - any import failure means: report gradlab alone
        torchattacks = None
        print(f"torchattacks unavailable ({type(e).__name__}: {e}); reporting gradlab alone")
    x_all, y_all = digits()
    x, y = x_all[: args.batch], y_all[: args.batch]
    eps, steps = args.eps, 10
    alpha = 2.5 * eps / steps
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {len(y)}, eps {eps}, "
          f"PGD {steps} steps alpha {alpha:g}" + (f", torchattacks {torchattacks.__version__}" if torchattacks else ""))
    if args.resnet:
        if torchattacks is None:
            raise SystemExit("--resnet compares with torchattacks, which is unavailable")
        return resnet_rounds(args, torchattacks)
    models = make_models()
    for model in models.values():
        train(model, x_all, y_all)
    if args.only_minnorm:
        if torchattacks is None:
            raise SystemExit("--only-minnorm compares with torchattacks, which is unavailable")
        nb = args.minnorm_batch
        return minnorm_rounds(models, {m: (x_all[:nb], y_all[:nb]) for m in models}, args.rounds, torchattacks)
    if args.only_strong:
        if torchattacks is None:
            raise SystemExit("--only-strong compares with torchattacks, which is unavailable")
        return strong_rounds(models, x_all[: args.strong_batch], y_all[: args.strong_batch], eps, args.rounds,
                             args.queries, torchattacks)
    header = f"{'model':5} {'attack':5} {'gradlab ex/s':>13} {'torchattacks ex/s':>18} {'ratio':>6}  note"
    print(header)
    print("-" * len(header))
    for mname, model in models.items():
        # Both libraries' attack objects are built once and called per batch, as in a loop.
        g_fgsm = build_attack("fgsm", model, eps)
        g_pgd = build_attack("pgd", model, eps, steps=steps, alpha=alpha, random_start=True, seed=0)
        ours = {"fgsm": lambda: g_fgsm(x, y), "pgd": lambda: g_pgd(x, y)}
        theirs = {}
        if torchattacks is not None:
            ta_fgsm = torchattacks.FGSM(model, eps=eps)
            ta_pgd = torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=True)
            theirs = {"fgsm": lambda: ta_fgsm(x, y), "pgd": lambda: ta_pgd(x, y)}
        for aname in ("fgsm", "pgd"):
            for fn in [ours[aname]] + ([theirs[aname]] if theirs else []):
                fn()  # warm-up
            t_ours, t_theirs = [], []
            for _ in range(args.repeats):  # alternate so both see the same machine load
                t_ours += timed(ours[aname], 1)
                if theirs:
                    t_theirs += timed(theirs[aname], 1)
            r_ours = len(y) / statistics.median(t_ours)
            note = ""
            if theirs:
                r_theirs = len(y) / statistics.median(t_theirs)
                if aname == "fgsm":
                    diff = (ours["fgsm"]() - ta_fgsm(x, y)).abs().max().item()
                else:
                    ta_det = torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=False)
                    mine = attack_batch("pgd", model, x, y, eps, steps=steps, alpha=alpha, random_start=False)
                    diff = (mine - ta_det(x, y)).abs().max().item()
                    note_pgd = " (no random start)"
                note = f"max |diff| {diff:.2e}" + ("" if aname == "fgsm" else note_pgd)
                print(f"{mname:5} {aname:5} {r_ours:13.0f} {r_theirs:18.0f} {r_ours / r_theirs:6.2f}  {note}")
            else:
                print(f"{mname:5} {aname:5} {r_ours:13.0f} {'-':>18} {'-':>6}")
    if not args.no_strong and torchattacks is not None:
        strong_rounds(models, x_all[: args.strong_batch], y_all[: args.strong_batch], eps, args.rounds, args.queries,
                      torchattacks)


if __name__ == "__main__":
    main()
