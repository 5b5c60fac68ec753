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
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (0: torch's default; 1 keeps timings stable on a shared machine)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    for d_in in (int(v) for v in args.inputs.split(",")):
        bench(d_in, args)


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
    times = {k: [] for k in runs}
    for _ in range(args.repeats):
        for key, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}

    print(f"input-output Jacobian spectra: {args.batch} examples, MLP {d_in}-{args.width}x3-10 (tanh), "
          f"float32, {torch.get_num_threads()} thread(s), median of {args.repeats}")
    for key in runs:
        print(f"  {key:8s} {med[key] * 1e3:10.1f} ms")
    print(f"  speed-up gradlab vs per-example autograd loop: {med['loop'] / med['gradlab']:.1f}x (target >= 10x)")
    print(f"  gradlab / one forward+backward of the batch:   {med['gradlab'] / med['fwd+bwd']:.1f}x")
    print(f"  max relative difference of singular values:    {rel:.1e}")


if __name__ == "__main__":
    main()
