"""The one small interface every attack implements.

An attack maps a batch of clean inputs ``x`` (shape ``(B, *input_shape)``, pixel space, values in
[0, 1]; normalisation lives inside the model) and labels ``y`` (``(B,)``, int64) to adversarial
inputs of the same shape. :class:`Attack` owns everything that is not the algorithm itself, the
way torchattacks' ``Attack`` does:

* device: inputs move to the model's device; the result comes back on the input's device;
* modes: the model runs in eval mode (BatchNorm uses its running statistics, so ``eps = 0``
  reproduces clean accuracy); every module's previous ``training`` flag and every parameter's
  ``requires_grad`` flag are restored afterwards, also when the attack raises;
* the budget: every output is projected onto the eps-ball of the attack's norm around ``x`` and
  clamped to [0, 1] (up to float rounding, ~1e-7);
* the objective: untargeted attacks ascend the cross-entropy of the true label; targeted ones
  ascend minus the cross-entropy of the target class (``target_class``, or, when it is ``None``,
  the least-likely class of the clean prediction, Kurakin et al. 2017);
* EOT (expectation over transformation, Athalye et al. 2018): with ``eot = N`` the input gradient
  is the mean of N forward/backward passes. Randomness comes from the model's dropout layers and
  from an optional random input transform (``eot_noise``: Gaussian noise of that std in pixel
  units, added before the forward pass). To sample dropout while keeping BatchNorm on its running
  statistics, only the dropout modules (:data:`gradlab.core.modelstate.DROPOUTS`: Dropout,
  Dropout1d/2d/3d, AlphaDropout, FeatureAlphaDropout) are switched to train mode during EOT passes
  (only when ``N > 1``); everything else stays in eval mode. Deciding whether an example is already
  adversarial always uses the deterministic eval-mode model.
* precision (``--precision bf16|fp16``): every forward pass of a call runs under ``torch.autocast``
  (:class:`gradlab.core.autocast.Autocast`, whose logits come back in float32); the inputs, the
  perturbation, the projections and the accumulated gradients stay float32. fp16 input gradients
  use dynamic loss scaling (:mod:`gradlab.attacks.loss_scale`) so that they do not underflow.

A subclass declares its options once (``options = ATTACK_OPTIONS + Options(...)``: every option
becomes an attribute of the same name, checked when the attack is built) and writes only
:meth:`Attack.perturb`, using :meth:`grad`, :meth:`step_direction`, :meth:`project`,
:meth:`objective` and :meth:`is_adversarial`::

    class Nudge(Attack):  # x + scale * eps * sign(g): a shortened FGSM step
        name = "nudge"
        options = ATTACK_OPTIONS + Options(Option("scale", float, 0.5, "fraction of eps", low=0, high=1))

        def perturb(self, x, y):
            g, _ = self.grad(x)
            return x + self.scale * self.eps * self.step_direction(g)

    ATTACKS.add("nudge", Nudge, "half an FGSM step", options=Nudge.options)
"""

from __future__ import annotations

import abc
import contextlib
import itertools
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor, nn

from gradlab.core.autocast import with_precision
from gradlab.core.errors import GradlabError
from gradlab.core.losses import per_example_loss
from gradlab.core.modelstate import DROPOUTS, model_state
from gradlab.core.budgets import NORMS, check_eps, check_target_class  # noqa: F401  (re-exported)
from gradlab.core.options import Option, Options
from gradlab.core.precision import precision_option


# The options every attack takes (the base class implements them), then the shared iterative ones.
ATTACK_OPTIONS = Options(
    Option("norm", str, "linf", "budget norm: eps bounds the perturbation in it", choices=NORMS),
    Option("targeted", bool, False, "push towards a target class (target_class, else the least-likely clean "
           "class) instead of away from the true label", paper="Kurakin et al. 2017"),
    Option("target_class", int, None, "target class of a targeted attack (implies targeted)", low=0),
    Option("eot", int, 1, "expectation over transformation: average the input gradient over N passes "
           "(dropout sampled)", low=1, paper="Athalye et al. 2018"),
    Option("eot_noise", float, 0.0, "EOT random transform: Gaussian input noise of this std (pixel units)", low=0),
    Option("seed", int, None, "seeds the attack's own generator (random starts, masks); unset: drawn from "
           "torch's global generator"),
    precision_option("arithmetic of the attack's forward passes: bf16/fp16 run the model under autocast; the "
                     "perturbation, its projections and the gradient accumulation stay float32"),
)
#: Iterations of an iterative attack (each declares its own default with ``dataclasses.replace``).
STEPS = Option("steps", int, 10, "iterations of the attack", low=1)
ALPHA = Option("alpha", float, None, "step size in pixel units (unset: 2.5 * eps / steps)", low=0,
               paper="Madry et al. 2018")


def flat_norm(t: Tensor, norm: str) -> Tensor:
    """Per-example norm of ``t`` (``(B, ...)`` -> ``(B,)``), accumulated in float64."""
    flat = t.reshape(t.shape[0], -1).double()
    if norm == "linf":
        return flat.abs().amax(dim=1) if flat.shape[1] else flat.new_zeros(flat.shape[0])
    if norm in ("l1", "l0"):  # l0: the number of nonzero entries
        return flat.abs().sum(dim=1) if norm == "l1" else (flat != 0).sum(dim=1).double()
    return flat.norm(dim=1)


def per_example(v: Tensor, like: Tensor) -> Tensor:
    return v.reshape(-1, *([1] * (like.dim() - 1)))


class Attack(abc.ABC):
    """Base class; see the module docstring.

    Args:
        model: a classifier mapping ``(B, *input_shape)`` in [0, 1] to logits ``(B, C)``.
        eps: the budget, in the attack's norm, in pixel units.
        **opts: the attack's declared :attr:`options` (:data:`ATTACK_OPTIONS`: ``norm``,
            ``targeted``, ``target_class``, ``eot``, ``eot_noise``, ``seed``, ``precision``; plus its
            own), each set as an attribute. ``seed=None`` draws a seed from torch's global generator, so
            runs under ``torch.manual_seed`` are reproducible.
    Raises:
        GradlabError: one line for a bad budget, an option the attack does not declare, or a
            value of the wrong type or out of range.
    """

    name = "attack"
    #: The attack's options, declared once: validation, ``gradlab attack`` flags and
    #: ``gradlab list attacks`` all come from it. A subclass adds its own to :data:`ATTACK_OPTIONS`.
    options: Options = ATTACK_OPTIONS

    #: True for attacks whose result is ``x + eps * d`` with ``||d|| = 1`` (FGSM): always inside
    #: the eps-ball, so the call clamps to [0, 1] instead of projecting.
    single_step: bool = False

    #: True for attacks cheap and strong enough to craft a batch every training step
    #: (``gradlab train --adv NAME``): FGSM and PGD, not the minimum-norm searches.
    trainable: bool = False

    # Declared in ATTACK_OPTIONS; set from the checked options in __init__.
    norm: str
    targeted: bool
    target_class: Optional[int]
    eot: int
    eot_noise: float
    seed: Optional[int]
    precision: str
    cycles_top_classes: bool = False  # ``targeted`` without a class: each of the top classes in turn
    #: The loss :meth:`objective` ascends (a name in :data:`gradlab.core.losses.LOSSES`); the
    #: attack commands set it to the attacked run's ``--loss``.
    criterion: str = "cross-entropy"

    def __init__(self, model: nn.Module, eps: float, **opts):
        checked = self.options.resolve(opts, owner=f"attack {self.name}")
        check_eps(eps, checked["norm"])
        for key, value in checked.items():
            setattr(self, key, value)
        if self.target_class is not None:
            self.targeted = True  # naming a target class only makes sense for a targeted attack
        # An attack that cycles over the top classes (``cycles_top_classes``: APGD-T, FAB-T) is
        # targeted without a target class; its success is misclassification, so for this base
        # (and the report) it is untargeted.
        self.multi_target = self.cycles_top_classes and self.targeted and self.target_class is None
        if self.multi_target:
            self.targeted = False
        self.model = model
        self.eps = float(eps)
        self._generator: Optional[torch.Generator] = None
        self._box: Optional[tuple] = None
        # Set for the duration of one call; subclasses read them through the helpers.
        self._x0: Optional[Tensor] = None
        self._y: Optional[Tensor] = None
        self._target: Optional[Tensor] = None

    # ------------------------------------------------------------------ the call ------------
    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        """Adversarial version of ``x`` (same shape/dtype, detached, on ``x``'s device)."""
        with self.session(x, y) as (x0, y0):
            with torch.enable_grad():
                adv = self.perturb(x0, y0)
            # A one-step attack lands on the eps-sphere by construction; it only needs [0, 1].
            adv = adv.detach().clamp_(0.0, 1.0) if self.single_step else self.project(adv.detach())
        return adv.to(x.device)

    @contextlib.contextmanager
    def session(self, x: Tensor, y: Tensor) -> Iterator[tuple[Tensor, Tensor]]:
        """Validate, move to the model's device, freeze the model in eval mode, pick targets.

        Yields ``(x0, y0)`` on the model's device; the helpers below refer to this batch.
        """
        if x.dim() < 2 or y.dim() != 1 or x.shape[0] != y.shape[0]:
            raise GradlabError(f"expected x of shape (B, ...) and y of shape (B,), got {tuple(x.shape)} and {tuple(y.shape)}")
        check_eps(self.eps, self.norm, x[0].numel())
        if x.numel():
            lo, hi = torch.aminmax(x.detach())
            if lo < 0 or hi > 1:
                raise GradlabError(
                    f"inputs must lie in [0, 1] (normalisation belongs in the model); got [{lo.item():.4g}, {hi.item():.4g}]"
                )
        device = self._model_device()
        x0 = x.detach().to(device)
        y0 = y.detach().to(device=device, dtype=torch.long)
        self._generator = None  # made on first use: FGSM and plain PGD never draw random numbers
        self._box = None  # linf projection bounds of this batch, made on first use
        plain = self.model
        with self._eval_frozen():
            self._x0, self._y = x0, y0
            # --precision: every forward pass of the call (gradients, scores, EOT, members of an
            # ensemble) goes through the autocast wrapper, whose outputs are float32 again
            self.model = with_precision(plain, self.precision)
            try:
                self._target = self._pick_target(x0, y0) if self.targeted else None
                yield x0, y0
            finally:
                self.model = plain
                self._x0 = self._y = self._target = self._box = None

    @abc.abstractmethod
    def perturb(self, x: Tensor, y: Tensor) -> Tensor:
        """The algorithm: adversarial inputs for clean ``x`` (``(B, ...)``) and labels ``y`` (``(B,)``)."""

    @classmethod
    def eot_passes(cls, opts: dict) -> int:
        """EOT passes per gradient an attack built with ``opts`` makes (for the CLI's mode line)."""
        return opts.get("eot") or 1

    def summary(self) -> dict:
        """Extra columns for the robustness table, accumulated over this object's calls (none here).

        An ensemble (:mod:`gradlab.attacks.autoattack`) reports how many examples each member broke.
        """
        return {}

    # ------------------------------------------------------------------ helpers -------------
    @property
    def generator(self) -> torch.Generator:
        """The call's random generator, seeded from ``seed`` (or, if None, from torch's global one)."""
        if self._generator is None:
            seed = self.seed if self.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
            self._generator = torch.Generator(device=self._x0.device).manual_seed(seed)
        return self._generator

    @property
    def target(self) -> Optional[Tensor]:
        """Target classes ``(B,)`` of the current call (``None`` when untargeted)."""
        return self._target

    def logits(self, x: Tensor) -> Tensor:
        """Deterministic eval-mode logits ``(B, C)``."""
        return self.model(x)

    def objective(self, logits: Tensor, idx: Optional[Tensor] = None) -> Tensor:
        """Per-example quantity the attack ascends ``(B,)``: loss(true) or -loss(target), the
        loss :attr:`criterion` (cross-entropy unless the attacked run trained with another).

        ``idx`` selects the rows of the current batch that ``logits`` belong to (default: all).
        """
        if self.targeted:
            t = self._target if idx is None else self._target[idx]
            return -per_example_loss(self.criterion)(logits, t)
        return per_example_loss(self.criterion)(logits, self._y if idx is None else self._y[idx])

    def is_adversarial(self, logits: Tensor, idx: Optional[Tensor] = None) -> Tensor:
        """``(B,)`` bool: misclassified (untargeted) or classified as the target (targeted)."""
        pred = logits.argmax(dim=1)
        if self.targeted:
            return pred == (self._target if idx is None else self._target[idx])
        return pred != (self._y if idx is None else self._y[idx])

    def score(self, x_adv: Tensor, idx: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """``(is_adversarial, objective)`` of candidate inputs under the eval-mode model, no grad."""
        with torch.no_grad():
            logits = self.logits(x_adv)
            return self.is_adversarial(logits, idx), self.objective(logits, idx)

    def eot_objective_sum(self, x: Tensor) -> Tensor:
        """Mean over the EOT draws of the objective summed over the batch (a scalar with graph).

        The sum over the batch makes the input Hessian block diagonal: one backward/HVP serves
        every example. Used by second-order attacks; :meth:`grad` does the passes one by one.
        """
        total = 0.0
        with self._eot_mode():
            for _ in range(self.eot):
                total = total + self.objective(self.model(self._transform(x))).sum()
        return total / self.eot

    def grad(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """EOT-averaged input gradient of the objective and the mean objective.

        Returns:
            ``(g, obj)``: ``g`` has ``x``'s shape; ``obj`` is ``(B,)`` (averaged over draws).
        """
        return self.input_grad(x, self.objective)

    def input_grad(self, x: Tensor, loss: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
        """EOT-averaged input gradient of a per-example ``loss(logits) -> (B,)`` and its mean.

        :meth:`grad` with the attack's own objective; attacks with another loss (APGD's DLR) or
        running on a subset of the batch pass a closure. Returns ``(g, obj)`` as :meth:`grad`.
        """
        if self.eot == 1 and self.eot_noise == 0:  # the common case, without accumulation buffers
            xr = x.detach().requires_grad_(True)
            o = loss(self.model(xr))
            return self._backward(o.sum(), xr), o.detach()
        g = torch.zeros_like(x)
        obj = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
        with self._eot_mode():
            for _ in range(self.eot):
                xr = x.detach().requires_grad_(True)
                o = loss(self.model(self._transform(xr)))
                g += self._backward(o.sum(), xr)
                obj += o.detach()
        return g / self.eot, obj / self.eot

    def _backward(self, total: Tensor, xr: Tensor) -> Tensor:
        """``d total / d xr``; under fp16 with dynamic loss scaling (:mod:`gradlab.attacks.loss_scale`),
        whose scale this attack keeps from one gradient to the next."""
        if self.precision != "fp16":
            return torch.autograd.grad(total, xr)[0]
        if self.__dict__.get("_scaler") is None:
            from gradlab.attacks.loss_scale import InputGradScaler

            self._scaler = InputGradScaler()
        return self._scaler.grad(total, xr)

    def step_direction(self, g: Tensor) -> Tensor:
        """Steepest-ascent direction of unit norm: ``sign(g)`` (linf) or ``g / ||g||_2`` (l2)."""
        if self.norm == "linf":
            return g.sign()
        n = flat_norm(g, "l2").to(g.dtype).clamp_min(1e-12)
        return g / per_example(n, g)

    def project(self, x_adv: Tensor, x0: Optional[Tensor] = None) -> Tensor:
        """Nearest point of the eps-ball around ``x0`` (default: the clean batch), then [0, 1].

        Clamping to [0, 1] after the ball keeps the result inside the ball: it only moves a
        coordinate towards the clean value, which lies in [0, 1] itself. Up to float rounding
        (~1 ulp of the pixel value) the result is within eps of ``x0``.
        """
        if self.norm == "linf":
            # The ball ∩ [0, 1] is a box: clamp to [max(x0 - eps, 0), min(x0 + eps, 1)]. The
            # bounds of the call's batch are computed once, so a step costs two ops, not four.
            if x0 is None or x0 is self._x0:
                if self._box is None:
                    self._box = ((self._x0 - self.eps).clamp_min(0.0), (self._x0 + self.eps).clamp_max(1.0))
                lo, hi = self._box
            else:
                lo, hi = (x0 - self.eps).clamp_min(0.0), (x0 + self.eps).clamp_max(1.0)
            return torch.minimum(torch.maximum(x_adv, lo), hi)
        x0 = self._x0 if x0 is None else x0
        delta = x_adv - x0
        if self.norm in ("l1", "l0"):  # fmn's norms: the exact ball projections of their own module
            from gradlab.attacks.projections import project_ball

            return (x0 + project_ball(delta, self.eps, self.norm)).clamp(0.0, 1.0)
        n = flat_norm(delta, "l2")
        factor = torch.where(n > self.eps, self.eps / n.clamp_min(1e-30), torch.ones_like(n))
        delta = delta * per_example(factor.to(delta.dtype), delta)
        return (x0 + delta).clamp(0.0, 1.0)

    def random_point(self, x0: Tensor) -> Tensor:
        """A uniform point of the eps-ball around ``x0`` (Madry et al. 2018), clamped to [0, 1]."""
        gen = self.generator
        if self.norm == "linf":
            u = torch.rand(x0.shape, generator=gen, device=x0.device, dtype=x0.dtype)
            return self.project(x0 + (2 * u - 1) * self.eps, x0)
        # l2: Gaussian direction, radius eps * U^(1/D): uniform in the ball's volume
        d = torch.randn(x0.shape, generator=gen, device=x0.device, dtype=x0.dtype)
        d = d / per_example(flat_norm(d, "l2").to(x0.dtype).clamp_min(1e-12), d)
        dim = x0[0].numel()
        r = torch.rand(x0.shape[0], generator=gen, device=x0.device, dtype=x0.dtype) ** (1.0 / dim)
        return self.project(x0 + d * per_example(r * self.eps, d), x0)

    @staticmethod
    def better(adv_new: Tensor, obj_new: Tensor, adv_old: Tensor, obj_old: Tensor) -> Tensor:
        """``(B,)`` bool: is the new candidate worse for the model (adversarial first, then objective)?"""
        return (adv_new & ~adv_old) | ((adv_new == adv_old) & (obj_new > obj_old))

    # ------------------------------------------------------------------ internals -----------
    def _model_device(self) -> torch.device:
        for t in itertools.chain(self.model.parameters(), self.model.buffers()):
            return t.device
        return torch.device("cpu")

    def _pick_target(self, x0: Tensor, y0: Tensor) -> Tensor:
        with torch.no_grad():
            logits = self.model(x0)
        n_classes = logits.shape[1]
        if self.target_class is not None:
            check_target_class(self.target_class, n_classes)
            return torch.full_like(y0, self.target_class)
        return logits.argmin(dim=1)

    def _transform(self, x: Tensor) -> Tensor:
        if self.eot_noise > 0:
            noise = torch.randn(x.shape, generator=self.generator, device=x.device, dtype=x.dtype)
            return x + self.eot_noise * noise
        return x

    @contextlib.contextmanager
    def _eval_frozen(self) -> Iterator[None]:
        """Eval mode + frozen parameters for the call; restores each module and parameter flag.

        Frozen: only input gradients are needed, so parameters' ``.grad`` stay untouched.
        """
        with model_state(self.model, train=False, requires_grad=False):
            yield

    @contextlib.contextmanager
    def _eot_mode(self) -> Iterator[None]:
        """Dropout modules in train mode (sampling masks) while ``eot > 1``; BatchNorm stays eval."""
        dropouts = [] if self.eot == 1 else [m for m in self.model.modules() if isinstance(m, DROPOUTS)]
        if not dropouts:
            yield
            return
        with model_state(self.model):  # nested in _eval_frozen: restores the eval flags it set
            for m in dropouts:
                m.training = True
            yield
