"""Square Attack: score-based black-box random search (Andriushchenko, Croce, Flammarion & Hein, ECCV 2020).

"Square Attack: a query-efficient black-box adversarial attack via random search". The attack
only reads the model's logits (no gradient, no backward pass: every forward runs under
``torch.no_grad``). It minimises the margin loss ``m(x) = z_y - max_{i != y} z_i`` (targeted:
``max_{i != t} z_i - z_t``) and stops an example once ``m <= 0``. Each iteration draws, per
example, a square of side ``s = round(sqrt(p * h * w))`` at a uniform position and proposes a
change inside it; a proposal is kept when it lowers the margin (or fools the model). ``p``
starts at ``p_init`` and is halved at the paper's iterations 10, 50, 200, 500, 1000, 2000, 4000,
6000, 8000, rescaled to the budget (``i * 10000 / n_queries``).

* linf: start from vertical stripes ``x + eps * (+-1 per column and channel)``; a proposal sets
  the square to ``x +- eps`` (one sign per channel), the vertices of the ball.
* l2: start from a grid of ``h // 5``-sized squares carrying the paper's centred pattern
  ``eta`` (nested rectangles weighted ``1 / (k + 1)^2``, opposite signs in the two halves);
  a proposal moves the mass of a second square into the first, adds a fresh ``eta`` and
  rescales so that ``||delta||_2 = eps``.

The budget ``n_queries`` counts every proposal of an example, the start point included (with
``eot > 1`` each is scored by the mean margin over ``eot`` forward passes, EOT for a black box).
Inputs ``(B, D)`` and ``(B, C, L)`` are searched as images of height 1 (strips, not squares).
Positions run over all ``h - s + 1`` offsets (the reference code's ``randint(0, h - s)`` never
picks the last one), and every example draws its own square (as in the paper; the AutoAttack code
shares one square per batch). Inputs in [0, 1]; eps in pixel units.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gradlab.attacks import ATTACKS
from gradlab.attacks.base import ATTACK_OPTIONS, Attack, flat_norm, per_example
from gradlab.core.errors import GradlabError
from gradlab.core.options import Option, Options

OPTIONS = ATTACK_OPTIONS + Options(
    Option("n_queries", int, 5000, "query budget: forward passes per example, the start point included", low=1,
           paper="Andriushchenko et al. 2020"),
    Option("p_init", float, 0.8, "initial fraction of the image a square covers (halved on the paper's schedule)",
           low=0, high=1, paper="Andriushchenko et al. 2020"),
    Option("restarts", int, 1, "runs from new random starts, each on the examples still robust", low=1),
)

#: Iterations (on a 10000-query scale) after which p is halved once more.
SCHEDULE = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def p_at(i: int, n_queries: int, p_init: float) -> float:
    """The square's area fraction at iteration ``i`` (0-based) of a budget of ``n_queries``."""
    it = int(i / n_queries * 10000)
    return p_init / 2 ** sum(it > k for k in SCHEDULE)


def eta_pattern(s: int, device=None, dtype=torch.float32) -> Tensor:
    """The l2 proposal ``(s, s)`` of unit norm: two halves of nested rectangles, opposite signs."""

    def rectangles(a: int, b: int) -> Tensor:
        d = torch.zeros(a, b, device=device, dtype=dtype)
        ca, cb = a // 2 + 1, b // 2 + 1
        for k in range(max(ca, cb)):
            r0, c0 = ca - 1 - k, cb - 1 - k
            d[max(r0, 0): min(r0 + 2 * k + 1, a), max(c0, 0): min(c0 + 2 * k + 1, b)] += 1.0 / (k + 1) ** 2
        return d / d.norm().clamp_min(1e-12) if d.numel() else d

    d = torch.cat([rectangles(s // 2, s), -rectangles(s - s // 2, s)], dim=0)
    return d / d.norm().clamp_min(1e-12)


@ATTACKS.register(
    "square",
    "Square Attack: score-based black-box random search with a query budget, linf or l2 (Andriushchenko et al. 2020)",
    options=OPTIONS,
    paper="Andriushchenko et al. 2020",
)
class Square(Attack):
    """Black-box random search; see the module docstring. Options: :data:`OPTIONS`."""

    name = "square"
    options = OPTIONS
    n_queries: int
    p_init: float
    restarts: int

    def perturb(self, x: Tensor, y: Tensor) -> Tensor:
        if x.dim() > 4:
            raise GradlabError(f"square needs inputs (B, D), (B, C, L) or (B, C, H, W), got shape {tuple(x.shape)}")
        self._shape = x.shape  # the model's input shape; the search works on (B, C, H, W)
        # vectors and sequences are images of height 1, so the squares become strips
        img = x.reshape(x.shape[0], *((1, 1, -1) if x.dim() == 2 else (x.shape[1], 1, -1) if x.dim() == 3 else x.shape[1:]))
        with torch.no_grad():
            out = img.clone()
            margin = self._scores(img, torch.arange(x.shape[0], device=x.device))
            for _ in range(self.restarts):
                idx = (margin > 0).nonzero()[:, 0]
                if idx.numel() == 0:
                    break
                adv, m = self.run_once(img[idx], idx)
                out[idx] = adv
                margin[idx] = m
        return out.reshape(x.shape)

    def _scores(self, cand: Tensor, idx: Tensor) -> Tensor:
        """Margin ``(b,)`` of candidates ``(b, C, H, W)``; with EOT the mean over ``eot`` random draws."""
        z = cand.reshape(cand.shape[0], *self._shape[1:])
        if self.eot == 1 and self.eot_noise == 0:
            return self._margin(self.logits(z), idx)
        with self._eot_mode():
            return sum(self._margin(self.model(self._transform(z)), idx) for _ in range(self.eot)) / self.eot

    def _margin(self, z: Tensor, idx: Tensor) -> Tensor:
        """``(b,)`` margin of logits ``z`` for the rows ``idx`` of the batch; <= 0 means fooled."""
        cls = self.target[idx] if self.targeted else self._y[idx]
        zc = z.gather(1, cls[:, None])[:, 0]
        others = z.scatter(1, cls[:, None], -math.inf).amax(dim=1)
        return others - zc if self.targeted else zc - others

    def run_once(self, x: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
        """One random search on ``x`` ``(b, C, H, W)`` (rows ``idx`` of the batch): ``(x_best, margin)``."""
        gen = self.generator
        b, c, h, w = x.shape
        best = self._start(x)
        margin = self._scores(best, idx)
        rows = torch.arange(h, device=x.device)
        cols = torch.arange(w, device=x.device)
        for i in range(self.n_queries - 1):
            live = (margin > 0).nonzero()[:, 0]
            if live.numel() == 0:
                break
            xl, bl = x[live], best[live]
            p = p_at(i, self.n_queries, self.p_init)
            s = max(int(round(math.sqrt(p * h * w))), 1 if self.norm == "linf" else 3)
            s = min(s + (s % 2 == 0 and self.norm == "l2"), h, w)
            n = live.numel()
            r0 = torch.randint(0, h - s + 1, (n,), generator=gen, device=x.device)
            c0 = torch.randint(0, w - s + 1, (n,), generator=gen, device=x.device)
            if self.norm == "linf":
                inside = (((rows[None] >= r0[:, None]) & (rows[None] < r0[:, None] + s))[:, :, None]
                          & ((cols[None] >= c0[:, None]) & (cols[None] < c0[:, None] + s))[:, None, :])
                sign = self._signs((n, c, 1, 1))
                cand = torch.where(inside[:, None], xl + 2 * self.eps * sign, bl)
                cand = self.project(cand, xl)
            else:
                cand = self._l2_proposal(xl, bl, s, r0, c0)
            m = self._scores(cand, idx[live])
            take = m < margin[live]
            best[live] = torch.where(per_example(take, cand), cand, bl)
            margin[live] = torch.where(take, m, margin[live])
        return best, margin

    # ----------------------------------------------------------------------- proposals ---------
    def _signs(self, shape) -> Tensor:
        """Uniform +-1 entries of ``shape``."""
        bits = torch.randint(0, 2, shape, generator=self.generator, device=self._x0.device)
        return (2 * bits - 1).to(self._x0.dtype)

    def _start(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        if self.norm == "linf":  # vertical stripes of +-eps, one sign per column and channel
            return (x + self.eps * self._signs((b, c, 1, w))).clamp(0.0, 1.0)
        delta = torch.zeros_like(x)
        s = max(h // 5, 1)
        start = (h - s * 5) // 2 if h >= 5 else 0
        pattern = eta_pattern(s, x.device, x.dtype)
        for r in range(start, h - s + 1, s):
            for q in range(start, w - s + 1, s):
                delta[:, :, r: r + s, q: q + s] += pattern * self._signs((b, c, 1, 1))
        delta = delta / per_example(flat_norm(delta, "l2").to(x.dtype).clamp_min(1e-12), delta)
        return (x + self.eps * delta).clamp(0.0, 1.0)

    def _l2_proposal(self, x: Tensor, best: Tensor, s: int, r0: Tensor, c0: Tensor) -> Tensor:
        """Move the perturbation of a second square into the first, add fresh ``eta`` there."""
        n, c, h, w = x.shape
        gen = self.generator
        delta = best - x
        ar = torch.arange(s, device=x.device)
        r1 = torch.randint(0, h - s + 1, (n,), generator=gen, device=x.device)
        c1 = torch.randint(0, w - s + 1, (n,), generator=gen, device=x.device)
        bi = torch.arange(n, device=x.device)[:, None, None]

        def window(r, q):  # advanced indices selecting each example's (s, s) window: (n, s, s, C)
            return bi, slice(None), (r[:, None] + ar)[:, :, None], (q[:, None] + ar)[:, None, :]

        w1, w2 = window(r0, c0), window(r1, c1)
        old = delta[w1].permute(0, 3, 1, 2)  # (n, C, s, s)
        union = torch.zeros(n, 1, h, w, dtype=torch.bool, device=x.device)
        union[w1[0], 0, w1[2], w1[3]] = True
        union[w2[0], 0, w2[2], w2[3]] = True
        budget = (self.eps ** 2 - flat_norm(delta, "l2") ** 2).clamp_min(0) / c  # (n,)
        in_windows = flat_norm(delta * union, "l2") ** 2
        pattern = eta_pattern(s, x.device, x.dtype)
        flip = torch.rand(n, generator=gen, device=x.device) > 0.5  # a random orientation per example
        pattern = torch.where(flip[:, None, None], pattern.T[None], pattern[None])[:, None]  # (n, 1, s, s)
        new = pattern * self._signs((n, c, 1, 1))
        new = new + old / old.flatten(2).norm(dim=2)[:, :, None, None].clamp_min(1e-12)
        radius = (budget + in_windows).sqrt().to(x.dtype)
        new = new / new.flatten(2).norm(dim=2)[:, :, None, None].clamp_min(1e-12) * radius[:, None, None, None]
        delta = delta.clone()
        delta[w2] = 0.0
        delta[w1] = new.permute(0, 2, 3, 1)
        delta = delta / per_example(flat_norm(delta, "l2").to(x.dtype).clamp_min(1e-12), delta)
        return (x + self.eps * delta).clamp(0.0, 1.0)
