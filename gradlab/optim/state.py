"""Optimizer state beyond torch's per-parameter ``state``, carried through checkpoints.

gradlab's own optimizers keep some state of their own besides ``self.state[p]``: a random
generator, step and product counters, a memory of curvature pairs, a phase. It travels in
``state_dict()["gradlab"]``, so a resumed run continues exactly (``tests/test_resume_every_optimizer.py``).
A subclass of :class:`ExtraState` says what that state is (:meth:`~ExtraState._gradlab_state`)
and how to restore it (:meth:`~ExtraState._load_gradlab_state`); a state dict without the key
(torch's own format) restores torch's part alone.
"""

from __future__ import annotations

from torch.optim import Optimizer


class ExtraState(Optimizer):
    """Saves and restores :meth:`_gradlab_state` beside torch's optimizer state (module docstring)."""

    def _gradlab_state(self) -> dict:
        """This optimizer's own state, as plain values and tensors (none by default)."""
        return {}

    def _load_gradlab_state(self, extra: dict) -> None:
        """Restore what :meth:`_gradlab_state` returned."""

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["gradlab"] = self._gradlab_state()
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("gradlab", None)
        super().load_state_dict(state_dict)
        if extra is not None:
            self._load_gradlab_state(extra)
