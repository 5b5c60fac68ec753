"""Per-example input-output Jacobian spectra: gradlab against a per-example autograd loop.

Run: ``python benchmarks/bench_jacobian.py [--batch 256] [--inputs 784,64] [--width 512] [--repeats 5]``.

Workload: the singular values of d(logits)/d(input) for every example of a batch (default 256)
through an MLP with 3 hidden layers of width 512 (tanh, Gaussian init) and 10 outputs, for
MNIST-sized (784) and digits-sized (64) inputs. Timed,
side by side in one process (median of ``--repeats`` calls after one warm-up, the three
alternating call by call so machine noise hits them alike):

* ``gradlab``: :func:`gradlab.probes.jacobian.jacobian_probe` on the end-to-end map (dense path:
  ``vmap`` over examples of ``jacrev``, then batched ``svdvals``), statistics included;
* ``loop``: ``torch.autograd.functional.jacobian`` called on each example, then ``svdvals``
  (the straightforward way; target: gradlab >= 10x faster);
* ``fwd+bwd``: one forward and one backward pass of the batch's mean cross-entropy (the floor a
  per-example Jacobian approaches: the Jacobian needs ``classes`` backward passes' worth of work).

It also checks that both routes give the same singular values (max relative difference).

``--radius`` times the spectral radius of square layer Jacobians instead (``probe jacobian``
reports ``max |eig(J_l)|`` for every square map): per-example Jacobians (B, width, width) of a
ReLU and a tanh hidden layer of the same MLP, through

* ``gradlab``: :func:`gradlab.probes.jacobian_spectra.spectral_radius` (``torch.linalg.eigvals``
  with one intra-op thread);
* ``eigvals``: ``torch.linalg.eigvals`` with the process's threads (what the probe did before);
* ``svdvals``: ``torch.linalg.svdvals`` of the same matrices (the cost the probe pays anyway);

with medians and the spread (min-max) over ``--repeats``, the ratios to ``eigvals`` and to
``svdvals``, and the largest relative difference from ``eigvals`` in float64.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.functional import jacobian as autograd_jacobian

from gradlab.models.base import GradlabNet, Normalize
from gradlab.probes.jacobian import jacobian_probe


def make_mlp(d_in: int, width: int, classes: int = 10) -> GradlabNet:
    torch.manual_seed(0)
    blocks, prev = [], d_in
    for _ in range(3):
        lin = nn.Linear(prev, width)
        nn.init.normal_(lin.weight, std=1.0 / prev**0.5)
        nn.init.zeros_(lin.bias)
        blocks.append(nn.Sequential(lin, nn.Tanh()))
        prev = width
    return GradlabNet(Normalize([0.5], [0.25]), blocks, nn.Linear(prev, classes)).eval()


def gradlab_spectra(model, x):
    return jacobian_probe(model, x, per_layer=False, method="dense").layers[0].singular_values


def loop_spectra(model, x):
    h = model.normalize(x)
    fn = lambda hi: model.forward_from(hi.unsqueeze(0), 0).squeeze(0)  # noqa: E731
    jacs = torch.stack([autograd_jacobian(fn, h[n]) for n in range(h.shape[0])])  # (B, classes, d_in)
    return torch.linalg.svdvals(jacs).double()


def forward_backward(model, x, y):
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--inputs", default="784,64", help="input sizes to run (MNIST-like 784, digits-like 64)")
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (0: torch's default; default 1, or torch's default with --radius, "
                         "whose point is what threads do to eigvals)")
    ap.add_argument("--radius", action="store_true", help="time the spectral radius of square layer maps instead")
    args = ap.parse_args()
    threads = args.threads if args.threads is not None else (0 if args.radius else 1)
    if threads:
        torch.set_num_threads(threads)

    if args.radius:
        for act in (nn.ReLU, nn.Tanh):
            bench_radius(act, args)
        return
    for d_in in (int(v) for v in args.inputs.split(",")):
        bench(d_in, args)


def time_runs(runs: dict, repeats: int) -> tuple[dict, dict]:
    """Each callable of ``runs`` ``repeats`` times, in turn: ``(times, medians)`` per name, seconds."""
    times = {k: [] for k in runs}
    for _ in range(repeats):
        for key, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t0)
    return times, {k: statistics.median(v) for k, v in times.items()}


def bench_radius(act, args) -> None:
    """Spectral radius of (B, width, width) per-example Jacobians of one hidden layer."""
    from gradlab.curvature.jacobian_gram import per_example_jacobian
    from gradlab.probes.jacobian_spectra import spectral_radius

    torch.manual_seed(0)
    lin = nn.Linear(args.width, args.width)
    nn.init.normal_(lin.weight, std=(2.0 / args.width) ** 0.5)  # criticality for ReLU
    layer = nn.Sequential(lin, act()).eval()
    h = torch.randn(args.batch, args.width, generator=torch.Generator().manual_seed(1))
    jac = per_example_jacobian(layer, h).detach()  # (B, width, width) float32
    ref64 = torch.linalg.eigvals(jac.double()).abs().amax(-1)
    rel = float(((spectral_radius(jac.double()) - ref64).abs() / ref64).max())
    runs = {"gradlab": lambda: spectral_radius(jac), "eigvals": lambda: torch.linalg.eigvals(jac).abs().amax(-1),
            "svdvals": lambda: torch.linalg.svdvals(jac)}
    times, med = time_runs(runs, args.repeats)
    zero_rows = float((jac.abs().sum(-1) == 0).double().mean())
    print(f"spectral radius: {args.batch} per-example Jacobians {args.width}x{args.width} of a {act.__name__} layer "
          f"({zero_rows:.0%} zero rows), float32, {torch.get_num_threads()} thread(s), median [min-max] of {args.repeats}")
    for key in runs:
        print(f"  {key:8s} {med[key] * 1e3:9.1f} ms  [{min(times[key]) * 1e3:.1f}-{max(times[key]) * 1e3:.1f}]")
    print(f"  gradlab / eigvals: {med['gradlab'] / med['eigvals']:.2f}x   gradlab / svdvals: "
          f"{med['gradlab'] / med['svdvals']:.2f}x   eigvals / svdvals: {med['eigvals'] / med['svdvals']:.2f}x")
    print(f"  max relative difference from eigvals (float64): {rel:.1e}")


def bench(d_in: int, args) -> None:
    model = make_mlp(d_in, args.width)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(args.batch, d_in, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)

    ours, ref = gradlab_spectra(model, x), loop_spectra(model, x)  # warm-up and agreement check
    rel = float(((ours - ref).abs() / ref.abs().clamp_min(1e-30)).max())
    forward_backward(model, x, y)

    runs = {"gradlab": lambda: gradlab_spectra(model, x), "loop": lambda: loop_spectra(model, x),
            "fwd+bwd": lambda: forward_backward(model, x, y)}
    times, med = time_runs(runs, args.repeats)

    print(f"input-output Jacobian spectra: {args.batch} examples, MLP {d_in}-{args.width}x3-10 (tanh), "
          f"float32, {torch.get_num_threads()} thread(s), median of {args.repeats}")
    for key in runs:
        print(f"  {key:8s} {med[key] * 1e3:10.1f} ms")
    print(f"  speed-up gradlab vs per-example autograd loop: {med['loop'] / med['gradlab']:.1f}x (target >= 10x)")
    print(f"  gradlab / one forward+backward of the batch:   {med['gradlab'] / med['fwd+bwd']:.1f}x")
    print(f"  max relative difference of singular values:    {rel:.1e}")


if __name__ == "__main__":
    main()
