"""The probe protocol: a probe is one registered module; one report type; one CLI path.

A probe declares its options once and registers itself; it is given a :class:`ProbeContext`
(the model, the loss, the batches it asked for, the device, the seed, its resolved options and
where the model came from) and returns a :class:`ProbeReport`. Everything else (flags, config
validation, loading the model, the run folder, the terminal table, CSVs, figures, TensorBoard,
``summary.csv``) is done once for every probe by ``gradlab probe NAME`` (``gradlab_cli.probe``)::

    from gradlab.core.options import Option, Options
    from gradlab.probes import PROBES, Probe, ProbeReport

    @PROBES.register("meanlogit", "mean logit over the batches", options=Options(
        Option("batches", int, 2, "batches to average over", low=1),
        Option("batch_size", int, 64, "examples per batch", low=1),
    ))
    class MeanLogit(Probe):
        def run(self, ctx):
            import pandas as pd
            import torch
            with torch.no_grad():
                means = [float(ctx.model(x).mean()) for x, _ in ctx.batches]
            return ProbeReport(table=pd.DataFrame({"batch": range(len(means)), "mean_logit": means}),
                               scalars={"mean_logit": sum(means) / len(means)})

A plain function ``fn(ctx) -> ProbeReport`` may be registered instead of a class. A probe that
makes sense during training (one batch, every N steps) keeps ``training = True`` and may
override :meth:`Probe.scalars`; the training loop calls :func:`probe_scalars`. From Python,
``gradlab.probes.run_probe("meanlogit", run="last")`` returns the report without a run folder.

This module imports no torch at import time, so ``gradlab probe --help`` can list the probes of
the :class:`ProbeRegistry` catalogue without loading them.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping, Optional

from gradlab.core.errors import GradlabError
from gradlab.core.options import Options, check_keys
from gradlab.core.registry import Entry, Registry


@dataclass
class ProbeReport:
    """What a probe returns; the CLI renders, writes and logs it in one place.

    Attributes:
        table: the probe's main result, written as ``<name>.csv``.
        tables: further CSVs, ``{file stem: DataFrame}`` (``"jacobian_summary"``).
        view, title: the rich table printed on the terminal (default: ``table``) and its title.
        views: further terminal tables, ``[(title, DataFrame), ...]``, printed after ``view``.
        scalars: floats logged at step 0 as ``<scalar_group>/<key>`` (TensorBoard and
            metrics.csv); :func:`probe_scalars` returns them during training.
        scalar_group: the TensorBoard group of ``scalars`` (default: the probe's name).
        series: ``{tag: [(step, value), ...]}``: scalars against an axis such as depth or rank.
        histograms: ``{tag: 1-D tensor}`` logged as TensorBoard histograms.
        figures: ``{name: matplotlib Figure}``, saved as ``plots/<name>.png`` and logged as images.
        summary_lines: printed after the table (verdicts, warnings); also logged as text.
        notes: caveats printed on stderr as ``gradlab: note: ...``.
        text: ``{tag: text}`` TensorBoard text (``summary_lines`` go under ``<name>/summary``
            unless a tag of theirs is given here).
        artifacts: ``{file name: object}`` saved with ``torch.save`` in the run folder.
        metrics: the ``summary.csv`` row (the model source's description is added to it).
    """

    table: Any
    tables: dict = field(default_factory=dict)
    view: Any = None
    title: str = ""
    views: list = field(default_factory=list)
    scalars: dict = field(default_factory=dict)
    scalar_group: str = ""
    series: dict = field(default_factory=dict)
    histograms: dict = field(default_factory=dict)
    figures: dict = field(default_factory=dict)
    summary_lines: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    text: dict = field(default_factory=dict)
    artifacts: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)


@dataclass
class ProbeContext:
    """What a probe is given.

    Attributes:
        model: the network (a probe leaves its mode, buffers, ``requires_grad`` and ``.grad``
            as it found them).
        loss_fn: ``loss_fn(logits, y) -> scalar`` mean batch loss.
        batches: ``[(x, y), ...]`` on ``device``, as the probe's :meth:`Probe.draw` asked.
        device, seed: where to compute and the run's seed.
        options: the probe's own options, resolved and checked.
        source: the :class:`~gradlab.probes.source.ModelSource` (data, run folder, its config,
            a description for ``config.yaml``); None when a training loop calls the probe.
        progress: ``progress(done, total)`` for long probes (no-op unless the CLI shows a bar).
        state: the probe's own scratch space between :meth:`Probe.prepare` and :meth:`Probe.run`.
        notes: caveats found by :meth:`Probe.prepare` (printed before the run starts).
        dist: the :class:`~gradlab.core.distributed.DistInfo` of a run under ``torchrun`` (None: one process). A probe
            that splits its work takes its share and combines the results over ranks, so every
            rank returns the whole report; one that does not computes all of it on every rank
            (correct, no faster). Only rank 0 writes the run folder either way.
    """

    model: Any
    loss_fn: Callable
    batches: list
    device: Any
    seed: int
    options: dict
    source: Any = None
    progress: Optional[Callable[[int, int], None]] = None
    state: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    dist: Any = None  # None: one process (a training loop's call)

    def report_progress(self, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(done, total)


class Probe:
    """Base class of a registered probe; a subclass writes :meth:`run` (and what it needs of
    the other hooks). The class docstring is the ``--help`` text of ``gradlab probe NAME``.

    Class attributes:
        training: whether the probe runs on one batch during training (:func:`probe_scalars`).
        training_split, training_summary: where its training-time rows go, and which of its
            scalars the run's final metrics keep.
        source_options: the model-source options it takes (default: a trained ``--run`` or a
            fresh model from the model flags, see :mod:`gradlab.probes.source`).
        flag_off_names: ``{option: "--off-flag"}``: the "off" spelling of a boolean flag when it
            is not ``--no-<name>`` (e.g. ``--eval-mode`` for ``train_mode``).
    """

    training: ClassVar[bool] = True
    training_split: ClassVar[str] = ""  # metrics.csv split of its rows during training ("": its name)
    training_summary: ClassVar[tuple] = ()  # scalars whose last value goes into summary.csv
    source_options: ClassVar[Optional[Options]] = None  # None: gradlab.probes.source.SOURCE_OPTIONS
    flag_off_names: ClassVar[dict] = {}

    def __init__(self, entry: Entry):
        self.entry = entry
        self.name = entry.name
        self.options = entry.options

    def model_source_options(self) -> Options:
        """:attr:`source_options`, or the shared :data:`~gradlab.probes.source.SOURCE_OPTIONS`."""
        if self.source_options is not None:
            return self.source_options
        from gradlab.probes.source import SOURCE_OPTIONS

        return SOURCE_OPTIONS

    # -- the hooks, in the order the CLI calls them ----------------------------------------
    def load(self, cfg: Mapping[str, Any], device):
        """The :class:`~gradlab.probes.source.ModelSource` for the resolved config ``cfg``."""
        from gradlab.probes.source import load_source

        return load_source(cfg, device=device)

    def draw(self, source, options: Mapping[str, Any], seed: int) -> list:
        """The batches the probe runs on (default: ``batches`` seeded random batches of
        ``batch_size`` from the chosen split, see :func:`~gradlab.probes.source.sampled_batches`)."""
        from gradlab.probes.source import sampled_batches

        x, y = source.split()
        return sampled_batches(x, y, options["batches"], options["batch_size"], seed, source.device)

    def prepare(self, ctx: ProbeContext) -> dict:
        """Checks that need the model (raise :class:`GradlabError`) and set-up, before any run
        folder exists; returns entries added to ``config.yaml``."""
        return {}

    def run(self, ctx: ProbeContext) -> ProbeReport:
        raise NotImplementedError(f"probe {self.name!r} does not implement run(ctx)")

    def scalars(self, model, loss_fn, batch, **options) -> dict:
        """Training-time floats on one ``(x, y)`` batch: by default :attr:`ProbeReport.scalars`
        of :meth:`run` with the declared defaults for options not given."""
        opts = self.options.resolve(options, owner=f"probe {self.name}")
        x = batch[0]
        ctx = ProbeContext(model, loss_fn, [tuple(batch)], x.device, 0, opts)
        self.prepare(ctx)
        return {k: float(v) for k, v in self.run(ctx).scalars.items()}

    def help_text(self) -> str:
        """The ``--help`` text: the probe class's own docstring."""
        doc = type(self).__doc__
        return inspect.cleandoc(doc) if doc else ""


class FunctionProbe(Probe):
    """A probe registered as a plain function ``fn(ctx) -> ProbeReport``."""

    def __init__(self, entry: Entry):
        super().__init__(entry)
        self.fn = entry.obj
        self.training = getattr(self.fn, "training", True)

    def run(self, ctx: ProbeContext) -> ProbeReport:
        return self.fn(ctx)

    def help_text(self) -> str:
        return inspect.getdoc(self.fn) or ""


def as_probe(entry: Entry) -> Probe:
    """A fresh :class:`Probe` for a registry entry (a Probe subclass or a plain function)."""
    obj = entry.obj
    if inspect.isclass(obj) and issubclass(obj, Probe):
        return obj(entry)
    if callable(obj):
        return FunctionProbe(entry)
    raise TypeError(f"probe {entry.name!r}: register a Probe subclass or a function ctx -> ProbeReport")


class ProbeRegistry(Registry):
    """The probes: a :class:`Registry` whose built-in entries are imported on first use.

    ``catalog`` maps a built-in probe's name to its module: names are known without importing
    torch (``gradlab probe --help`` takes the descriptions from the manifest), and a probe's
    module is imported when the probe is looked up, so ``gradlab probe hessian`` does not load
    the landscape code. The module registers the entry itself; probes registered from anywhere
    else (user code, tests) are entries like any.
    """

    def __init__(self, kind: str, catalog: Mapping[str, str]):
        super().__init__(kind)
        self.catalog = dict(catalog)

    def _load(self, name: Optional[str] = None) -> None:
        for n, module in self.catalog.items():
            if (name is None or n == name) and not super().__contains__(n):
                importlib.import_module(module)

    def loaded(self) -> bool:
        """Whether any probe is registered in this process yet (imported from the catalogue, or
        registered by user code); until then the manifest describes the probes (no torch)."""
        return bool(super().names())

    def manifest_extra(self, entry: Entry) -> dict:
        """What ``gradlab probe NAME`` needs beside the options to build its flags and help
        without importing the probe (see :mod:`gradlab.core.manifest`)."""
        probe = as_probe(entry)
        return {"source_options": probe.model_source_options(), "help": probe.help_text(),
                "off_names": dict(probe.flag_off_names)}

    def entry(self, name: str) -> Entry:
        if isinstance(name, str) and name in self.catalog:
            self._load(name)
        return super().entry(name)

    def names(self) -> list[str]:
        return list(self.catalog) + [n for n in super().names() if n not in self.catalog]

    def __contains__(self, name: str) -> bool:
        return name in self.catalog or super().__contains__(name)

    def __iter__(self):
        self._load()
        return iter([self.entry(n) for n in self.names()])  # in names() order, catalogue first

    def __len__(self) -> int:
        return len(self.names())

    def declarations(self):
        self._load()
        return super().declarations()

    def options_of_others(self, name: str):
        self._load()
        return super().options_of_others(name)


def probe_scalars(name: str, model, loss_fn, batch, **options) -> dict:
    """Run probe ``name`` on one ``(x, y)`` batch as a training loop would: a dict of floats.

    ``options`` are the probe's declared options (checked; the probe's training defaults apply
    to the others). Raises :class:`GradlabError` for an unknown probe or option, or a probe that
    does not run during training (``training = False``).
    """
    from gradlab.probes import PROBES

    entry = PROBES.entry(name)
    probe = as_probe(entry)
    if not probe.training:
        able = [e.name for e in PROBES if as_probe(e).training]
        raise GradlabError(f"probe {name!r} does not run during training; probes that do: {', '.join(able)}")
    check_keys(list(options), entry.options.names(), owner=f"probe {name}")
    checked = {k: entry.options[k].check(v) for k, v in options.items()}
    return probe.scalars(model, loss_fn, batch, **checked)


__all__ = ["FunctionProbe", "Probe", "ProbeContext", "ProbeRegistry", "ProbeReport", "as_probe", "probe_scalars"]
