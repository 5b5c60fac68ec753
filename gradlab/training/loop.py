"""Training: the loop behind ``gradlab train``.

The loop owns the data (global batches through :class:`gradlab.core.distributed.GlobalBatchSampler`),
one optimizer step (``loss.backward(); step()``, or ``step(closure)`` for optimizers that take
their own gradients), DDP, the position in training and a deferred Ctrl-C or SIGTERM
(:mod:`gradlab.training.interrupts`). Everything else -- metric rows, TensorBoard, histograms,
checkpoints, the divergence stop, probes, adversarial batches -- is a callback
(:mod:`gradlab.training.callbacks`).

A run that cannot go on ends with a status and one line, never a traceback: ``interrupted``
(a signal; a checkpoint at the step boundary), ``diverged``, or ``failed`` when the run folder
cannot be written (disk full, read-only) or, under torchrun, another rank died; a failed run
keeps its last checkpoint as it is, to resume from.

Checkpoints carry the position inside the epoch, every RNG state and the callbacks' states, so
``--resume`` continues exactly where the checkpoint was written and a resumed run ends with the
same metrics as an uninterrupted one.

``max_seconds`` is a wall-time budget: once the training time (summed over resumes) reaches it,
the run closes the epoch in progress at the current step (its train rows, the test evaluation,
a checkpoint) and ends ``completed`` with ``budget_reached`` in its final metrics, so optimizers
can be compared at an equal time. Under torchrun rank 0's clock decides, for every rank at once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from gradlab.core.errors import GradlabError, check
from gradlab.curvature.cost import GradientCost, watch
from gradlab.training.callbacks import Callback, EpochInfo, Progress, StepInfo, StopTraining, default_callbacks
from gradlab.training.callbacks.base import overrides, sort_callbacks
from gradlab.training.callbacks.metrics import evaluate
from gradlab.training.interrupts import DeferredInterrupt, signal_name
from gradlab.training.load import legacy_callback_states
from gradlab.training.options import TRAIN_OPTIONS, train_defaults, validate_train_config
from gradlab.training.precision import Precision
from gradlab.training.step import StepMixin, uses_closure

_HOOKS = ("on_fit_start", "transform_loss", "on_loss", "on_gradients", "on_step_end", "on_epoch_end",
          "on_epoch_report", "summarize", "on_fit_end")


def subset(cfg: dict, keys) -> dict:
    return {k: cfg[k] for k in keys if k in cfg}


@dataclass
class TrainResult:
    status: str  # completed | diverged | interrupted | failed
    metrics: dict
    message: str = ""
    events: list = field(default_factory=list)  # the optimizer's (e.g. SWATS' switch to SGD)
    signal: Optional[int] = None  # the signal that interrupted the run (SIGINT, SIGTERM)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    # Cloned: a loaded tensor may be a view into a larger buffer (a nonzero storage offset), which
    # torch.set_rng_state does not handle ("Invalid mt19937 state", or a crash).
    torch.set_rng_state(state["torch"].clone())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.clone() for s in state["cuda"]])


class Trainer(StepMixin):
    """Holds the state of one training run; :meth:`fit` executes it.

    Args:
        cfg: a resolved train config (see :func:`gradlab.training.options.validate_train_config`);
            options missing from it (a run made before they existed) take their defaults.
        resume: a checkpoint (:meth:`state`) to continue from.
        callbacks: added to :func:`~gradlab.training.callbacks.default_callbacks`; they run after
            the built-in ones and before the checkpoint (see ``Callback.order``).
    """

    def __init__(self, cfg: dict, resume: Optional[dict] = None, callbacks: Sequence[Callback] = ()):
        from gradlab.core.device import resolve_device
        from gradlab.core.distributed import init_from_env
        from gradlab.data import dataset_options_in, load_dataset
        from gradlab.models import build_model, model_options_in
        from gradlab.optim import OPTIMIZERS, build_optimizer, build_scheduler, default_lr

        cfg = {**TRAIN_OPTIONS.defaults(), **cfg}
        self.cfg, self.run = cfg, None
        from gradlab.core.losses import loss_fn
        self.loss_fn = loss_fn(cfg.get("loss"))  # --loss: the mean batch loss (gradlab.core.losses)
        device = resolve_device(cfg["device"])
        self.dist = init_from_env(device.type)
        if self.dist.enabled and device.type == "cuda":
            device = torch.device("cuda", self.dist.local_rank)
        self.device = device
        self.is_main = self.dist.is_main
        check(
            cfg["batch_size"] >= self.dist.world_size,
            f"batch size {cfg['batch_size']} is smaller than the number of processes {self.dist.world_size}",
        )

        torch.manual_seed(cfg["seed"])
        self.data = load_dataset(cfg["dataset"], seed=cfg["seed"], data_dir=cfg.get("data_dir"),
                                 **dataset_options_in(cfg["dataset"], cfg))
        self.model = build_model(cfg["model"], self.data.spec, **model_options_in(cfg["model"], cfg)).to(device)
        from gradlab.training.streaming import place_data

        self.sampler = place_data(self, device)  # x_train ... on the device, or a streamed dataset

        self.lr = cfg["lr"] if cfg.get("lr") is not None else default_lr(cfg["opt"])
        # the chosen optimizer's own options (a flat config may hold other optimizers' keys)
        opt_opts = {**subset(cfg, OPTIMIZERS.entry(cfg["opt"]).options.names()), "lr": self.lr, "seed": cfg["seed"]}
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(cfg["opt"], self.params, **opt_opts)
        self.closure_step = uses_closure(self.optimizer, self.model, self.loss_fn)
        self.cost = GradientCost()  # gradient-equivalents so far (gradlab.curvature.cost)
        watch(self.model)
        self.precision = Precision(cfg.get("precision", "fp32"), device, self.closure_step, self.optimizer)
        self.total_steps = cfg["epochs"] * len(self.sampler)
        self.scheduler = build_scheduler(cfg.get("schedule", "constant"), self.optimizer, self.total_steps)

        # Second-order optimizers take their gradients with autograd.grad, which bypasses DDP's
        # reducer; they all-reduce gradient and curvature themselves, so the model stays unwrapped.
        self.net = self.model
        if self.dist.enabled:
            import torch.distributed as dist

            for t in self.model.state_dict().values():
                dist.broadcast(t, 0)
            if not self.closure_step:
                from torch.nn.parallel import DistributedDataParallel as DDP

                self.net = DDP(self.model, device_ids=[device.index] if device.type == "cuda" else None)

        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.seconds_before, self._fit_start = 0.0, None  # training seconds of earlier fits (resumes)
        self.budget_reached = False  # max_seconds stopped the run
        self.epoch_sums = [0.0, 0.0, 0.0]  # loss sum, correct, count (this rank's share)
        self._outputs: list = []  # (logits, labels) of steps whose correct predictions are not counted yet
        self.interrupts = DeferredInterrupt()  # SIGINT/SIGTERM become a stop at a step boundary
        self.checkpoint_requested = False  # a callback asks for a checkpoint (see request_checkpoint)
        self.checkpoint_due = False  # every rank writes one at this step
        self._transforms, self._loss_checks, self._grad_checks = [], [], []  # fit() sets the hooks
        self._step_norms = None
        self.callbacks = sort_callbacks([*default_callbacks(cfg), *callbacks])
        keys = [cb.key for cb in self.callbacks]
        dup = next((k for k in keys if keys.count(k) > 1), None)
        check(dup is None, f"two training callbacks save their state as {dup!r}: give each its own key")
        if resume is not None:
            self._load_state(resume)

    # -- state ---------------------------------------------------------------------------------
    def state(self) -> dict:
        """The exact position: what ``last.pt`` holds. Under torchrun, call it on every rank at
        the same step (the epoch sums are completed across ranks first), or where the loop has
        nothing pending: in ``on_epoch_end`` and ``on_fit_end``."""
        self._count_correct()
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": _rng_state(),
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "epoch_sums": list(self.epoch_sums),
            "callbacks": {cb.key: s for cb in self.callbacks if (s := cb.state_dict())},
            "cost": self.cost.state_dict(),
            "train_seconds": self.train_seconds(),
            **self.precision.state_dict(),
        }

    def _load_state(self, ckpt: dict) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        _set_rng_state(ckpt["rng"])
        self.step, self.epoch, self.batch_in_epoch = ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"]
        self.epoch_sums = list(ckpt["epoch_sums"])
        self.precision.load_state_dict(ckpt)
        self.cost.load_state_dict(ckpt.get("cost", {}))  # a checkpoint from before the count: from 0
        self.seconds_before = float(ckpt.get("train_seconds", 0.0))
        states = ckpt["callbacks"] if "callbacks" in ckpt else legacy_callback_states(ckpt)
        for cb in self.callbacks:
            cb.load_state_dict(states.get(cb.key, {}))

    def train_seconds(self) -> float:
        """Seconds spent in :meth:`fit` so far, over every resume (what ``max_seconds`` bounds)."""
        now = time.time() - self._fit_start if self._fit_start is not None else 0.0
        return self.seconds_before + now

    def request_stop(self) -> None:
        """Stop at the end of the current step with status ``interrupted``, a checkpoint written
        (what the first Ctrl-C or SIGTERM does). Under torchrun a request made during a step's callbacks is
        honoured at the end of the next step, where every rank learns of it."""
        self.interrupts.request()

    def request_checkpoint(self) -> None:
        """Ask for a checkpoint at a step boundary every rank agrees on: ``checkpoint_due`` is
        True in the ``on_step_end`` of the next step, on every rank (one process: the same)."""
        self.checkpoint_requested = True

    def _count_correct(self) -> None:
        """Add the correct predictions of the steps since the last call to ``epoch_sums``: one
        argmax over all their logits instead of four small ops and a read-back per step. Called
        on every rank at the same steps (epoch ends and the end of fit), so the all-reduce matches."""
        if not self._outputs:
            return
        out = torch.cat([o for o, _ in self._outputs])
        labels = torch.cat([y for _, y in self._outputs])
        self._outputs.clear()
        correct = float((out.argmax(1) == labels).sum())
        if self.dist.enabled:
            from gradlab.core.distributed import all_reduce_sum

            correct = all_reduce_sum([correct], self.dist, self.device)[0]
        self.epoch_sums[1] += correct

    # -- the loop ------------------------------------------------------------------------------
    def fit(self, run, progress: Optional[Callable] = None, on_epoch: Optional[Callable] = None) -> TrainResult:
        """Train into the run folder ``run``; ``progress(step, total, epoch, loss, acc)`` after
        each step, ``on_epoch(epoch, epochs, metrics)`` once each epoch's checkpoint is on disk.
        Returns once every checkpoint is written (or, for a ``failed`` run, has failed)."""
        from gradlab.core.distributed import shutdown

        self.run = run
        run.cost = lambda: self.cost.total  # the grad_equivalents column of metrics.csv
        callbacks = self.callbacks
        if progress is not None or on_epoch is not None:  # just before the checkpoint
            callbacks = sort_callbacks([*callbacks, Progress(progress, on_epoch)])
        hooks = {h: [cb for cb in callbacks if overrides(cb, h)] for h in _HOOKS}
        self._transforms, self._loss_checks = hooks["transform_loss"], hooks["on_loss"]
        self._grad_checks = hooks["on_gradients"]
        start = self._fit_start = time.time()
        with self.interrupts:
            try:
                try:
                    for cb in hooks["on_fit_start"]:
                        cb.on_fit_start(self)
                    status, message, exact = self._epochs(hooks)
                    if exact:
                        self._count_correct()  # on every rank: the epoch sums of the end state are complete
                    for cb in hooks["on_fit_end"]:
                        cb.on_fit_end(self, status, exact)
                    run.wait_checkpoints()
                except Exception as e:  # noqa: BLE001 - only the failures _failure names are caught
                    status, message = "failed", self._failure(e)
                    if message is None:
                        raise
                    self._after_failure(hooks["on_fit_end"])
                metrics = {"epochs": self.epoch, "steps": self.step, "seconds": round(time.time() - start, 3),
                           "grad_equivalents": round(self.cost.total, 4)}
                if self.cfg.get("max_seconds") is not None:
                    metrics["budget_reached"] = self.budget_reached
                for cb in hooks["summarize"]:
                    metrics = cb.summarize(self, metrics)
                signum = self.interrupts.signum if status == "interrupted" else None
                events = [dict(e) for e in getattr(self.optimizer, "events", ())]
                return TrainResult(status, metrics, message, events, signum)
            finally:
                shutdown(self.dist)

    def _failure(self, exc: BaseException) -> Optional[str]:
        """One line for a failure that ends the run as ``failed`` (a write into the run folder,
        another rank's death), or None for anything else (a bug: its traceback is kept)."""
        from gradlab.core.distributed import rank_failure_message
        from gradlab.runs.write_errors import write_error_message

        return rank_failure_message(exc, self.dist) or write_error_message(exc, getattr(self.run, "path", None))

    def _after_failure(self, fit_end_hooks) -> None:
        """The last checkpoint stays as it is: no new one (``exact=False``); a write still in
        flight is waited for, and its error, already reported, dropped."""
        for cb in fit_end_hooks:
            try:
                cb.on_fit_end(self, "failed", False)
            except Exception:  # noqa: BLE001 - the run has failed already; its first cause is reported
                pass
        try:
            self.run.wait_checkpoints()
        except Exception:  # noqa: BLE001 - the same
            pass

    def _stop_message(self) -> str:
        by = signal_name(self.interrupts.signum) if self.interrupts.signum is not None else "a stop request"
        where = getattr(self.run, "path", None)
        how = f"gradlab train --resume {where}" if where is not None else "--resume"
        return f"interrupted by {by} at step {self.step}: checkpoint written; continue with: {how}"

    def _epochs(self, hooks) -> tuple[str, str, bool]:
        """Train until the end or a stop: (status, message, exact), ``exact`` False when the
        position is not a step boundary (a second signal)."""
        try:
            return (*self._train_epochs(hooks["on_step_end"], hooks), True)
        except StopTraining as stop:
            return stop.status, stop.message, stop.exact
        except KeyboardInterrupt:  # a second signal: stop now, keep the last checkpoint as it is
            by = signal_name(self.interrupts.signum)
            return "interrupted", f"interrupted by {by} twice: the last checkpoint is kept", False

    def _train_epochs(self, step_hooks, hooks) -> tuple[str, str]:
        from gradlab.core.distributed import all_reduce_sum
        from gradlab.training.streaming import batch_fetcher

        cfg, dist, interrupt, optimizer = self.cfg, self.dist, self.interrupts, self.optimizer
        # A constant schedule never changes the learning rate: its scheduler is not stepped.
        step_scheduler = cfg.get("schedule", "constant") != "constant"
        budget = cfg.get("max_seconds")
        params = self.params
        while self.epoch < cfg["epochs"]:
            batches = self.sampler.epoch_batches(self.epoch)
            n_batches, fetch = len(batches), batch_fetcher(self, batches)
            while self.batch_in_epoch < n_batches:
                b = self.batch_in_epoch
                idx, n_global = batches[b]
                xb, yb = fetch(b, idx)
                loss_sum, out = self.train_step(xb, yb, n_global)
                over = budget is not None and self.is_main and self.train_seconds() >= budget
                if dist.enabled:
                    # One small collective per step: the loss, whether any rank was asked to stop,
                    # whether rank 0 asked for a checkpoint and whether its time budget is spent,
                    # so every rank acts at the same step.
                    loss_g, stop, due, over = all_reduce_sum([loss_sum, float(interrupt.requested),
                                                              float(self.checkpoint_requested), float(over)],
                                                             dist, self.device)
                else:
                    loss_g, stop, due = loss_sum, False, self.checkpoint_requested
                self.checkpoint_due = due > 0
                self.step = step = self.step + 1
                self.batch_in_epoch = b + 1
                sums = self.epoch_sums
                sums[0] += loss_g
                sums[2] += n_global
                lr = optimizer.param_groups[0]["lr"]  # the rate this step used
                if step_scheduler:
                    self.scheduler.step()
                if step_hooks:
                    info = StepInfo(step, self.epoch, b, loss_g / n_global, lr, xb, yb, out, n_global, params,
                                    self._step_norms)
                    for cb in step_hooks:
                        cb.on_step_end(self, info)
                self.checkpoint_due = False
                if over:  # the partial epoch closes: its rows, the test evaluation, a checkpoint
                    self.budget_reached = True
                    self._end_epoch(hooks)
                    return "completed", (f"time budget of {budget:g} s (--max-seconds) reached at step {step}: "
                                         f"stopped with a final evaluation and checkpoint")
                if stop or (interrupt.requested and not dist.enabled):
                    if self.batch_in_epoch == n_batches:
                        self._end_epoch(hooks)
                    return "interrupted", self._stop_message()
            self._end_epoch(hooks)
        return "completed", ""

    def _end_epoch(self, hooks) -> None:
        """Close the epoch: the position moves to the next one, then the epoch-end callbacks run
        (the checkpoint last), so a checkpoint written there resumes at the next epoch; once it is
        on disk, the epoch is reported (its rows, the progress line)."""
        self._count_correct()
        loss_sum, correct, count = self.epoch_sums
        info = EpochInfo(self.epoch, self.step, loss_sum / max(count, 1), correct / max(count, 1))
        self.epoch += 1
        self.batch_in_epoch = 0
        self.epoch_sums = [0.0, 0.0, 0.0]
        for cb in hooks["on_epoch_end"]:
            cb.on_epoch_end(self, info)
        if hooks["on_epoch_report"]:
            self.run.wait_checkpoints()
            for cb in hooks["on_epoch_report"]:
                cb.on_epoch_report(self, info)


def train(cfg: dict, run, progress: Optional[Callable] = None, resume: Optional[dict] = None,
          callbacks: Sequence[Callback] = ()) -> TrainResult:
    """Train ``cfg`` into the run folder ``run`` (a :class:`gradlab.runs.folder.RunDir`).

    The CLI builds the :class:`Trainer` first and creates the run folder only once data, model
    and optimizer exist, so a configuration mistake leaves no folder behind.
    """
    return Trainer(cfg, resume, callbacks).fit(run, progress)


# train_defaults / validate_train_config / evaluate are importable from here as before.
__all__ = ["train", "Trainer", "TrainResult", "train_defaults", "validate_train_config", "evaluate", "GradlabError"]
