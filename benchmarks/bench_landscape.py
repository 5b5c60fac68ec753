"""Landscape grid: gradlab against loss-landscapes' ``random_plane``, speed and correctness.

A 21 x 21 filter-normalised random plane around the same trained model and the same batch of
512 digits, for the zoo's MLP and CNN (trained here for a few epochs). Reported:

* speed: per grid point, as a ratio to one forward pass of the batch (gradlab's limit: 1.5x) and
  to the peer (target: gradlab at least as fast). Times are per-thread CPU time with one intra-op
  thread (the machine is shared; CPU time is what other processes inflate least; wall-clock
  medians are printed too). The jobs run round-robin for ``--repeats`` rounds; each ratio is
  the median over rounds of the ratio within a round, so slow and fast load phases cancel.
  A grid point costs the forward pass plus the loss (~27 us here), the accuracy (~38 us) and
  writing the weights (~20 us for the MLP); the peer computes no accuracy.
* the peer's grid, measured by recording the weights its metric sees at every call: whether the
  start point is on the grid, the offset of alternate columns along the second direction, and
  the state it leaves the model in (relative weight change, ``requires_grad``).
* gradlab's grid: the centre point's loss against the model's own loss (exact), and the model
  untouched afterwards.

Run: ``python benchmarks/bench_landscape.py`` (about a minute; needs ``pip install -c
constraints-cpu.txt loss-landscapes``, the ``bench`` extra).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

from gradlab.data import load_dataset
from gradlab.landscape.directions import random_directions
from gradlab.landscape.grid import evaluate_grid, grid_coords, make_axes
from gradlab.models import build_model

STEPS = 21


def train(name, data, epochs, seed=0):
    torch.manual_seed(seed)
    model = build_model(name, data.spec)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(data.x_train), generator=g)
        for i in range(0, len(perm), 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            F.cross_entropy(model(data.x_train[idx]), data.y_train[idx]).backward()
            opt.step()
    return model.eval()


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()


def peer_grid_geometry(model, x, y):
    """Record the weights at each of the peer's evaluations and express them in its own basis."""
    import loss_landscapes
    from loss_landscapes.metrics import Metric

    class Record(Metric):
        def __init__(self):
            super().__init__()
            self.points = []

        def __call__(self, mw):
            # (the wrapper's own parameters() yields generators, so walk its modules instead)
            ps = [p for m in mw.get_modules() for p in m.parameters()]
            self.points.append(torch.cat([p.detach().reshape(-1) for p in ps]).double())
            return 0.0

    theta = flat(model)
    rec = Record()
    loss_landscapes.random_plane(copy.deepcopy(model), rec, distance=1, steps=STEPS, normalization="filter",
                                 deepcopy_model=False)
    # the peer walks column by column, alternating direction; rebuild the (i, j) layout it returns
    P = {}
    k = 0
    for i in range(STEPS):
        col = rec.points[k : k + STEPS]
        k += STEPS
        if i % 2 == 1:
            col = col[::-1]
        for j, p in enumerate(col):
            P[i, j] = p
    d2 = P[0, 1] - P[0, 0]
    d1 = (P[2, 0] - P[0, 0]) / 2  # columns 0 and 2 are generated the same way
    B = torch.stack([d1, d2], dim=1)

    def coords(p):
        return torch.linalg.lstsq(B, (p - theta).unsqueeze(1)).solution.squeeze(1)

    c00, c10 = coords(P[0, 0]), coords(P[1, 0])
    centre = coords(P[STEPS // 2, STEPS // 2])
    dist_to_grid = min(float((P[ij] - theta).norm()) for ij in P) / float(d2.norm())
    return {
        "centre_cell_coords": (float(centre[0]), float(centre[1])),
        "column_shift_steps": float(c10[1] - c00[1]),
        "start_to_nearest_point_steps": dist_to_grid,
    }


def peer_side_effects(model, x, y):
    import loss_landscapes
    from loss_landscapes.metrics import Loss

    m = copy.deepcopy(model)
    before = flat(m)
    with torch.no_grad():
        true_loss = float(F.cross_entropy(m(x), y))
    grid = loss_landscapes.random_plane(m, Loss(F.cross_entropy, x, y), distance=1, steps=STEPS,
                                        normalization="filter", deepcopy_model=False)
    moved = float((flat(m) - before).norm() / before.norm())
    rg = all(p.requires_grad for p in m.parameters())
    centre = float(grid[STEPS // 2, STEPS // 2])
    return {"moved_rel": moved, "requires_grad_kept": rg, "centre_cell_loss": centre, "true_loss": true_loss,
            "min_abs_diff_to_true": float(abs(torch.as_tensor(grid) - true_loss).min())}


def bench(name, data, args):
    model = train(name, data, args.epochs)
    x, y = data.x_train[:512], data.y_train[:512]
    batches = [(x, y)]
    axes = make_axes(-1.0, 1.0, STEPS, 2)
    coords = grid_coords(axes)
    dirs = random_directions(model, 2, generator=torch.Generator().manual_seed(0))
    n = STEPS * STEPS

    def forward50():
        with torch.no_grad():
            for _ in range(50):
                model(x)

    before = {k: v.clone() for k, v in model.state_dict().items()}
    jobs = {"forward": (forward50, 50)}
    for method, ppc in [("inplace", 1), ("functional", 1)] + [("functional", p) for p in args.vmap]:
        key = f"gradlab {method}" + (f" vmap{ppc}" if ppc > 1 else "")
        jobs[key] = ((lambda m=method, p=ppc: evaluate_grid(model, dirs, coords, batches, method=m, points_per_call=p)), n)
    peer = None
    try:
        import loss_landscapes
        from loss_landscapes.metrics import Loss

        def run_peer():
            with torch.no_grad():
                loss_landscapes.random_plane(copy.deepcopy(model), Loss(F.cross_entropy, x, y), distance=1,
                                             steps=STEPS, normalization="filter", deepcopy_model=False)

        jobs["loss-landscapes random_plane"] = (run_peer, n)
    except ImportError:
        print("loss-landscapes is not installed (pip install -c constraints-cpu.txt loss-landscapes): gradlab alone")
    forward50()  # warm-up
    # round-robin over the jobs, so every one sees the same mix of load phases on a shared machine
    samples = {k: ([], []) for k in jobs}
    for _ in range(args.repeats):
        for k, (fn, count) in jobs.items():
            c0, w0 = time.thread_time(), time.perf_counter()
            fn()
            samples[k][0].append((time.thread_time() - c0) / count)
            samples[k][1].append((time.perf_counter() - w0) / count)
    med = {k: (statistics.median(c), statistics.median(w)) for k, (c, w) in samples.items()}
    fwd_cpu, fwd_wall = med.pop("forward")
    rows = med
    # ratios paired within a round (same load phase), then the median over rounds
    fc = samples["forward"][0]
    ratio_fwd = {k: statistics.median(a / b for a, b in zip(samples[k][0], fc)) for k in rows}
    peer_key = "loss-landscapes random_plane"
    ratio_peer = ({k: statistics.median(a / b for a, b in zip(samples[k][0], samples[peer_key][0])) for k in rows}
                  if peer_key in rows else {})
    untouched = all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    res = evaluate_grid(model, dirs, coords, batches)
    c = int(((coords[:, 0] == 0) & (coords[:, 1] == 0)).nonzero())
    with torch.no_grad():
        true_loss = float(F.cross_entropy(model(x), y))
    if "loss-landscapes random_plane" in rows:
        peer = {**peer_side_effects(model, x, y), **peer_grid_geometry(model, x, y)}

    nparams = sum(p.numel() for p in model.parameters())
    print(f"\n== {name} ({nparams} parameters), batch 512, {STEPS}x{STEPS} grid, {args.repeats} repeats ==")
    print(f"one forward pass: {fwd_cpu * 1e3:.3f} ms CPU ({fwd_wall * 1e3:.3f} ms wall)")
    for k, (cpu, wall) in rows.items():
        vs_peer = f" = {ratio_peer[k]:4.2f}x peer" if ratio_peer else ""
        print(f"{k:30s} {cpu * 1e3:7.3f} ms/point CPU = {ratio_fwd[k]:4.2f}x forward{vs_peer}   "
              f"(wall {wall * 1e3:7.3f} ms)")
    print(f"gradlab (default) per point / forward pass: {ratio_fwd['gradlab inplace']:.2f}x (limit 1.5x)")
    if peer is not None:
        print(f"gradlab (default) per point / peer per point: {ratio_peer['gradlab inplace']:.2f}x (target <= 1.0x)")
    print(f"gradlab: centre point loss {res.loss[c].item():.6f} vs model's own {true_loss:.6f} "
          f"(|diff| {abs(res.loss[c].item() - true_loss):.1e}); model untouched: {untouched}")
    if peer is not None:
        print(f"peer: centre cell loss {peer['centre_cell_loss']:.6f} vs model's own {peer['true_loss']:.6f}; "
              f"closest grid value differs by {peer['min_abs_diff_to_true']:.2e}")
        cx, cy = peer["centre_cell_coords"]
        print(f"peer: its centre cell sits at ({cx:+.2f}, {cy:+.2f}) steps from the start point; the start point "
              f"is {peer['start_to_nearest_point_steps']:.2f} steps from its nearest grid point")
        print(f"peer: alternate columns shifted by {peer['column_shift_steps']:+.2f} steps along the 2nd direction")
        print(f"peer: model left moved by {peer['moved_rel'] * 100:.0f}% of its weight norm; "
              f"requires_grad kept: {peer['requires_grad_kept']}")
    return rows, fwd_cpu


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--models", default="mlp,cnn")
    ap.add_argument("--vmap", default="4,16", help="points-per-call values for the vmapped variant")
    args = ap.parse_args()
    args.vmap = [int(v) for v in args.vmap.split(",") if v]
    torch.set_num_threads(1)  # see the module docstring: CPU time of one thread on a shared machine
    data = load_dataset("digits", seed=0)
    for name in args.models.split(","):
        bench(name, data, args)


if __name__ == "__main__":
    main()
