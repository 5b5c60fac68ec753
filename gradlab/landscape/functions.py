"""Two-dimensional test functions as modules whose one parameter is the point.

Each function is an ``nn.Module`` with a parameter ``point`` of shape ``(2,)`` (float64 by
default), so any ``torch.optim``-style optimizer can minimise it exactly as it would a network:
``loss = fn(); loss.backward(); opt.step()``. ``fn.value(x, y)`` evaluates elementwise on tensors
of any (broadcastable) shape, which the contour plots use; ``gradient`` and ``hessian`` are the
closed forms the tests check autograd against.

Formulas (standard definitions, e.g. Surjanovic & Bingham's "Virtual Library of Simulation
Experiments", and Rosenbrock 1960, Himmelblau 1972, Rastrigin 1974, Beale 1958):

* ``quadratic``: ``(x^2 + cond * y^2) / 2``: Hessian ``diag(1, cond)``, condition number ``cond``.
* ``saddle``: ``x^2 - y^2``: a strict saddle at the origin, unbounded below along ``y``.
* ``monkey-saddle``: ``x^3 - 3 x y^2``: a degenerate saddle (zero Hessian) at the origin.
* ``rosenbrock``: ``(1 - x)^2 + 100 (y - x^2)^2``: minimum 0 at (1, 1) in a curved valley.
* ``himmelblau``: ``(x^2 + y - 11)^2 + (x + y^2 - 7)^2``: four minima of value 0.
* ``rastrigin``: ``20 + sum_i (x_i^2 - 10 cos(2 pi x_i))``: many local minima, global 0 at 0.
* ``beale``: ``(1.5 - x + xy)^2 + (2.25 - x + xy^2)^2 + (2.625 - x + xy^3)^2``: minimum 0 at (3, 0.5).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from gradlab.core.errors import GradlabError, check_positive
from gradlab.core.options import Option, Options
from gradlab.core.registry import Registry

FUNCTIONS = Registry("function")


class TestFunction(nn.Module):
    """Base class: subclasses define ``value``, ``gradient`` and ``hessian`` in closed form.

    Class attributes describe the function for reports and plots:
    ``f_min`` (global minimum value, ``None`` when unbounded below), ``minima`` (known minimisers),
    ``saddles`` (points the saddle-escape report watches), ``default_start``, ``lr_scale`` (a
    factor on the optimizers' default step sizes) and ``view``
    (``(xmin, xmax, ymin, ymax)`` for contour plots).
    """

    __test__ = False  # not a pytest test class despite the name
    name = "function"
    f_min: Optional[float] = 0.0
    minima: Sequence[tuple] = ()
    saddles: Sequence[tuple] = ()
    default_start: tuple = (-1.5, 1.5)
    # multiplies the optimizers' default step sizes: steep functions (curvature ~2000 at
    # Rosenbrock's usual start) need smaller steps than the O(1)-curvature ones
    lr_scale: float = 1.0
    view: tuple = (-2.0, 2.0, -2.0, 2.0)

    def __init__(self, start: Optional[Sequence[float]] = None, dtype: torch.dtype = torch.float64):
        super().__init__()
        start = self.default_start if start is None else tuple(start)
        if len(start) != 2:
            raise GradlabError(f"start point {tuple(start)} has {len(start)} coordinate(s); {self.name} takes 2 (x,y)")
        self.point = nn.Parameter(torch.tensor([float(v) for v in start], dtype=dtype))

    def forward(self) -> Tensor:
        """The loss (a scalar) at the current point."""
        return self.value(self.point[0], self.point[1])

    def value(self, x: Tensor, y: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise TypeError(f"{type(self).__name__} must define value()")

    def gradient(self, x: float, y: float) -> Tensor:  # pragma: no cover - abstract
        raise TypeError(f"{type(self).__name__} must define gradient()")

    def hessian(self, x: float, y: float) -> Tensor:  # pragma: no cover - abstract
        raise TypeError(f"{type(self).__name__} must define hessian()")

    def saddle_value(self) -> Optional[float]:
        """Loss at the watched saddle point (the first of ``saddles``), or ``None``."""
        if not self.saddles:
            return None
        sx, sy = self.saddles[0]
        return float(self.value(torch.tensor(float(sx), dtype=torch.float64), torch.tensor(float(sy), dtype=torch.float64)))


def _t(*rows) -> Tensor:
    return torch.tensor(rows, dtype=torch.float64)


@FUNCTIONS.register("quadratic", "(x^2 + cond*y^2)/2, an ill-conditioned bowl", options=Options(
    Option("cond", float, 10.0, "condition number: the Hessian is diag(1, cond)", low=0, low_open=True)))
class Quadratic(TestFunction):
    name = "quadratic"
    minima = ((0.0, 0.0),)
    default_start = (-1.5, 1.0)

    def __init__(self, start=None, dtype=torch.float64, cond: float = 10.0):
        check_positive("cond", cond)
        self.cond = float(cond)
        super().__init__(start, dtype)

    def value(self, x, y):
        return 0.5 * (x**2 + self.cond * y**2)

    def gradient(self, x, y):
        return _t(x, self.cond * y)

    def hessian(self, x, y):
        return _t([1.0, 0.0], [0.0, self.cond])


@FUNCTIONS.register("saddle", "x^2 - y^2, a strict saddle at the origin (unbounded below)")
class Saddle(TestFunction):
    name = "saddle"
    f_min = None
    saddles = ((0.0, 0.0),)
    default_start = (-1.5, 0.01)

    def value(self, x, y):
        return x**2 - y**2

    def gradient(self, x, y):
        return _t(2 * x, -2 * y)

    def hessian(self, x, y):
        return _t([2.0, 0.0], [0.0, -2.0])


@FUNCTIONS.register("monkey-saddle", "x^3 - 3xy^2, a degenerate saddle at the origin (unbounded below)")
class MonkeySaddle(TestFunction):
    name = "monkey-saddle"
    f_min = None
    saddles = ((0.0, 0.0),)
    default_start = (1.0, 0.01)
    view = (-1.5, 1.5, -1.5, 1.5)

    def value(self, x, y):
        return x**3 - 3 * x * y**2

    def gradient(self, x, y):
        return _t(3 * x**2 - 3 * y**2, -6 * x * y)

    def hessian(self, x, y):
        return _t([6 * x, -6 * y], [-6 * y, -6 * x])


@FUNCTIONS.register("rosenbrock", "(1-x)^2 + 100(y-x^2)^2, a curved narrow valley; min 0 at (1,1)")
class Rosenbrock(TestFunction):
    name = "rosenbrock"
    minima = ((1.0, 1.0),)
    default_start = (-1.5, 2.0)
    view = (-2.0, 2.0, -1.0, 3.0)
    lr_scale = 0.05
    a, b = 1.0, 100.0

    def value(self, x, y):
        return (self.a - x) ** 2 + self.b * (y - x**2) ** 2

    def gradient(self, x, y):
        a, b = self.a, self.b
        return _t(-2 * (a - x) - 4 * b * x * (y - x**2), 2 * b * (y - x**2))

    def hessian(self, x, y):
        b = self.b
        return _t([2 - 4 * b * y + 12 * b * x**2, -4 * b * x], [-4 * b * x, 2 * b])


@FUNCTIONS.register("himmelblau", "(x^2+y-11)^2 + (x+y^2-7)^2, four minima of value 0")
class Himmelblau(TestFunction):
    name = "himmelblau"
    minima = ((3.0, 2.0), (-2.805118, 3.131312), (-3.779310, -3.283186), (3.584428, -1.848126))
    default_start = (0.0, 0.0)
    view = (-5.0, 5.0, -5.0, 5.0)

    def value(self, x, y):
        return (x**2 + y - 11) ** 2 + (x + y**2 - 7) ** 2

    def gradient(self, x, y):
        u, v = x**2 + y - 11, x + y**2 - 7
        return _t(4 * x * u + 2 * v, 2 * u + 4 * y * v)

    def hessian(self, x, y):
        return _t([12 * x**2 + 4 * y - 42, 4 * x + 4 * y], [4 * x + 4 * y, 12 * y**2 + 4 * x - 26])


@FUNCTIONS.register("rastrigin", "20 + x^2 + y^2 - 10(cos 2pi x + cos 2pi y), many local minima; min 0 at 0")
class Rastrigin(TestFunction):
    name = "rastrigin"
    minima = ((0.0, 0.0),)
    default_start = (-2.2, 2.3)
    view = (-4.0, 4.0, -4.0, 4.0)

    def value(self, x, y):
        two_pi = 2 * math.pi
        return 20 + x**2 - 10 * torch.cos(two_pi * x) + y**2 - 10 * torch.cos(two_pi * y)

    def gradient(self, x, y):
        w = 2 * math.pi
        return _t(2 * x + 10 * w * math.sin(w * x), 2 * y + 10 * w * math.sin(w * y))

    def hessian(self, x, y):
        w = 2 * math.pi
        return _t([2 + 10 * w * w * math.cos(w * x), 0.0], [0.0, 2 + 10 * w * w * math.cos(w * y)])


@FUNCTIONS.register("beale", "(1.5-x+xy)^2 + (2.25-x+xy^2)^2 + (2.625-x+xy^3)^2; min 0 at (3,0.5)")
class Beale(TestFunction):
    name = "beale"
    minima = ((3.0, 0.5),)
    default_start = (1.0, 1.5)
    view = (-4.5, 4.5, -4.5, 4.5)
    lr_scale = 0.2
    c = (1.5, 2.25, 2.625)

    def value(self, x, y):
        return sum((ci - x + x * y ** (i + 1)) ** 2 for i, ci in enumerate(self.c))

    def gradient(self, x, y):
        g = [0.0, 0.0]
        for i, ci in enumerate(self.c):
            k = i + 1
            u = ci - x + x * y**k
            g[0] += 2 * u * (y**k - 1)
            g[1] += 2 * u * k * x * y ** (k - 1)
        return _t(*g)

    def hessian(self, x, y):
        h = [[0.0, 0.0], [0.0, 0.0]]
        for i, ci in enumerate(self.c):
            k = i + 1
            u = ci - x + x * y**k
            ux, uy = y**k - 1, k * x * y ** (k - 1)  # first derivatives of the residual u
            uxy = k * y ** (k - 1)  # u_xx = 0
            uyy = k * (k - 1) * x * y ** (k - 2) if k >= 2 else 0.0
            h[0][0] += 2 * ux * ux
            h[0][1] += 2 * (ux * uy + u * uxy)
            h[1][1] += 2 * (uy * uy + u * uyy)
        h[1][0] = h[0][1]
        return _t(*h)


def build_function(name: str, start: Optional[Sequence[float]] = None, **opts) -> TestFunction:
    """Instantiate a registered test function at ``start`` (its default start when ``None``).

    Options other than ``cond`` (quadratic only) are rejected with a :class:`GradlabError`.
    """
    cls = FUNCTIONS.get(name)
    opts = {k: v for k, v in opts.items() if v is not None}
    if cls is Quadratic:
        return cls(start, cond=opts.pop("cond", 10.0), **opts)
    if "cond" in opts:
        raise GradlabError(f"--cond applies to the quadratic function only, not {name!r}")
    return cls(start, **opts)
