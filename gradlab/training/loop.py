"""Training: the loop behind ``gradlab train``.

One code path for one process and for ``torchrun`` (DistributedDataParallel over global batches,
see :class:`gradlab.core.distributed.GlobalBatchSampler`). Checkpoints carry the position inside the
epoch and every RNG state, so ``--resume`` continues exactly where the checkpoint was written and
a resumed run ends with the same metrics as an uninterrupted one.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from gradlab.core.errors import GradlabError, check

BASE_DEFAULTS = {
    "model": "mlp",
    "dataset": "digits",
    "data_dir": None,
    "opt": "adam",
    "epochs": 15,
    "batch_size": 64,
    "log_every": 50,
    "hessian_every": 0,
    "probe_every": 0,
    "adv": None,
    "adv_eps": 0.1,
    "adv_ratio": 0.5,
    "keep_checkpoints": 0,
}


def train_defaults() -> dict:
    """Every key ``gradlab train`` accepts, with its default (model, data and optimizer options too)."""
    from gradlab.data import DATASET_OPTIONS
    from gradlab.models import ZOO_OPTIONS
    from gradlab.optim import OPTIM_DEFAULTS

    return {**BASE_DEFAULTS, **ZOO_OPTIONS.defaults(), **DATASET_OPTIONS.defaults(), **OPTIM_DEFAULTS}


def subset(cfg: dict, keys) -> dict:
    return {k: cfg[k] for k in keys if k in cfg}


def validate_train_config(cfg: dict) -> dict:
    """Check what can be checked before a run folder exists (names, ranges); fill in the
    optimizer's own learning rate so config.yaml records the value actually used."""
    from gradlab.data import DATASETS
    from gradlab.optim import OPTIMIZERS, default_lr

    check(cfg["epochs"] >= 1, f"invalid epochs: {cfg['epochs']} (must be >= 1)")
    check(cfg["batch_size"] >= 1, f"invalid batch size: {cfg['batch_size']} (must be >= 1)")
    check(cfg["log_every"] >= 1, f"invalid log-every: {cfg['log_every']} (must be >= 1)")
    for k in ("hessian_every", "probe_every", "keep_checkpoints"):
        check(cfg[k] >= 0, f"invalid {k.replace('_', '-')}: {cfg[k]} (must be >= 0)")
    if cfg.get("lr") is not None:
        check(cfg["lr"] > 0, f"invalid lr: {cfg['lr']} (must be > 0)")
    DATASETS.entry(cfg["dataset"])
    OPTIMIZERS.entry(cfg["opt"])
    if cfg["adv"] is not None:
        from gradlab.attacks import ATTACKS

        check(cfg["adv"] in ("fgsm", "pgd"), f"invalid --adv {cfg['adv']!r}: choose fgsm or pgd")
        ATTACKS.entry(cfg["adv"])
        check(0 < cfg["adv_eps"] <= 1, f"invalid adv-eps: {cfg['adv_eps']} (must be in (0, 1])")
        check(0 < cfg["adv_ratio"] <= 1, f"invalid adv-ratio: {cfg['adv_ratio']} (must be in (0, 1])")
    if cfg.get("lr") is None:
        cfg["lr"] = default_lr(cfg["opt"])
    return cfg


@dataclass
class TrainResult:
    status: str  # completed | diverged | interrupted
    metrics: dict
    message: str = ""
    events: list = field(default_factory=list)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@torch.no_grad()
def evaluate(model, x, y, batch_size: int = 1024) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over ``(x, y)`` in eval mode (mode restored after)."""
    was_training = model.training
    model.eval()
    loss_sum, correct = 0.0, 0
    for i in range(0, len(x), batch_size):
        out = model(x[i : i + batch_size])
        loss_sum += F.cross_entropy(out, y[i : i + batch_size], reduction="sum").item()
        correct += (out.argmax(1) == y[i : i + batch_size]).sum().item()
    model.train(was_training)
    n = max(len(x), 1)
    return loss_sum / n, correct / n


def _grad_norms(params) -> tuple[float, list]:
    """Global L2 norm of the gradients and the per-tensor norms (of the parameters that have a
    gradient, in order): one fused norm call, combined in float64 by hypot. (Reading the norms
    one by one is cheaper than stacking them first: ~36 against ~48 us right after a step.)"""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0, []
    norms = [n.item() for n in torch._foreach_norm(grads)]
    return math.hypot(*norms), norms


class Trainer:
    """Holds the state of one training run; :meth:`run` executes it."""

    def __init__(self, cfg: dict, resume: Optional[dict] = None):
        from gradlab.data import dataset_options_in, load_dataset
        from gradlab.core.device import resolve_device
        from gradlab.core.distributed import GlobalBatchSampler, init_from_env
        from gradlab.models import build_model, model_options_in
        from gradlab.optim import OPTIM_DEFAULTS, build_optimizer, build_scheduler, default_lr

        self.cfg, self.run, self.progress = cfg, None, None
        device = resolve_device(cfg["device"])
        self.dist = init_from_env(device.type)
        if self.dist.enabled and device.type == "cuda":
            device = torch.device("cuda", self.dist.local_rank)
        self.device = device
        check(
            cfg["batch_size"] >= self.dist.world_size,
            f"batch size {cfg['batch_size']} is smaller than the number of processes {self.dist.world_size}",
        )

        torch.manual_seed(cfg["seed"])
        self.data = load_dataset(cfg["dataset"], seed=cfg["seed"], data_dir=cfg.get("data_dir"),
                                 **dataset_options_in(cfg["dataset"], cfg))
        self.model = build_model(cfg["model"], self.data.spec, **model_options_in(cfg["model"], cfg)).to(device)
        self.x_train, self.y_train = self.data.x_train.to(device), self.data.y_train.to(device)
        self.x_test, self.y_test = self.data.x_test.to(device), self.data.y_test.to(device)

        self.lr = cfg["lr"] if cfg.get("lr") is not None else default_lr(cfg["opt"])
        opt_opts = {**subset(cfg, OPTIM_DEFAULTS), "lr": self.lr, "seed": cfg["seed"]}
        opt_opts.pop("schedule", None)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(cfg["opt"], self.params, **opt_opts)
        self.closure_step = bool(getattr(self.optimizer, "needs_loss_closure", False))
        self.sampler = GlobalBatchSampler(len(self.x_train), cfg["batch_size"], cfg["seed"],
                                          self.dist.rank, self.dist.world_size)
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
        self.epoch_sums = [0.0, 0.0, 0.0]  # loss sum, correct, count (this rank's share)
        self.history = {"steps_to_95": None, "lambda_max": None, "trace": None}
        self.events: list = []
        self.layer_grad_norms: list = []  # of the last step, for the histogram of per-layer norms
        self._outputs: list = []  # (logits, labels) of steps whose correct predictions are not counted yet
        self.ckpt_steps = self._checkpoint_schedule(cfg["keep_checkpoints"])
        if resume is not None:
            self._load_state(resume)

    # -- checkpoints ---------------------------------------------------------------------------
    def _checkpoint_schedule(self, n: int) -> set:
        if n <= 0:
            return set()
        return {max(1, round(self.total_steps * (i + 1) / n)) for i in range(n)}

    def state(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": _rng_state(),
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "epoch_sums": list(self.epoch_sums),
            "history": {k: v for k, v in self.history.items() if v is not None},
            "last_epoch_metrics": dict(getattr(self, "last_epoch_metrics", {})),
            "events": list(self.events),
        }

    def _load_state(self, ckpt: dict) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        _set_rng_state(ckpt["rng"])
        self.step, self.epoch, self.batch_in_epoch = ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"]
        self.epoch_sums = list(ckpt["epoch_sums"])
        self.history.update(ckpt.get("history", {}))
        self.events = list(ckpt.get("events", []))
        if ckpt.get("last_epoch_metrics"):
            self.last_epoch_metrics = dict(ckpt["last_epoch_metrics"])

    def save(self) -> None:
        self._count_correct()  # on every rank: epoch_sums in the checkpoint must be complete
        if self.dist.is_main:  # written in the background; fit() waits for it before returning
            self.run.save_checkpoint(self.state(), "last.pt", wait=False)

    # -- one step ------------------------------------------------------------------------------
    def _batch_loss(self, out, yb, n_global):
        """This rank's share of the mean loss over the global batch (sum * W / B, see sampler);
        on one process the batch is the global batch and this is the plain mean."""
        if self.dist.world_size == 1:
            return F.cross_entropy(out, yb)
        return F.cross_entropy(out, yb, reduction="sum") * (self.dist.world_size / n_global)

    def _loss_terms(self, xb, yb, n_global):
        out = self.net(xb)
        loss = self._batch_loss(out, yb, n_global)
        if self.cfg["adv"] is not None:
            from gradlab.attacks import attack_batch

            x_adv = attack_batch(self.cfg["adv"], self.model, xb, yb, self.cfg["adv_eps"])
            adv_loss = self._batch_loss(self.net(x_adv), yb, n_global)
            r = self.cfg["adv_ratio"]
            loss = (1 - r) * loss + r * adv_loss
        return loss, out

    def train_step(self, idx, n_global) -> tuple[float, float]:
        """One optimizer step on batch ``idx``: this rank's loss sum and the gradient norm."""
        xb, yb = self.x_train[idx], self.y_train[idx]
        if not self.model.training:  # evaluation and probes restore the mode; this is a guard
            self.model.train()
        optimizer = self.optimizer
        optimizer.zero_grad(set_to_none=True)
        if self.closure_step:
            captured = {}

            def closure():
                loss, out = self._loss_terms(xb, yb, n_global)
                # Checked before any backward or update, so a NaN never reaches the weights.
                captured["loss"] = self._check_finite(loss)
                captured["out"] = out.detach()
                return loss

            optimizer.step(closure)
            loss_value, out = captured["loss"], captured["out"]
        else:
            loss, out = self._loss_terms(xb, yb, n_global)
            loss_value = self._check_finite(loss)  # before any backward or update
            out = out.detach()
            loss.backward()
            optimizer.step()
        # Correct predictions are counted in bulk (_count_correct): keep this step's logits.
        self._outputs.append((out, yb))
        gnorm, self.layer_grad_norms = _grad_norms(self.params)
        return loss_value * n_global / self.dist.world_size, gnorm

    def _count_correct(self) -> None:
        """Add the correct predictions of the steps since the last call to ``epoch_sums``: one
        argmax over all their logits instead of four small ops and a read-back per step. Called
        on every rank at the same steps (epoch ends and saves), so the all-reduce matches."""
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

    def _check_finite(self, loss: torch.Tensor) -> float:
        """The loss as a float, or :class:`_Diverged` if it is NaN/inf on any rank."""
        value = loss.item()
        bad = 0.0 if math.isfinite(value) else 1.0
        if self.dist.enabled:
            from gradlab.core.distributed import all_reduce_sum

            bad = all_reduce_sum([bad], self.dist, self.device)[0]
        if bad > 0:
            raise _Diverged(self.step + 1, self.epoch, self.optimizer.param_groups[0]["lr"])
        return value

    # -- the loop ------------------------------------------------------------------------------
    def fit(self, run, progress: Optional[Callable] = None) -> TrainResult:
        """Train into the run folder ``run``; ``progress(step, total, epoch, loss, acc)`` per step."""
        from gradlab.core.distributed import shutdown

        self.run, self.progress = run, progress
        with _DeferredInterrupt() as interrupt:
            self._interrupt = interrupt
            try:
                result = self._fit()
                run.wait_checkpoints()
                return result
            finally:
                shutdown(self.dist)

    def _fit(self) -> TrainResult:
        from gradlab.core.distributed import all_reduce_sum

        cfg, run = self.cfg, self.run
        start = time.time()
        # A constant schedule never changes the learning rate: its scheduler is not stepped.
        step_scheduler = cfg.get("schedule", "constant") != "constant"
        if self.step == 0 and self.ckpt_steps and self.dist.is_main:
            run.save_checkpoint({"model": self.model.state_dict(), "step": 0}, "init.pt", wait=False)
        # The per-step path runs right after a training step, when every Python call and object
        # it touches costs several times its hot-loop time: what does not change is looked up
        # once here, and one process skips the collective.
        dist, interrupt, optimizer = self.dist, self._interrupt, self.optimizer
        is_main, log_every, on_device = dist.is_main, cfg["log_every"], self.device.type != "cpu"
        probing = bool(cfg["hessian_every"] or cfg["probe_every"])
        log_step = run.step_logger("train-step", ["loss", "lr", "grad_norm"])
        try:
            while self.epoch < cfg["epochs"]:
                batches = self.sampler.epoch_batches(self.epoch)
                n_batches = len(batches)
                for b in range(self.batch_in_epoch, n_batches):
                    idx, n_global = batches[b]
                    loss_sum, gnorm = self.train_step(idx.to(self.device) if on_device else idx, n_global)
                    if dist.enabled:
                        # One small collective per step: the loss and whether any rank was asked
                        # to stop, so that every rank stops at the same step boundary.
                        loss_g, stop = all_reduce_sum([loss_sum, float(interrupt.requested)], dist, self.device)
                    else:
                        loss_g, stop = loss_sum, interrupt.requested
                    self.step = step = self.step + 1
                    self.batch_in_epoch = b + 1
                    sums = self.epoch_sums
                    sums[0] += loss_g
                    sums[2] += n_global
                    lr = optimizer.param_groups[0]["lr"]
                    if step_scheduler:
                        self.scheduler.step()
                    log_step(step, self.epoch, loss_g / n_global, float(lr), gnorm)
                    # Histograms, curvature and gradient probes every N steps; optimizer events.
                    if step % log_every == 0 and is_main:
                        self._log_histograms(step)
                    if probing:
                        self._probes(idx)
                    events = getattr(optimizer, "events", ())
                    if len(events) > len(self.events):
                        self._log_events(events)
                    if self.progress is not None:  # this rank's accuracy on the step (rank 0 shows it)
                        out, labels = self._outputs[-1]
                        acc = float((out.argmax(1) == labels).sum()) / max(len(labels), 1)
                        self.progress(step, self.total_steps, self.epoch, loss_g / n_global, acc)
                    if step in self.ckpt_steps and is_main:
                        run.save_checkpoint({"model": self.model.state_dict(), "step": step},
                                            f"step-{step:08d}.pt", wait=False)
                    if b + 1 == n_batches:
                        self._end_epoch()  # evaluates and writes checkpoints/last.pt
                    if stop:
                        self.save()
                        return TrainResult("interrupted", self._final_metrics(start),
                                           f"interrupted at step {self.step}: checkpoint written; "
                                           "continue with --resume", self.events)
        except _Diverged as d:
            msg = (f"loss became NaN/inf at step {d.step} (epoch {d.epoch}) with lr {d.lr:g}: "
                   "the run diverged; try a smaller --lr")
            return TrainResult("diverged", self._final_metrics(start, diverged=True), msg, self.events)
        except KeyboardInterrupt:  # a second Ctrl-C: stop now, keep the last checkpoint as it is
            return TrainResult("interrupted", self._final_metrics(start),
                               "interrupted: the last epoch's checkpoint is kept", self.events)
        return TrainResult("completed", self._final_metrics(start), "", self.events)

    def _end_epoch(self) -> None:
        self._count_correct()
        loss_sum, correct, count = self.epoch_sums
        train = {"loss": loss_sum / max(count, 1), "acc": correct / max(count, 1)}
        test_loss, test_acc = evaluate(self.model, self.x_test, self.y_test)
        self.run.log_metrics(self.step, self.epoch, "train", train)
        self.run.log_metrics(self.step, self.epoch, "test", {"loss": test_loss, "acc": test_acc})
        if test_acc >= 0.95 and self.history["steps_to_95"] is None:
            self.history["steps_to_95"] = self.step
        self.last_epoch_metrics = {"train_loss": train["loss"], "train_acc": train["acc"],
                                   "test_loss": test_loss, "test_acc": test_acc}
        self.epoch += 1
        self.batch_in_epoch = 0
        self.epoch_sums = [0.0, 0.0, 0.0]
        self.save()

    def _log_histograms(self, step: int) -> None:
        """Histograms of each layer's gradient and of the per-layer gradient norms, in one pass."""
        tensors = {f"grads/{name}": p.grad for name, p in self.model.named_parameters() if p.grad is not None}
        if self.layer_grad_norms:  # of the same tensors, in the same order
            tensors["grad_norm/per_layer"] = torch.tensor(self.layer_grad_norms)
        self.run.log_histograms(tensors, step)

    def _log_events(self, events) -> None:
        """The optimizer's events since the last call: to TensorBoard text and metrics.csv."""
        run, step = self.run, self.step
        for ev in events[len(self.events):]:
            self.events.append(dict(ev))
            run.log_text("optimizer/events", str(ev))
            for k, v in ev.items():
                if isinstance(v, (int, float)) and k != "step":
                    run.log_metrics(step, self.epoch, "optimizer", {f"{ev.get('event', 'event')}_{k}": v})

    def _probes(self, idx) -> None:
        """Curvature and gradient-norm probes, when due."""
        cfg, run, step = self.cfg, self.run, self.step
        due = lambda every: bool(every) and step % every == 0 and self.dist.is_main  # noqa: E731
        if due(cfg["hessian_every"]) or due(cfg["probe_every"]):
            xb, yb = self.x_train[idx.to(self.device)], self.y_train[idx.to(self.device)]
        if due(cfg["hessian_every"]):
            from gradlab.probes.hessian import quick_curvature

            with _own_rng(self.device):  # probes must not shift the training run's random stream
                lam, tr = quick_curvature(self.model, F.cross_entropy, (xb, yb))
            self.history["lambda_max"], self.history["trace"] = float(lam), float(tr)
            run.log_metrics(step, self.epoch, "curvature", {"lambda_max": lam, "trace": tr,
                                                             "stability_bound": 2.0 / lam if lam > 0 else float("inf")})
        if due(cfg["probe_every"]):
            from gradlab.probes.gradnorm import gradnorm_probe

            with _own_rng(self.device):
                df = gradnorm_probe(self.model, F.cross_entropy, [(xb, yb)]).to_frame()
            for row in df.itertuples(index=False):
                run.log_metrics(step, self.epoch, "gradnorm",
                                {f"layer{row.layer}_grad_norm": row.grad_norm,
                                 f"layer{row.layer}_signal_norm": row.signal_norm})

    def _final_metrics(self, start: float, diverged: bool = False) -> dict:
        m = dict(getattr(self, "last_epoch_metrics", {}))
        if not m:
            m = {"train_loss": float("nan"), "train_acc": float("nan"),
                 "test_loss": float("nan"), "test_acc": float("nan")}
        m.update({"epochs": self.epoch, "steps": self.step, "seconds": round(time.time() - start, 3)})
        m.update({k: v for k, v in self.history.items() if v is not None})
        for ev in self.events:
            if ev.get("event") == "switch-to-sgd":
                m["switch_step"], m["switch_sgd_lr"] = ev.get("step"), ev.get("sgd_lr")
        return m


def _own_rng(device):
    """Run a probe on a fork of the RNG state: with or without --hessian-every/--probe-every,
    training draws the same dropout masks and noise."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


class _DeferredInterrupt:
    """Turn the first Ctrl-C into a request honoured at the next step boundary, so the checkpoint
    never holds a half-applied update; a second Ctrl-C interrupts at once."""

    def __init__(self):
        self.requested = False
        self._old = None

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        import signal

        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False


class _Diverged(Exception):
    def __init__(self, step: int, epoch: int, lr: float):
        super().__init__(f"diverged at step {step}")
        self.step, self.epoch, self.lr = step, epoch, lr


def train(cfg: dict, run, progress: Optional[Callable] = None, resume: Optional[dict] = None) -> TrainResult:
    """Train ``cfg`` into the run folder ``run`` (a :class:`gradlab.runs.folder.RunDir`).

    The CLI builds the :class:`Trainer` first and creates the run folder only once data, model
    and optimizer exist, so a configuration mistake leaves no folder behind.
    """
    return Trainer(cfg, resume).fit(run, progress)


__all__ = ["train", "train_defaults", "validate_train_config", "evaluate", "TrainResult", "GradlabError"]
