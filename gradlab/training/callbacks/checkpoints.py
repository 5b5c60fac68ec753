"""Checkpoints: ``checkpoints/last.pt`` to resume from, and weight snapshots along training."""

from __future__ import annotations

from time import monotonic

from gradlab.training.callbacks.base import Callback, EpochInfo, StepInfo


class Checkpoints(Callback):
    """``last.pt`` with the trainer's whole position (:meth:`Trainer.state`: weights, optimizer,
    scheduler, RNG states, step, epoch, batch in epoch, epoch sums, callback states):

    * at the end of the first epoch of every fit(), unless one was written during it, so a run
      killed early can be resumed;
    * every ``every_seconds`` (when > 0), also inside an epoch: once that much time has passed
      since fit() started or since the last write, at the step after the one that noticed, so
      that under torchrun every rank writes at the same step (rank 0's clock decides);
    * at an epoch's end, unless one was written less than ``every_seconds`` ago (0: every epoch);
    * always when the run stops: completed, diverged (the weights before the step that diverged),
      or interrupted by Ctrl-C or SIGTERM (at the step boundary where it was honoured). After a
      second signal, which stops mid-step, or a failure, the last one written is kept as it is.

    Written in the background (the state is frozen first; fit() waits for the write before it
    reports the epoch and before it returns), so a kill meanwhile leaves the previous file. With ``keep > 0``: ``init.pt`` before
    the first step and ``step-NNNNNNNN.pt`` (weights and step only) at ``keep`` steps spread
    evenly over training, the last one at its final step.

    ``order = 100``: it runs after every other callback, so the state includes what they did.
    """

    order = 100

    def __init__(self, every_seconds: float = 30.0, keep: int = 0):
        self.every_seconds, self.keep = every_seconds, keep
        self.snapshot_steps: set = set()
        self._last_write = 0.0
        self._written = None  # the position last written: not written twice

    def on_fit_start(self, trainer) -> None:
        if trainer.is_main:  # the temporary files of writes a kill cut short
            from gradlab.runs.checkpoints import remove_stale_temporaries

            for folder in (trainer.run.path, trainer.run.path / "checkpoints"):
                remove_stale_temporaries(folder)
        self._last_write = monotonic()
        self._written = None
        n, total = self.keep, trainer.total_steps
        self.snapshot_steps = {max(1, round(total * (i + 1) / n)) for i in range(n)} if n > 0 else set()
        if trainer.step == 0 and self.snapshot_steps and trainer.is_main:
            trainer.run.save_checkpoint({"model": trainer.model.state_dict(), "step": 0}, "init.pt", wait=False)

    def on_step_end(self, trainer, info: StepInfo) -> None:
        if info.step in self.snapshot_steps and trainer.is_main:
            trainer.run.save_checkpoint({"model": trainer.model.state_dict(), "step": info.step},
                                        f"step-{info.step:08d}.pt", wait=False)
        if trainer.checkpoint_due:  # asked for at an earlier step, agreed by every rank at this one
            self.save(trainer)
        elif self.every_seconds > 0 and trainer.is_main and monotonic() - self._last_write >= self.every_seconds:
            trainer.request_checkpoint()

    def on_epoch_end(self, trainer, info: EpochInfo) -> None:
        if self._written is None or monotonic() - self._last_write >= self.every_seconds:
            self.save(trainer)

    def on_fit_end(self, trainer, status: str, exact: bool) -> None:
        if exact and self._written != (trainer.step, trainer.epoch):
            self.save(trainer)

    def save(self, trainer) -> None:
        """Write ``last.pt`` now (rank 0). Called at the same step on every rank: the state
        completes the epoch's sums across ranks first."""
        state = trainer.state()
        trainer.checkpoint_requested = False  # this write is the one asked for
        if trainer.is_main:
            # TensorBoard's events up to this step go to their file first: a resumed run purges
            # the events after it, so none before it may still sit in the writer's queue.
            trainer.run.flush_tb()
            trainer.run.save_checkpoint(state, "last.pt", wait=False)
        self._last_write = monotonic()
        self._written = (trainer.step, trainer.epoch)


__all__ = ["Checkpoints"]
