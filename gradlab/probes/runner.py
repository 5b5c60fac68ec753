"""Running a probe from its configuration, the same way for ``gradlab probe NAME`` and Python.

:func:`prepare_probe` resolves and checks the configuration (the probe's options, its model
source's and :data:`CONTEXT_OPTIONS`; one clear line per mistake), loads the model, draws the
batches and runs the probe's own checks: everything that can fail on a user mistake happens
there, before a run folder exists. :meth:`PreparedProbe.run` then computes the report.

    >>> from gradlab.probes import run_probe
    >>> report = run_probe("hessian", run="last", top_k=3, trace=False)  # doctest: +SKIP
    >>> print("\\n".join(report.summary_lines))                           # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

from gradlab.core.losses import LOSSES
from gradlab.core.options import Option, Options
from gradlab.probes.base import Probe, ProbeContext, ProbeReport, as_probe
from gradlab.runs.options import DEVICE, RUNS_DIR, SEED

#: What every probe run needs besides its own and its model source's options.
CONTEXT_OPTIONS = Options(RUNS_DIR, SEED, DEVICE, Option(
    "loss", str, None, "Loss the probe differentiates (default: the source run's --loss, else cross-entropy)",
    choices=LOSSES))


@dataclass
class PreparedProbe:
    """A probe ready to run: ``ctx`` is its context, ``config`` what ``config.yaml`` records
    (every resolved option, the model source's description and what the probe's checks add)."""

    name: str
    probe: Probe
    ctx: ProbeContext
    config: dict

    def run(self) -> ProbeReport:
        return self.probe.run(self.ctx)


def probe_options(name: str) -> Options:
    """Every option a run of probe ``name`` takes: model source, its own, :data:`CONTEXT_OPTIONS`
    (from the declarations in the manifest: no probe module, no torch, is imported for them)."""
    from gradlab.core.manifest import registry_view

    view = registry_view("probes").entry(name)
    return view.extra["source_options"] + view.options + CONTEXT_OPTIONS


def prepare_probe(name: str, sources: Sequence[tuple[str, Mapping[str, Any]]],
                  extra: Optional[Options] = None) -> PreparedProbe:
    """Resolve, load, draw and check probe ``name``.

    Args:
        sources: ``[(where, values), ...]``, lowest precedence first, e.g.
            ``[("in probe.yaml", file_values), ("", flags)]`` (``None`` values: not given).
        extra: options the caller handles itself (the CLI's run-folder ``name``); they are
            checked and returned in ``config`` too.
    Raises:
        GradlabError: a bad or unknown option, a missing run, or a probe check (e.g. an unknown
            layer) -- all before any run folder exists.
    """
    from gradlab.core.config import resolve_config

    own = probe_options(name) + (extra or Options())
    cfg = resolve_config(own, [], sources, command=f"probe {name}")  # names and numbers: before torch

    from gradlab.core.device import resolve_device
    from gradlab.core.losses import loss_fn, run_loss
    from gradlab.probes import PROBES

    entry = PROBES.entry(name)
    probe = as_probe(entry)
    options = {k: cfg[k] for k in entry.options.names()}
    from gradlab.core.distributed import init_from_env, rank_device

    device = resolve_device(cfg["device"])
    info = init_from_env(device.type)  # under torchrun: join the group (every rank draws the same batches)
    device = rank_device(device, info)
    source = probe.load(cfg, device)
    loss = cfg.get("loss") or run_loss(source.run_config)  # a run's probes default to its own loss
    ctx = ProbeContext(source.model, loss_fn(loss), probe.draw(source, options, cfg["seed"]), device,
                       cfg["seed"], options, source, dist=info)
    added = probe.prepare(ctx) or {}
    return PreparedProbe(name, probe, ctx, {**cfg, "loss": loss, **source.description, **added})


def run_probe(name: str, **options) -> ProbeReport:
    """Run probe ``name`` from Python with ``options`` (any of :func:`probe_options`); no run
    folder is written. Raises :class:`~gradlab.core.errors.GradlabError` for a mistake."""
    return prepare_probe(name, [("", options)]).run()


__all__ = ["CONTEXT_OPTIONS", "PreparedProbe", "prepare_probe", "probe_options", "run_probe"]
