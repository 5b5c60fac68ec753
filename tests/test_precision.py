"""Issue 18: `gradlab train --precision fp32|bf16|fp16` (autocast; a gradient scaler for fp16)."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from clihelp import cli


def _cfg(tmp_path, **over):
    from gradlab.training.options import train_defaults, validate_train_config

    base = {**train_defaults(), "runs_dir": str(tmp_path), "name": None, "seed": 0, "device": "cpu",
            "max_train": 256, "epochs": 1, "batch_size": 64}
    return validate_train_config({**base, **over})


def _steps(trainer, n=4):
    losses = []
    for i, (xb, yb) in zip(range(n), _batches(trainer)):
        value, _ = trainer.train_step(xb, yb, len(yb))
        losses.append(value)
    return losses


def _batches(trainer):
    x, y = trainer.x_train, trainer.y_train
    for i in range(0, len(x), 64):
        yield x[i:i + 64], y[i:i + 64]


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)])
def test_the_forward_pass_runs_in_the_precision_asked(tmp_path, precision, dtype):
    from gradlab.training.loop import Trainer

    trainer = Trainer(_cfg(tmp_path, precision=precision, opt="adam"))
    seen = []
    linear = next(m for m in trainer.model.modules() if isinstance(m, torch.nn.Linear))
    linear.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    losses = _steps(trainer, 2)
    assert seen and set(seen) == {dtype}
    assert all(math.isfinite(v) for v in losses)
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # master weights stay fp32
    assert (trainer.precision.scaler is not None) == (precision == "fp16")


SECOND_ORDER = ["adahessian", "curvature-gd", "newton", "saddle-free-newton", "sr1", "lbfgs", "natural-gd", "kfac",
                "sam"]


@pytest.mark.parametrize("opt", SECOND_ORDER)
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_second_order_optimizers_stay_finite_in_low_precision(tmp_path, opt, precision):
    from gradlab.training.loop import Trainer

    trainer = Trainer(_cfg(tmp_path, precision=precision, opt=opt, max_train=128))
    losses = _steps(trainer, 3)
    assert all(math.isfinite(v) for v in losses), losses
    assert all(torch.isfinite(p).all() and p.dtype == torch.float32 for p in trainer.model.parameters())
    # the curvature state (second moments, Hessian diagonals, quasi-Newton pairs, K-FAC factors)
    # is kept in float32, never in the autocast dtype
    tensors = [v for state in trainer.optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    for blk in getattr(trainer.optimizer, "blocks", []):
        tensors += [t for t in (blk._A, blk.G) if t is not None]
    for v in tensors:
        if v.is_floating_point():
            assert v.dtype == torch.float32 and torch.isfinite(v).all()
    if opt == "kfac":
        assert trainer.optimizer.blocks and trainer.optimizer.factor_updates >= 1


def test_an_fp16_overflow_skips_the_step_and_lowers_the_scale(tmp_path):
    from gradlab.training.loop import Trainer

    trainer = Trainer(_cfg(tmp_path, precision="fp16", opt="sgd", max_loss=10.0))
    trainer._grad_checks = [c for c in trainer.callbacks if type(c).__name__ == "DivergenceStop"]
    trainer.precision.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 120)  # fp16 gradients overflow
    before = [p.detach().clone() for p in trainer.model.parameters()]
    xb, yb = next(_batches(trainer))
    trainer.train_step(xb, yb, len(yb))  # no StopTraining: an overflow is not a divergence
    assert all(torch.equal(a, p) for a, p in zip(before, trainer.model.parameters()))
    assert trainer.precision.scaler.get_scale() < 2.0 ** 120
    trainer.train_step(xb, yb, len(yb))
    state = trainer.state()
    assert state["scaler"]["scale"] == trainer.precision.scaler.get_scale()
    again = Trainer(_cfg(tmp_path, precision="fp16", opt="sgd"), resume=state)
    assert again.precision.scaler.get_scale() == state["scaler"]["scale"]


def test_bf16_training_from_the_cli_learns(tmp_path, capsys):
    r = cli(capsys, "train", "--precision", "bf16", "--epochs", "3", "--set", "max_train=400", "--runs-dir", tmp_path,
            "--quiet")
    assert r.code == 0, r.err
    s = pd.read_csv(r.run_path / "summary.csv").iloc[0]
    assert s.status == "completed" and s.test_acc > 0.5
    r = cli(capsys, "train", "--precision", "fp8", "--runs-dir", tmp_path / "x")
    assert r.code == 2 and "invalid precision: 'fp8'" in r.err and not (tmp_path / "x").exists()
