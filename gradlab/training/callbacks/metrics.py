"""Callbacks that record a run: per-step scalars, gradient histograms, optimizer events, the
epoch-end evaluation, the NaN stop and a progress function."""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from gradlab.core.modelstate import model_state
from gradlab.training.callbacks.base import Callback, EpochInfo, StepInfo, StopTraining, every


@torch.no_grad()
def evaluate(model, x, y, batch_size: int = 1024) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over ``(x, y)`` in eval mode (mode restored after)."""
    loss_sum, correct = 0.0, 0
    with model_state(model, train=False):
        for i in range(0, len(x), batch_size):
            out = model(x[i : i + batch_size])
            loss_sum += F.cross_entropy(out, y[i : i + batch_size], reduction="sum").item()
            correct += (out.argmax(1) == y[i : i + batch_size]).sum().item()
    n = max(len(x), 1)
    return loss_sum / n, correct / n


class DivergenceStop(Callback):
    """Stop with status ``diverged`` when the batch loss is NaN or inf on any rank, checked before
    any backward or update, so a NaN never reaches the weights (nor a metric row)."""

    def on_loss(self, trainer, value: float) -> None:
        bad = 0.0 if math.isfinite(value) else 1.0
        if trainer.dist.enabled:  # every rank must stop at the same step
            from gradlab.core.distributed import all_reduce_sum

            bad = all_reduce_sum([bad], trainer.dist, trainer.device)[0]
        if bad > 0:
            lr = trainer.optimizer.param_groups[0]["lr"]
            raise StopTraining("diverged", f"loss became NaN/inf at step {trainer.step + 1} (epoch "
                                           f"{trainer.epoch}) with lr {lr:g}: the run diverged; try a smaller --lr")


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
    ``steps_to_95``, the first step whose test accuracy reached ``target_acc``."""

    key = "evaluation"

    def __init__(self, target_acc: float = 0.95):
        self.target_acc = target_acc
        self.last: dict = {}
        self.steps_to_target = None

    def on_epoch_end(self, trainer, info: EpochInfo) -> None:
        test_loss, test_acc = evaluate(trainer.model, trainer.x_test, trainer.y_test)
        trainer.run.log_metrics(info.step, info.epoch, "train", {"loss": info.train_loss, "acc": info.train_acc})
        trainer.run.log_metrics(info.step, info.epoch, "test", {"loss": test_loss, "acc": test_acc})
        if test_acc >= self.target_acc and self.steps_to_target is None:
            self.steps_to_target = info.step
        self.last = {"train_loss": info.train_loss, "train_acc": info.train_acc,
                     "test_loss": test_loss, "test_acc": test_acc}

    def summarize(self, trainer, metrics: dict) -> dict:
        out = {**(self.last or _NO_EPOCH), **metrics}
        if self.steps_to_target is not None:
            out[f"steps_to_{round(self.target_acc * 100)}"] = self.steps_to_target
        return out

    def state_dict(self) -> dict:
        state = {"last": dict(self.last)}
        if self.steps_to_target is not None:
            state["steps_to_target"] = self.steps_to_target
        return state

    def load_state_dict(self, state: dict) -> None:
        self.last = dict(state.get("last", {}))
        self.steps_to_target = state.get("steps_to_target")


class Progress(Callback):
    """Calls ``fn(step, total, epoch, loss, acc)`` after every step: this rank's accuracy on
    the step's batch (a progress bar shows rank 0's)."""

    def __init__(self, fn: Callable):
        self.fn = fn

    def on_step_end(self, trainer, info: StepInfo) -> None:
        acc = float((info.out.argmax(1) == info.y).sum()) / max(len(info.y), 1)
        self.fn(info.step, trainer.total_steps, info.epoch, info.loss, acc)


__all__ = ["evaluate", "DivergenceStop", "StepMetrics", "GradHistograms", "OptimizerEvents", "EpochEvaluation",
           "Progress"]
