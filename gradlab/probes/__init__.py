"""Probes: measurements of a model at a point (Hessian, Jacobians, gradient norms, ...).

``PROBES`` is the registry ``gradlab list probes`` reads. A probe is one module that registers
its entry function with ``@PROBES.register(name, description, options=...)``; the modules are
imported below (after ``PROBES`` exists) so that listing the registry sees every probe.
"""

from gradlab.core.registry import Registry

PROBES = Registry("probe")

from gradlab.probes import hessian  # noqa: E402,F401  (registers "hessian")
from gradlab.probes import gradnorm, jacobian  # noqa: E402,F401  (register "gradnorm", "jacobian")
