"""Callbacks that record a run: per-step scalars, gradient histograms, optimizer events, the
epoch-end evaluation, the NaN stop and a progress function."""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from gradlab.core.modelstate import model_state
from gradlab.training.callbacks.base import Callback, EpochInfo, StepInfo, StopTraining, every


@torch.no_grad()
def evaluate(model, x, y, batch_size: int = 1024, loss_fn=F.cross_entropy) -> tuple[float, float]:
    """Mean loss (``loss_fn``, default cross-entropy) and accuracy over ``(x, y)`` in eval mode
    (mode restored after)."""
    loss_sum, correct = 0.0, 0
    with model_state(model, train=False):
        for i in range(0, len(x), batch_size):
            out = model(x[i : i + batch_size])
            loss_sum += loss_fn(out, y[i : i + batch_size], reduction="sum").item()
            correct += (out.argmax(1) == y[i : i + batch_size]).sum().item()
    n = max(len(x), 1)
    return loss_sum / n, correct / n


class DivergenceStop(Callback):
    """Stop with status ``diverged`` at the step where training blows up, before that step's
    update reaches the weights:

    * the batch loss is NaN or inf, or above a bound: ``max_loss`` when given, else ``factor``
      (1e3) times the mean batch loss of the first epoch (while the first epoch runs: of its steps
      so far; the first step has no bound), or times the chance-level loss if that is larger: the
      loss of a uniform guess over C classes (cross-entropy ln C, MSE 1 - 1/C:
      :func:`gradlab.core.losses.chance_loss`), so that a run starting near zero loss (a
      pretrained model) is not stopped by a small rise. Checked before any backward or update, so the loss
      of a run whose weights ran off (``--lr 1e6``) is caught while still finite, not a few steps
      later as NaN, and the run never ends ``completed`` at chance accuracy.
    * the gradient norm is NaN or inf (after backward, before the update; optimizers that take
      their own gradients have applied theirs by then, so such a run keeps its last checkpoint).

    Under torchrun every rank checks the mean loss of the global batch (one all-reduce), so all
    stop at the same step.
    """

    key = "divergence"

    def __init__(self, max_loss: Optional[float] = None, factor: float = 1e3, loss: Optional[str] = None):
        self.max_loss, self.factor, self.loss = max_loss, factor, loss
        self.ref_sum, self.ref_count = 0.0, 0  # the first epoch's batch losses so far

    def bound(self, num_classes: int = 2) -> float:
        if self.max_loss is not None:
            return self.max_loss
        if not self.ref_count:
            return math.inf
        from gradlab.core.losses import chance_loss

        return self.factor * max(self.ref_sum / self.ref_count, chance_loss(self.loss, num_classes))

    def on_loss(self, trainer, value: float) -> None:
        if trainer.dist.enabled:  # every rank must stop at the same step
            from gradlab.core.distributed import all_reduce_sum

            finite = math.isfinite(value)
            bad, total = all_reduce_sum([0.0 if finite else 1.0, value if finite else 0.0], trainer.dist,
                                        trainer.device)
            value = total / trainer.dist.world_size if bad == 0 else math.nan  # shares sum to W x the mean
        if not math.isfinite(value):
            self._stop(trainer, "loss became NaN/inf")
        bound = self.bound(trainer.data.spec.num_classes)
        if value > bound:
            why = "--max-loss" if self.max_loss is not None else f"{self.factor:g} x the first epoch's mean loss"
            self._stop(trainer, f"loss {value:.4g} exceeded {bound:.4g} ({why})")
        if trainer.epoch == 0:
            self.ref_sum += value
            self.ref_count += 1

    def on_gradients(self, trainer, grad_norm: float) -> None:
        if not math.isfinite(grad_norm):
            raise StopTraining("diverged", self._message(trainer, "gradient norm became NaN/inf"),
                               exact=not trainer.closure_step)

    def _stop(self, trainer, what: str) -> None:
        raise StopTraining("diverged", self._message(trainer, what))

    @staticmethod
    def _message(trainer, what: str) -> str:
        lr = trainer.optimizer.param_groups[0]["lr"]
        return (f"{what} at step {trainer.step + 1} (epoch {trainer.epoch}) with lr {lr:g}: the run "
                f"diverged; try a smaller --lr")

    def state_dict(self) -> dict:
        return {"ref_sum": self.ref_sum, "ref_count": self.ref_count}

    def load_state_dict(self, state: dict) -> None:
        self.ref_sum, self.ref_count = float(state.get("ref_sum", 0.0)), int(state.get("ref_count", 0))


class StepMetrics(Callback):
    """``train-step`` rows (loss, lr, grad_norm) in metrics.csv and TensorBoard every
    ``every_steps`` steps (1: every step). The gradient norm is computed on logged steps only."""

    def __init__(self, every_steps: int = 10):
        self.every_steps = every_steps

    def on_step_end(self, trainer, info: StepInfo) -> None:
        if every(self.every_steps, info.step) and trainer.is_main:
            trainer.run.log_metrics(info.step, info.epoch, "train-step",
                                    {"loss": info.loss, "lr": float(info.lr), "grad_norm": info.grad_norm()})


class GradHistograms(Callback):
    """Every ``every_steps`` steps: a TensorBoard histogram of each layer's gradient
    (``grads/<name>``) and one of the per-layer gradient norms (``grad_norm/per_layer``)."""

    def __init__(self, every_steps: int = 50):
        self.every_steps = every_steps

    def on_step_end(self, trainer, info: StepInfo) -> None:
        if not (every(self.every_steps, info.step) and trainer.is_main):
            return
        tensors = {f"grads/{name}": p.grad for name, p in trainer.model.named_parameters() if p.grad is not None}
        layer_norms = info.grad_norms()[1]
        if layer_norms:  # of the same tensors, in the same order
            tensors["grad_norm/per_layer"] = torch.tensor(layer_norms)
        trainer.run.log_histograms(tensors, info.step)


# Events whose values also go into the run's final metrics: event -> {event key: summary key}.
_EVENT_SUMMARY = {"switch-to-sgd": {"step": "switch_step", "sgd_lr": "switch_sgd_lr"}}


class OptimizerEvents(Callback):
    """An optimizer's ``events`` (e.g. SWATS' switch to SGD, Keskar & Socher 2017) as TensorBoard
    text and ``optimizer`` rows in metrics.csv, once each."""

    key = "events"

    def __init__(self):
        self.events: list = []

    def on_step_end(self, trainer, info: StepInfo) -> None:
        events = getattr(trainer.optimizer, "events", ())
        if len(events) <= len(self.events):
            return
        run = trainer.run
        for ev in events[len(self.events):]:
            self.events.append(dict(ev))
            run.log_text("optimizer/events", str(ev))
            for k, v in ev.items():
                if isinstance(v, (int, float)) and k != "step":
                    run.log_metrics(info.step, info.epoch, "optimizer", {f"{ev.get('event', 'event')}_{k}": v})

    def summarize(self, trainer, metrics: dict) -> dict:
        for ev in self.events:
            for k, name in _EVENT_SUMMARY.get(ev.get("event"), {}).items():
                metrics[name] = ev.get(k)
        return metrics

    def state_dict(self) -> dict:
        return {"events": [dict(e) for e in self.events]}

    def load_state_dict(self, state: dict) -> None:
        self.events = [dict(e) for e in state.get("events", [])]


_NO_EPOCH = {"train_loss": float("nan"), "train_acc": float("nan"), "test_loss": float("nan"),
             "test_acc": float("nan")}


class EpochEvaluation(Callback):
    """At each epoch's end: ``train`` rows (loss, acc over the epoch's batches) and ``test`` rows
    (the whole test split, eval mode); the last epoch's four values lead the final metrics, with
    ``steps_to_95``, the first step whose test accuracy reached ``target_acc``.

    The test split is evaluated in ``on_epoch_end`` (so the epoch's checkpoint holds the result)
    and the rows are written in ``on_epoch_report``, once that checkpoint is on disk. A checkpoint
    carries the rows it has not seen written (``pending``): a run killed between the checkpoint
    and its rows writes them when it resumes, unless metrics.csv already has them."""

    key = "evaluation"

    def __init__(self, target_acc: float = 0.95):
        self.target_acc = target_acc
        self.last: dict = {}
        self.steps_to_target = None
        self.pending: Optional[dict] = None  # {"step", "epoch", "train": {...}, "test": {...}}

    def on_fit_start(self, trainer) -> None:
        if self.pending is not None and trainer.is_main:
            from gradlab.runs.logging import splits_logged_at

            if "test" not in splits_logged_at(trainer.run.path / "metrics.csv", self.pending["step"]):
                self._write(trainer)
        self.pending = None

    def on_epoch_end(self, trainer, info: EpochInfo) -> None:
        if trainer.x_test is None:  # a streamed dataset (gradlab.training.streaming)
            from gradlab.training.streaming import evaluate_stream

            test_loss, test_acc = evaluate_stream(trainer.model, trainer.data, "test", trainer.device,
                                                  loss_fn=trainer.loss_fn)
        else:
            test_loss, test_acc = evaluate(trainer.model, trainer.x_test, trainer.y_test, loss_fn=trainer.loss_fn)
        if test_acc >= self.target_acc and self.steps_to_target is None:
            self.steps_to_target = info.step
        self.last = {"train_loss": info.train_loss, "train_acc": info.train_acc,
                     "test_loss": test_loss, "test_acc": test_acc}
        info.metrics.update(test_loss=test_loss, test_acc=test_acc)
        self.pending = {"step": info.step, "epoch": info.epoch, "train": {"loss": info.train_loss, "acc": info.train_acc},
                        "test": {"loss": test_loss, "acc": test_acc}}

    def on_epoch_report(self, trainer, info: EpochInfo) -> None:
        if self.pending is not None:
            self._write(trainer)
            self.pending = None

    def _write(self, trainer) -> None:
        p = self.pending
        trainer.run.log_metrics(p["step"], p["epoch"], "train", p["train"])
        trainer.run.log_metrics(p["step"], p["epoch"], "test", p["test"])

    def summarize(self, trainer, metrics: dict) -> dict:
        out = {**(self.last or _NO_EPOCH), **metrics}
        if self.steps_to_target is not None:
            out[f"steps_to_{round(self.target_acc * 100)}"] = self.steps_to_target
        return out

    def state_dict(self) -> dict:
        state = {"last": dict(self.last)}
        if self.steps_to_target is not None:
            state["steps_to_target"] = self.steps_to_target
        if self.pending is not None:
            state["pending"] = {k: dict(v) if isinstance(v, dict) else v for k, v in self.pending.items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        self.last = dict(state.get("last", {}))
        self.steps_to_target = state.get("steps_to_target")
        self.pending = state.get("pending")


class Progress(Callback):
    """Calls ``fn(step, total, epoch, loss, acc)`` after every step (this rank's accuracy on the
    step's batch: a progress bar shows rank 0's), and ``epoch_fn(epoch, epochs, metrics)`` when
    an epoch is reported (``metrics``: train_loss, train_acc, test_loss, test_acc)."""

    def __init__(self, fn: Optional[Callable] = None, epoch_fn: Optional[Callable] = None):
        self.fn, self.epoch_fn = fn, epoch_fn

    def on_step_end(self, trainer, info: StepInfo) -> None:
        if self.fn is not None:
            acc = float((info.out.argmax(1) == info.y).sum()) / max(len(info.y), 1)
            self.fn(info.step, trainer.total_steps, info.epoch, info.loss, acc)

    def on_epoch_report(self, trainer, info: EpochInfo) -> None:
        if self.epoch_fn is not None:
            self.epoch_fn(info.epoch, trainer.cfg["epochs"], dict(info.metrics))


__all__ = ["evaluate", "DivergenceStop", "StepMetrics", "GradHistograms", "OptimizerEvents", "EpochEvaluation",
           "Progress"]
