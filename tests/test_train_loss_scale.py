"""Issue 18: `gradlab train --precision fp16` with a second-order optimizer hands it a loss scaler
(gradlab.training.precision), checkpoints the scale and restores it on resume, and skips a step
that overflows float16 even at scale 1 (the weights restored, not a divergence); bf16 is never
scaled. The scaler itself (gradlab.core.loss_scale.LossScaler): lists of inputs, products retried
at half the scale, its state."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clihelp import cli, fp16_autocast_on_cpu
from gradlab.core.loss_scale import GradientOverflow, LossScaler

fp16_only = pytest.mark.skipif(not fp16_autocast_on_cpu(), reason="this torch has no fp16 autocast on CPU")


def _cfg(tmp_path, **over):
    from gradlab.training.options import train_defaults, validate_train_config

    base = {**train_defaults(), "runs_dir": str(tmp_path), "name": None, "seed": 0, "device": "cpu",
            "max_train": 128, "epochs": 1, "batch_size": 64}
    return validate_train_config({**base, **over})


def _batch(trainer):
    return trainer.x_train[:64], trainer.y_train[:64]


# -- the scaler ---------------------------------------------------------------------------------
def test_the_scaler_takes_gradients_of_lists_and_fills_unused_inputs():
    a, b, unused = (torch.randn(3, requires_grad=True) for _ in range(3))
    loss = (a * b).sum() * 1e-3
    s = LossScaler(init_scale=2.0**10)
    ga, gb, gu = s.grad(loss, [a, b, unused], allow_unused=True)
    assert torch.allclose(ga, b.detach() * 1e-3) and torch.allclose(gb, a.detach() * 1e-3)
    assert torch.equal(gu, torch.zeros(3)) and not s.overflowed


def test_a_product_backs_off_until_it_fits_and_lowers_the_scale():
    """``product(fn, s)``: fn(c) scaled by s * c; values past float16's range are retried at c / 2."""
    s = LossScaler(init_scale=2.0**16)
    true = torch.tensor([3.0, -5.0])

    def fn(c):  # as a float16 product of 2**16 * c * true would: inf beyond 65504
        v = (true * 2.0**16 * c).half()
        return [v.float()]

    (out,) = s.product(fn, 2.0**16)
    assert torch.equal(out, true) and s.backoffs == 3 and s.scale == 2.0**13  # 5 * 2**13 < 65504
    assert not s.overflowed


def test_an_overflow_at_scale_one_is_reported_and_raises_for_an_optimizer():
    from gradlab.optim import loss_scaling

    w = torch.ones(2, requires_grad=True)
    s = LossScaler(init_scale=4.0)
    loss = (w * torch.tensor([math.inf, 1.0])).sum()
    with pytest.raises(GradientOverflow):
        loss_scaling.gradients(s, loss, [w])
    assert s.scale == 1.0 and s.overflowed and s.backoffs == 2


def test_the_scale_state_round_trips():
    s = LossScaler(init_scale=2.0**8, growth_interval=3)
    w = torch.ones(2, requires_grad=True)
    for _ in range(4):
        s.grad((w * w).sum(), w)
    t = LossScaler()
    t.load_state_dict(s.state_dict())
    assert (t.scale, t._good, t.growth_interval) == (2.0**9, 1, 3)


# -- the training loop --------------------------------------------------------------------------
@fp16_only
@pytest.mark.parametrize("opt", ["adahessian", "newton", "natural-gd", "kfac", "sam", "lbfgs", "sr1", "curvature-gd"])
def test_fp16_hands_the_optimizer_a_scaler_and_bf16_does_not(tmp_path, opt):
    from gradlab.training.loop import Trainer

    for precision in ("fp16", "bf16", "fp32"):
        trainer = Trainer(_cfg(tmp_path, precision=precision, opt=opt))
        scaler = getattr(trainer.optimizer, "loss_scaler", None)
        assert (scaler is not None) == (precision == "fp16"), precision
        assert scaler is trainer.precision.loss_scaler and trainer.precision.scaler is None
        assert ("loss_scaler" in trainer.state()) == (precision == "fp16")


@fp16_only
@pytest.mark.parametrize("opt", ["adahessian", "sr1"])
def test_an_overflow_at_scale_one_skips_the_step(tmp_path, opt):
    from gradlab.training.loop import Trainer

    trainer = Trainer(_cfg(tmp_path, precision="fp16", opt=opt, max_loss=1e15))
    trainer._grad_checks = [c for c in trainer.callbacks if type(c).__name__ == "DivergenceStop"]
    plain = trainer.loss_fn
    trainer.loss_fn = lambda out, y, **kw: 1e8 * plain(out, y, **kw)  # d loss / d logits past 65504
    trainer.precision.loss_scaler.scale = 1.0
    before = [p.detach().clone() for p in trainer.model.parameters()]
    xb, yb = _batch(trainer)
    trainer.train_step(xb, yb, len(yb))  # no StopTraining: an overflow is not a divergence
    assert all(torch.equal(a, p) for a, p in zip(before, trainer.model.parameters()))
    assert trainer.precision.skipped == 1 and not math.isfinite(trainer._step_norms[0])
    assert trainer.state()["loss_scaler"]["skipped"] == 1
    trainer.loss_fn = plain
    trainer.train_step(xb, yb, len(yb))  # the next step is clean and moves the weights
    assert trainer.precision.skipped == 1
    assert any(not torch.equal(a, p) for a, p in zip(before, trainer.model.parameters()))


@fp16_only
def test_a_skipped_step_restores_weights_a_line_search_moved(tmp_path):
    from gradlab.training.loop import Trainer

    trainer = Trainer(_cfg(tmp_path, precision="fp16", opt="lbfgs"))
    real = trainer.optimizer.step

    def step(closure):  # a trial point, then the overflow
        with torch.no_grad():
            for p in trainer.params:
                p.add_(1.0)
        closure()
        raise GradientOverflow("overflow at a trial point")

    trainer.optimizer.step = step
    before = [p.detach().clone() for p in trainer.model.parameters()]
    xb, yb = _batch(trainer)
    trainer.train_step(xb, yb, len(yb))
    assert all(torch.equal(a, p) for a, p in zip(before, trainer.model.parameters()))
    assert trainer.precision.skipped == 1
    trainer.optimizer.step = real


@fp16_only
@pytest.mark.parametrize("opt", ["adahessian", "newton", "natural-gd", "sam"])
def test_fp16_training_from_the_cli_with_a_second_order_optimizer(tmp_path, capsys, opt):
    from gradlab.runs.checkpoints import load_checkpoint

    r = cli(capsys, "train", "--opt", opt, "--precision", "fp16", "--epochs", "1", "--batch-size", "32",
            "--set", "max_train=96", "--keep-checkpoints", "1", "--runs-dir", tmp_path, "--quiet")
    assert r.code == 0, r.err
    metrics = pd.read_csv(r.run_path / "metrics.csv")
    losses = metrics[metrics.metric == "loss"].value
    assert len(losses) and all(math.isfinite(v) for v in losses)
    ckpt = load_checkpoint(r.run_path / "checkpoints" / "last.pt")
    init = load_checkpoint(r.run_path / "checkpoints" / "init.pt")["model"]
    assert any(not torch.equal(init[k], ckpt["model"][k]) for k in init)  # the steps moved the weights
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    state = ckpt["loss_scaler"]
    assert 1.0 <= state["scale"] <= 2.0**24 and state["skipped"] == 0
    # resume: the scale comes back (a value the run never had, so it cannot come from the defaults)
    ckpt["loss_scaler"] = {**state, "scale": 2.0**5, "good": 7, "skipped": 2}
    torch.save(ckpt, r.run_path / "checkpoints" / "last.pt")
    from gradlab.training.load import open_resume, resume_trainer

    again = resume_trainer(open_resume(str(r.run_path)))  # what `gradlab train --resume` builds
    assert again.optimizer.loss_scaler is again.precision.loss_scaler
    assert (again.precision.loss_scaler.scale, again.precision.loss_scaler._good, again.precision.skipped) == (32.0, 7, 2)
    xb, yb = _batch(again)
    value, _ = again.train_step(xb, yb, len(yb))
    assert math.isfinite(value)


@fp16_only
def test_bf16_second_order_training_is_unscaled(tmp_path):
    """bf16 has float32's range: no scaler, the optimizer's plain gradients."""
    from gradlab.training.loop import Trainer

    trainer = Trainer(_cfg(tmp_path, precision="bf16", opt="adahessian"))
    assert trainer.optimizer.loss_scaler is None and not trainer.precision.scaling
    xb, yb = _batch(trainer)
    captured = {}
    real = torch.autograd.grad

    def spy(outputs, *args, **kw):  # the loss reaches autograd as it is, times no scale
        captured.setdefault("loss", outputs)
        return real(outputs, *args, **kw)

    torch.autograd.grad = spy
    try:
        trainer.train_step(xb, yb, len(yb))
    finally:
        torch.autograd.grad = real
    assert captured["loss"].grad_fn is not None and "Mul" not in type(captured["loss"].grad_fn).__name__
    assert "loss_scaler" not in trainer.state()


def test_a_plain_optimizer_without_a_scaler_in_a_notebook():
    from gradlab.optim.newton import Newton

    torch.manual_seed(0)
    net = nn.Linear(3, 2)
    opt = Newton(net.parameters())
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    losses = [float(opt.step(lambda: F.cross_entropy(net(x), y))) for _ in range(3)]
    assert opt.loss_scaler is None and losses[-1] < losses[0]
