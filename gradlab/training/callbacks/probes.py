"""Probes during training: a registered probe run every N steps on the current batch.

``--probe`` takes a comma-separated list of probes, each ``NAME`` followed by ``:KEY=VALUE``
options, one of which must be ``every=N``::

    --probe hessian:every=100,gradnorm:every=50
    --probe hessian:every=20:tol=1e-4:trace_matvecs=40

Values are numbers, ``true``/``false`` or words; each is checked against the probe's declared
options. ``--hessian-every N`` and ``--probe-every N`` are the same as ``hessian:every=N`` and
``gradnorm:every=N``. A probe runs on rank 0, on a fork of the RNG state (training draws the same
dropout masks with or without it), and logs its scalars as rows of its own split.

:func:`probe_scalars` is the one place that knows how a probe turns into scalars.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from gradlab.core.errors import GradlabError
from gradlab.core.options import Option, Options
from gradlab.training.callbacks.base import Callback, StepInfo, every

_FORM = "NAME:every=N[:KEY=VALUE...], comma-separated"


@dataclass(frozen=True)
class TrainingProbe:
    """How a probe runs during training: the metrics.csv split its scalars go to, its options,
    and the scalars that also go into the run's final metrics (their last value)."""

    split: str
    options: Options
    summary: tuple = ()


TRAINING_PROBES = {
    "hessian": TrainingProbe("curvature", Options(
        Option("tol", float, 1e-3, "Lanczos tolerance for lambda_max", low=0, low_open=True),
        Option("trace_matvecs", int, 20, "Hessian-vector products for the trace estimate", low=1),
    ), summary=("lambda_max", "trace")),
    "gradnorm": TrainingProbe("gradnorm", Options(
        Option("train_mode", bool, True, "forward pass in training mode (dropout, BatchNorm batch statistics)"),
    )),
}


def probe_scalars(name: str, model, loss_fn, batch, **opts) -> dict[str, float]:
    """The scalars of probe ``name`` on one batch ``(x, y)``: ``x`` (B, *input_shape), ``y`` (B,).

    * ``hessian``: ``lambda_max`` and ``trace`` of the loss Hessian (Lanczos and Hutchinson, see
      :func:`gradlab.probes.hessian.quick_curvature`) and ``stability_bound`` = 2 / lambda_max,
      the largest learning rate gradient descent is stable with on the local quadratic model
      (Cohen et al. 2021).
    * ``gradnorm``: ``layer<i>_grad_norm`` and ``layer<i>_signal_norm`` for each layer (see
      :func:`gradlab.probes.gradnorm.gradnorm_probe`).

    The model's mode flags and ``.grad`` are left as they were.
    """
    if name == "hessian":
        from gradlab.probes.hessian import quick_curvature

        lam, tr = quick_curvature(model, loss_fn, batch, **opts)
        return {"lambda_max": lam, "trace": tr, "stability_bound": 2.0 / lam if lam > 0 else float("inf")}
    if name == "gradnorm":
        from gradlab.probes.gradnorm import gradnorm_probe

        out: dict = {}
        for row in gradnorm_probe(model, loss_fn, [batch], **opts).to_frame().itertuples(index=False):
            out[f"layer{row.layer}_grad_norm"] = row.grad_norm
            out[f"layer{row.layer}_signal_norm"] = row.signal_norm
        return out
    raise GradlabError(_unknown(name))


def _unknown(name: str) -> str:
    return f"unknown probe {name!r} for training; choose from: {', '.join(sorted(TRAINING_PROBES))}"


class ProbeCallback(Callback):
    """Run probe ``name`` every ``every`` steps on the step's batch and log its scalars.

    Args:
        name: a key of :data:`TRAINING_PROBES`.
        every: steps between runs (steps ``every``, ``2 every``, ...).
        options: the probe's options (checked against its declaration).
    Raises:
        GradlabError: an unknown probe, ``every < 1``, or a bad option.
    """

    def __init__(self, name: str, every: int, **options):
        if name not in TRAINING_PROBES:
            raise GradlabError(_unknown(name))
        self.name, self.probe = name, TRAINING_PROBES[name]
        self.every = Option("every", int, 1, "steps between runs", low=1).check(every)
        self.options = self.probe.options.resolve(options, owner=f"probe {name}")
        self.last: dict = {}

    @property
    def key(self) -> str:
        return f"probe/{self.name}"

    def on_step_end(self, trainer, info: StepInfo) -> None:
        if not (every(self.every, info.step) and trainer.is_main):
            return
        device = trainer.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            scalars = probe_scalars(self.name, trainer.model, F.cross_entropy, (info.x, info.y), **self.options)
        trainer.run.log_metrics(info.step, info.epoch, self.probe.split, scalars)
        self.last = {k: float(scalars[k]) for k in self.probe.summary}

    def summarize(self, trainer, metrics: dict) -> dict:
        metrics.update(self.last)
        return metrics

    def state_dict(self) -> dict:
        return {"last": dict(self.last)}

    def load_state_dict(self, state: dict) -> None:
        self.last = dict(state.get("last", {}))


def parse_probe_spec(spec: Optional[str]) -> list[tuple[str, dict]]:
    """``"hessian:every=100:tol=1e-4,gradnorm:every=50"`` -> ``[("hessian", {"every": 100,
    "tol": 0.0001}), ("gradnorm", {"every": 50})]``, each probe checked (see the module docstring).

    Raises:
        GradlabError: one line naming the bad part, the form and the valid probe names.
    """
    out: list = []
    if spec is None or not spec.strip():
        return out
    for item in spec.split(","):
        name, *pairs = [p.strip() for p in item.strip().split(":")]
        bad = lambda why: GradlabError(f"invalid --probe {item.strip()!r}: {why}")  # noqa: E731
        if name not in TRAINING_PROBES:
            raise bad(_unknown(name) if name else f"expected {_FORM}")
        opts: dict = {}
        for pair in pairs:
            key, eq, value = pair.partition("=")
            key = key.strip().replace("-", "_")
            if not eq or not key or not value.strip():
                raise bad(f"expected KEY=VALUE after ':', got {pair!r} (form: {_FORM})")
            if key in opts:
                raise bad(f"{key} given twice")
            opts[key] = _scalar(value.strip())
        if "every" not in opts:
            raise bad(f"give every=N, e.g. {name}:every=100")
        if any(n == name for n, _ in out):
            raise bad(f"probe {name!r} given twice")
        try:
            ProbeCallback(name, **opts)
        except GradlabError as e:
            raise bad(str(e)) from None
        out.append((name, opts))
    return out


def _scalar(text: str):
    """A spec value: an int, a float (``1e-4`` too), a bool, or the text itself."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


# The older flags, each the same as one probe.
ALIASES = {"hessian_every": "hessian", "probe_every": "gradnorm"}


def probe_callbacks(cfg: dict) -> list[ProbeCallback]:
    """The probe callbacks of a train config: ``cfg["probe"]`` then the aliases
    ``hessian_every`` / ``probe_every`` (0: off). A probe may be given once."""
    items = parse_probe_spec(cfg.get("probe"))
    for key, name in ALIASES.items():
        n = cfg.get(key) or 0
        if n:
            if any(p == name for p, _ in items):
                raise GradlabError(f"invalid --{key.replace('_', '-')} {n}: --probe already runs {name!r} "
                                   f"(give it once)")
            items.append((name, {"every": n}))
    return [ProbeCallback(name, **opts) for name, opts in items]


__all__ = ["TRAINING_PROBES", "TrainingProbe", "ProbeCallback", "probe_scalars", "parse_probe_spec",
           "probe_callbacks", "ALIASES"]
