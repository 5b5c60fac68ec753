"""Probes during training: any registered probe run every N steps on the current batch.

``--probe`` takes a comma-separated list of probes, each ``NAME`` followed by ``:KEY=VALUE``
options, one of which must be ``every=N``::

    --probe hessian:every=100,gradnorm:every=50
    --probe hessian:every=20:tol=1e-4:trace_matvecs=40

Every probe of the registry (``gradlab list probes``) whose class keeps ``training = True`` can
run here, a user's own too: the training loop knows none of them. Values are numbers,
``true``/``false`` or words; each is checked against the probe's declared options.
``--hessian-every N`` and ``--probe-every N`` are the same as ``hessian:every=N`` and
``gradnorm:every=N``. A probe runs on rank 0, on a fork of the RNG state (training draws the same
dropout masks with or without it), and logs its scalars (:func:`gradlab.probes.probe_scalars`)
as rows of its split: the probe's ``training_split`` (``curvature`` for hessian), else its name.
Its ``training_summary`` scalars also go into the run's final metrics (their last value).
"""

from __future__ import annotations

from typing import Optional

import torch

from gradlab.core.errors import GradlabError
from gradlab.core.options import Option
from gradlab.training.callbacks.base import Callback, StepInfo, every

_FORM = "NAME:every=N[:KEY=VALUE...], comma-separated"
EVERY = Option("every", int, 1, "steps between runs", low=1)


def training_probe(name: str):
    """The registered probe ``name`` if it runs during training; GradlabError naming the ones
    that do otherwise."""
    from gradlab.probes import PROBES
    from gradlab.probes.base import as_probe

    able = lambda: [e.name for e in PROBES if as_probe(e).training]  # noqa: E731
    if name not in PROBES:
        raise GradlabError(f"unknown probe {name!r} for training; choose from: {', '.join(able())}")
    probe = as_probe(PROBES.entry(name))
    if not probe.training:
        raise GradlabError(f"probe {name!r} does not run during training; probes that do: {', '.join(able())}")
    return probe


class ProbeCallback(Callback):
    """Run probe ``name`` every ``every`` steps on the step's batch and log its scalars.

    Args:
        name: a registered probe that runs during training.
        every: steps between runs (steps ``every``, ``2 every``, ...).
        options: the probe's options (checked against its declaration).
    Raises:
        GradlabError: an unknown probe, ``every < 1``, or a bad option.
    """

    def __init__(self, name: str, every: int, **options):
        from gradlab.core.options import check_keys

        probe = training_probe(name)
        self.name, self.every = name, EVERY.check(every)
        check_keys(list(options), probe.options.names(), owner=f"probe {name}")
        self.options = {k: probe.options[k].check(v) for k, v in options.items()}
        self.probe_options = set(probe.options.names())
        self.split = getattr(probe, "training_split", "") or name
        self.summary = tuple(getattr(probe, "training_summary", ()))
        self.last: dict = {}

    @property
    def key(self) -> str:
        return f"probe/{self.name}"

    def on_step_end(self, trainer, info: StepInfo) -> None:
        if not (every(self.every, info.step) and trainer.is_main):
            return
        from gradlab.probes import probe_scalars

        device = trainer.device
        options = dict(self.options)
        if "lr" in self.probe_options and options.get("lr") is None:  # the optimizer's current step size
            options["lr"] = float(trainer.optimizer.param_groups[0]["lr"])
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            scalars = probe_scalars(self.name, trainer.model, trainer.loss_fn, (info.x, info.y), **options)
        trainer.run.log_metrics(info.step, info.epoch, self.split, scalars)
        self.last = {k: float(scalars[k]) for k in self.summary if k in scalars}

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
        if not name:
            raise bad(f"expected {_FORM}")
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
    from gradlab.training.callbacks.after_update import link_after_update

    callbacks = [make_probe_callback(name, opts) for name, opts in items]
    link_after_update(callbacks)  # instruments measuring at the updated weights share one pass
    return callbacks


def make_probe_callback(name: str, opts: dict) -> ProbeCallback:
    """The callback of probe ``name``: a :class:`ProbeCallback`, or the probe's own subclass of
    it where the probe must see the update (its ``training_callback``, ``"module:Class"``)."""
    import importlib

    target = getattr(training_probe(name), "training_callback", "")
    if not target:
        return ProbeCallback(name, **opts)
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls)(name, **opts)


__all__ = ["ProbeCallback", "make_probe_callback", "parse_probe_spec", "probe_callbacks", "training_probe", "ALIASES"]
