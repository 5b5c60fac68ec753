"""Probes: measurements of a model at a point (Hessian, Jacobians, gradient norms, landscapes).

``PROBES`` is the one registry that ``gradlab list probes`` and ``gradlab probe NAME`` read. A
probe is one module that registers a :class:`~gradlab.probes.base.Probe` (or a function of a
:class:`~gradlab.probes.base.ProbeContext`) with ``@PROBES.register(name, description,
options=Options(...), paper=...)`` and returns a :class:`~gradlab.probes.base.ProbeReport`;
see :mod:`gradlab.probes.base`. :func:`probe_scalars` runs any probe that supports it on one
batch, as a training loop does; :func:`run_probe` runs one from Python as ``gradlab probe NAME``
does, without a run folder.

The built-in probes are listed in the catalogue below by name and module, so that their names
are known without importing torch; each is imported on first use. Their descriptions and
options are declared once, where each registers itself (the CLI reads them from the manifest,
:mod:`gradlab.core.manifest`).
"""

from gradlab.probes.base import Probe, ProbeContext, ProbeRegistry, ProbeReport, probe_scalars

PROBES = ProbeRegistry("probe", {
    "gradnorm": "gradlab.probes.gradnorm",
    "landscape": "gradlab.landscape.probe",
    "jacobian": "gradlab.probes.jacobian",
    "hessian": "gradlab.probes.hessian",
    "gradstats": "gradlab.probes.gradstats",
    "stepquality": "gradlab.probes.stepquality",
    "critical-points": "gradlab.probes.critical_search",
})

from gradlab.probes.runner import run_probe  # noqa: E402  (after PROBES: it looks probes up there)

__all__ = ["PROBES", "Probe", "ProbeContext", "ProbeReport", "probe_scalars", "run_probe"]
