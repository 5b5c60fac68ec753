"""The training loop's callbacks: hooks and their order, schedules, checkpoints, probes, adversarial loss."""

from __future__ import annotations

import copy
import signal

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from clihelp import cli

SMALL = ["--set", "max_train=200", "--quiet"]


def _cfg(tmp_path, **over):
    from gradlab.training.options import train_defaults, validate_train_config

    base = {**train_defaults(), "runs_dir": str(tmp_path), "name": None, "seed": 0, "device": "cpu",
            "max_train": 400, "epochs": 3}
    return validate_train_config({**base, **over})


def _fit(cfg, callbacks=(), resume=None, run=None):
    """Train ``cfg`` into a new run folder (or ``run``); returns (result, run)."""
    from gradlab.runs.folder import RunDir
    from gradlab.training.loop import Trainer

    trainer = Trainer(cfg, resume=resume, callbacks=callbacks)
    run = run or RunDir.create(cfg["runs_dir"], "train", None, cfg, argv=["gradlab", "train"])
    result = trainer.fit(run)
    run.finish(result.status, result.metrics)
    return result, run


def _values(run) -> pd.DataFrame:
    return pd.read_csv(run.path / "metrics.csv")[["step", "epoch", "split", "metric", "value"]]


class Recorder:
    """A callback from a test file: records every hook it sees."""

    def __init__(self):
        from gradlab.training.callbacks import Callback

        class _Rec(Callback):
            key = "recorder"

            def on_fit_start(cb, trainer):
                self.seen.append(("fit_start", trainer.step))

            def on_step_end(cb, trainer, info):
                assert trainer.step == info.step and trainer.epoch == info.epoch
                self.seen.append(("step", info.step, info.epoch, info.batch))

            def on_epoch_end(cb, trainer, info):
                assert trainer.epoch == info.epoch + 1 and trainer.batch_in_epoch == 0  # already the next epoch's
                self.seen.append(("epoch", info.epoch, info.step))

            def on_fit_end(cb, trainer, status, exact):
                self.seen.append(("fit_end", status, exact))

            def state_dict(cb):
                return {"steps_seen": sum(1 for s in self.seen if s[0] == "step")}

            def load_state_dict(cb, state):
                self.loaded = state

        self.seen: list = []
        self.loaded = None
        self.callback = _Rec()


def test_a_callback_from_a_test_file_sees_every_step_and_epoch_in_order(tmp_path):
    rec = Recorder()
    result, run = _fit(_cfg(tmp_path), [rec.callback])
    assert result.status == "completed"
    steps_per_epoch = 7  # 400 examples, batch 64
    expect = [("fit_start", 0)]
    for e in range(3):
        expect += [("step", e * steps_per_epoch + b + 1, e, b) for b in range(steps_per_epoch)]
        expect.append(("epoch", e, (e + 1) * steps_per_epoch))
    expect.append(("fit_end", "completed", True))
    assert rec.seen == expect
    from gradlab.runs import load_checkpoint

    ckpt = load_checkpoint(run.path / "checkpoints" / "last.pt")
    assert ckpt["callbacks"]["recorder"] == {"steps_seen": 21}
    assert (ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"]) == (21, 3, 0)
    again = Recorder()
    from gradlab.training.loop import Trainer

    Trainer(_cfg(tmp_path), resume=ckpt, callbacks=[again.callback])
    assert again.loaded == {"steps_seen": 21}


def test_two_callbacks_with_one_state_key_are_refused(tmp_path):
    from gradlab.core.errors import GradlabError
    from gradlab.training.loop import Trainer

    with pytest.raises(GradlabError, match="'recorder'"):
        Trainer(_cfg(tmp_path), callbacks=[Recorder().callback, Recorder().callback])


@pytest.mark.parametrize("every", [1, 3])
def test_log_every_steps_and_grad_norm_only_on_logged_steps(tmp_path, capsys, monkeypatch, every):
    from gradlab.training.callbacks.base import StepInfo

    calls = []
    real = StepInfo.grad_norms
    monkeypatch.setattr(StepInfo, "grad_norms", lambda info: calls.append(info.step) or real(info))
    r = cli(capsys, "train", "--runs-dir", tmp_path, "--epochs", "2", "--log-every-steps", str(every),
            "--log-every", "1000", *SMALL)
    assert r.code == 0, r.err
    total = int(pd.read_csv(r.run_path / "summary.csv").loc[0, "steps"])
    m = pd.read_csv(r.run_path / "metrics.csv")
    logged = list(range(every, total + 1, every))
    for metric in ("loss", "lr", "grad_norm"):
        assert m[(m.split == "train-step") & (m.metric == metric)]["step"].tolist() == logged
    assert calls == logged  # the gradient norm is computed on logged steps only
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(r.run_path), size_guidance={"scalars": 0})
    ea.Reload()
    assert [e.step for e in ea.Scalars("train-step/grad_norm")] == logged
    r = cli(capsys, "train", "--runs-dir", tmp_path / "bad", "--log-every-steps", "0")
    assert r.code == 2 and "invalid log-every-steps: 0" in r.err and len(r.err.strip().splitlines()) == 1


class _Clock:
    """Stands in for time.monotonic in the checkpoint callback: advanced by hand."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def _spy_checkpoints(run):
    """Wrap ``run.save_checkpoint`` to record (name, step, epoch, batch_in_epoch)."""
    written = []
    real = run.save_checkpoint

    def save(obj, name="last.pt", wait=True):
        written.append((name, obj.get("step"), obj.get("epoch"), obj.get("batch_in_epoch")))
        return real(obj, name, wait=wait)

    run.save_checkpoint = save
    return written


def _run_with_spy(cfg, callbacks=()):
    from gradlab.runs.folder import RunDir
    from gradlab.training.loop import Trainer

    trainer = Trainer(cfg, callbacks=callbacks)
    run = RunDir.create(cfg["runs_dir"], "train", None, cfg, argv=["gradlab", "train"])
    written = _spy_checkpoints(run)
    result = trainer.fit(run)
    run.finish(result.status, result.metrics)
    return result, run, written


def test_checkpoint_seconds_limits_epoch_checkpoints_by_the_clock(tmp_path, monkeypatch):
    from gradlab.training.callbacks import Callback, checkpoints

    clock = _Clock()
    monkeypatch.setattr(checkpoints, "monotonic", clock)

    class TenSecondEpochs(Callback):  # runs before the checkpoint at each epoch's end
        def on_epoch_end(self, trainer, info):
            clock.now += 10.0

    # A large value: last.pt at the first epoch's end (so an early kill can resume) and when the
    # run stops (the clock still moves 10 s an epoch).
    result, _, written = _run_with_spy(_cfg(tmp_path / "a", checkpoint_seconds=1e6), [TenSecondEpochs()])
    assert result.status == "completed" and written == [("last.pt", 7, 1, 0), ("last.pt", 21, 3, 0)]
    # Every 20 s, epochs of 10 s: after epoch 1 (the first), 20 s later after epoch 3, and at the
    # end (a new position).
    result, _, written = _run_with_spy(_cfg(tmp_path / "b", checkpoint_seconds=20, epochs=4), [TenSecondEpochs()])
    assert written == [("last.pt", 7, 1, 0), ("last.pt", 21, 3, 0), ("last.pt", 28, 4, 0)]
    # 0: every epoch, as before the option existed.
    result, _, written = _run_with_spy(_cfg(tmp_path / "c", checkpoint_seconds=0), [TenSecondEpochs()])
    assert [w[1] for w in written] == [7, 14, 21]


def _ctrl_c_at(step: int):
    """A callback that sends this process SIGINT (a real Ctrl-C) after ``step``."""
    from gradlab.training.callbacks import Callback

    class CtrlC(Callback):
        key = "ctrl-c"

        def on_step_end(self, trainer, info):
            if info.step == step:
                signal.raise_signal(signal.SIGINT)

    return CtrlC()


def test_ctrl_c_with_default_cadences_checkpoints_once_and_resumes_exactly(tmp_path):
    """Defaults: rows every 10 steps, last.pt at the first epoch's end and then at most every 30 s
    (so not at the other fast epochs' ends). Ctrl-C at step 12 (mid-epoch 1) writes last.pt there;
    the resumed run ends with the same
    rows and final metrics as an uninterrupted one, dropout's random stream included."""
    from gradlab.runs import RunDir, load_checkpoint

    cfg = _cfg(tmp_path / "ref", dropout=0.2)
    ref, ref_run = _fit(cfg)
    cfg = _cfg(tmp_path / "cut", dropout=0.2)
    result, run, written = _run_with_spy(cfg, [_ctrl_c_at(12)])
    assert result.status == "interrupted" and "step 12" in result.message
    assert written == [("last.pt", 7, 1, 0), ("last.pt", 12, 1, 5)]
    ckpt = load_checkpoint(run.path / "checkpoints" / "last.pt")
    resumed, _ = _fit(cfg, resume=ckpt, run=RunDir.reopen(run.path, ckpt["step"]))
    assert resumed.status == "completed"
    pd.testing.assert_frame_equal(_values(run), _values(ref_run))
    drop = ("seconds",)
    assert {k: v for k, v in resumed.metrics.items() if k not in drop} == \
        {k: v for k, v in ref.metrics.items() if k not in drop}
    steps = _values(ref_run).query("split == 'train-step' and metric == 'loss'")["step"].tolist()
    assert steps == [10, 20]


def test_divergence_writes_the_last_finite_position(tmp_path):
    from gradlab.runs import load_checkpoint

    result, run, written = _run_with_spy(_cfg(tmp_path, opt="sgd", lr=1e8))
    assert result.status == "diverged"
    step = int(result.metrics["steps"])
    assert written[-1][:2] == ("last.pt", step)
    ckpt = load_checkpoint(run.path / "checkpoints" / "last.pt")
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())


def test_probe_spec_parsing():
    from gradlab.training.callbacks.probes import parse_probe_spec, probe_callbacks

    assert parse_probe_spec("hessian:every=100:tol=1e-4:trace_matvecs=30, gradnorm:every=50:train_mode=false") == [
        ("hessian", {"every": 100, "tol": 1e-4, "trace_matvecs": 30}),
        ("gradnorm", {"every": 50, "train_mode": False})]
    assert parse_probe_spec(None) == [] and parse_probe_spec(" ") == []
    cbs = probe_callbacks({"probe": "gradnorm:every=4", "hessian_every": 6, "probe_every": 0})
    assert [(cb.name, cb.every, cb.key) for cb in cbs] == [("gradnorm", 4, "probe/gradnorm"),
                                                           ("hessian", 6, "probe/hessian")]
    assert cbs[1].options == {}  # not given: the probe's own training defaults apply
    assert probe_callbacks({"probe": "hessian:every=2:tol=1e-4"})[0].options == {"tol": 1e-4}


@pytest.mark.parametrize("args, expect", [
    (["--probe", "nope:every=3"], "unknown probe 'nope' for training; choose from: gradnorm, hessian"),
    (["--probe", "hessian"], "give every=N, e.g. hessian:every=100"),
    (["--probe", "hessian:every=0"], "invalid every: 0 (must be an integer >= 1)"),
    (["--probe", "hessian:every=ten"], "invalid every: 'ten'"),
    (["--probe", "hessian:every=5:tl=3"], "did you mean 'tol'?"),
    (["--probe", "hessian:every=5:tol=-1"], "invalid tol: -1"),
    (["--probe", "hessian:every5"], "expected KEY=VALUE after ':'"),
    (["--probe", "hessian:every=5,hessian:every=6"], "probe 'hessian' given twice"),
    (["--probe", "hessian:every=5:every=6"], "every given twice"),
    (["--probe", ",gradnorm:every=2"], "expected NAME:every=N"),
    (["--probe", "hessian:every=5", "--hessian-every", "3"], "--probe already runs 'hessian'"),
    (["--hessian-every", "-1"], "invalid hessian-every: -1"),
])
def test_bad_probe_spec_gives_one_line_exit_2_and_no_run_folder(tmp_path, capsys, args, expect):
    runs = tmp_path / "runs"
    r = cli(capsys, "train", "--runs-dir", runs, *args)
    lines = r.err.strip().splitlines()
    assert r.code == 2 and len(lines) == 1 and lines[0].startswith("gradlab: error: "), r.err
    assert expect in lines[0], lines[0]
    assert not runs.exists() or not any(runs.iterdir())


def test_probe_aliases_are_the_probe_spec(tmp_path, capsys):
    base = ["train", "--epochs", "1", "--set", "dropout=0.2", *SMALL]
    r0 = cli(capsys, *base, "--runs-dir", tmp_path / "a", "--hessian-every", "2", "--probe-every", "3")
    r1 = cli(capsys, *base, "--runs-dir", tmp_path / "b", "--probe", "hessian:every=2,gradnorm:every=3")
    assert r0.code == 0 and r1.code == 0, r1.err
    m0, m1 = (pd.read_csv(r.run_path / "metrics.csv").drop(columns="wall_time") for r in (r0, r1))
    key = ["step", "split", "metric"]
    pd.testing.assert_frame_equal(m0.sort_values(key).reset_index(drop=True), m1.sort_values(key).reset_index(drop=True))
    assert set(m0[m0.split == "curvature"].step) == {2, 4} and set(m0[m0.split == "gradnorm"].step) == {3}
    s = pd.read_csv(r1.run_path / "summary.csv")
    assert s.loc[0, "lambda_max"] == pytest.approx(m1[(m1.split == "curvature") & (m1.metric == "lambda_max")].value.iloc[-1])


@pytest.mark.parametrize("attack", ["fgsm", "pgd"])
def test_adversarial_transform_is_the_mixed_loss(tmp_path, attack):
    """(1 - r) L(x) + r L(attack(x)), exactly, in float64: what the loop optimised before callbacks."""
    from gradlab.attacks import attack_batch
    from gradlab.training.callbacks import AdversarialLoss
    from gradlab.training.loop import Trainer

    trainer = Trainer(_cfg(tmp_path, adv=attack, adv_eps=0.05, adv_ratio=0.3, dropout=0.2))
    trainer.model.double().train()
    x, y = trainer.x_train[:32].double(), trainer.y_train[:32]
    transform = next(cb for cb in trainer.callbacks if isinstance(cb, AdversarialLoss))
    assert (transform.attack, transform.eps, transform.ratio) == (attack, 0.05, 0.3)

    torch.manual_seed(5)
    out = trainer.net(x)
    got = transform.transform_loss(trainer, x, y, out, F.cross_entropy(out, y), len(y))
    torch.manual_seed(5)
    clean = F.cross_entropy(trainer.model(x), y)
    x_adv = attack_batch(attack, trainer.model, x, y, 0.05)
    want = (1 - 0.3) * clean + 0.3 * F.cross_entropy(trainer.model(x_adv), y)
    assert got.dtype == torch.float64 and got.item() == want.item()
    assert want.item() != clean.item()


def test_adversarial_warmup_ramps_the_budget_linearly_over_its_epochs(tmp_path):
    """--adv-warmup W: step t crafts at eps * min(1, t / (W * steps per epoch)); the transform
    is the mixed loss at exactly that budget."""
    from gradlab.attacks import attack_batch
    from gradlab.training.callbacks import AdversarialLoss
    from gradlab.training.loop import Trainer

    trainer = Trainer(_cfg(tmp_path, adv="fgsm", adv_eps=0.2, adv_ratio=1.0, adv_warmup=1.5))
    transform = next(cb for cb in trainer.callbacks if isinstance(cb, AdversarialLoss))
    per_epoch = trainer.total_steps // trainer.cfg["epochs"]
    ramp = 1.5 * per_epoch
    assert [transform.eps_at(t, per_epoch) for t in (1, int(ramp) // 2, int(ramp) + 1, 10 * per_epoch)] == \
        pytest.approx([0.2 / ramp, 0.2 * (int(ramp) // 2) / ramp, 0.2, 0.2], rel=1e-12)
    assert AdversarialLoss("fgsm", 0.2, 1.0).eps_at(1, per_epoch) == 0.2  # no warmup: the full budget
    trainer.model.double().eval()
    x, y = trainer.x_train[:16].double(), trainer.y_train[:16]
    trainer.step = 2  # the next step is the third
    got = transform.transform_loss(trainer, x, y, trainer.net(x), torch.zeros((), dtype=torch.float64), len(y))
    x_adv = attack_batch("fgsm", trainer.model, x, y, 0.2 * (3 / ramp))
    assert got.item() == F.cross_entropy(trainer.model(x_adv), y).item()


def test_resume_from_a_checkpoint_written_before_callbacks_existed(tmp_path):
    """Old last.pt files kept history / last_epoch_metrics / events at the top level."""
    from gradlab.runs import load_checkpoint

    cfg = _cfg(tmp_path, epochs=2, hessian_every=5)
    done, run = _fit(cfg)
    ckpt = load_checkpoint(run.path / "checkpoints" / "last.pt")
    states = ckpt.pop("callbacks")
    ckpt["last_epoch_metrics"] = states["evaluation"]["last"]
    ckpt["history"] = dict(states["probe/hessian"]["last"])
    ckpt["events"] = []
    again, _ = _fit(cfg, resume=ckpt)
    drop = ("seconds",)
    assert {k: v for k, v in again.metrics.items() if k not in drop} == \
        {k: v for k, v in done.metrics.items() if k not in drop}
    assert "lambda_max" in again.metrics and again.metrics["steps"] == 14


def _optimizer_names():
    from gradlab.optim import OPTIMIZERS

    return OPTIMIZERS.names()


@pytest.mark.parametrize("opt", _optimizer_names())
def test_every_optimizer_resumes_exactly_after_ctrl_c_and_after_a_kill(tmp_path, opt):
    """Ctrl-C mid-epoch, then --resume: the rows and final metrics of an uninterrupted run. Then
    what a SIGKILL after the first epoch's checkpoint leaves (rows past it dropped, no summary),
    resumed from that checkpoint through torch.save / load: the same again."""
    from gradlab.runs import RunDir, load_checkpoint

    cfg = _cfg(tmp_path / "ref", opt=opt, epochs=2, max_train=200, dropout=0.2, checkpoint_seconds=0,
               log_every_steps=1)
    ref, ref_run = _fit(cfg)
    captured = {}
    from gradlab.training.loop import Trainer

    trainer = Trainer(cfg, callbacks=[_ctrl_c_at(6)])  # 4 steps an epoch: step 6 is mid-epoch 1
    run = RunDir.create(tmp_path / "cut", "train", None, cfg, argv=["gradlab", "train"])
    real = run.save_checkpoint

    def save(obj, name="last.pt", wait=True):
        if name == "last.pt" and obj["epoch"] == 1 and obj["batch_in_epoch"] == 0:
            captured["epoch1"] = copy.deepcopy(obj)
        return real(obj, name, wait=wait)

    run.save_checkpoint = save
    result = trainer.fit(run)
    run.finish(result.status, result.metrics)
    assert result.status == "interrupted" and result.metrics["steps"] == 6

    drop = ("seconds",)
    final = lambda m: {k: v for k, v in m.items() if k not in drop}  # noqa: E731
    ckpt = load_checkpoint(run.path / "checkpoints" / "last.pt")
    resumed, _ = _fit(cfg, resume=ckpt, run=RunDir.reopen(run.path, ckpt["step"]))
    assert final(resumed.metrics) == final(ref.metrics)
    pd.testing.assert_frame_equal(_values(run), _values(ref_run))

    torch.save(captured["epoch1"], tmp_path / "epoch1.pt")
    ckpt = load_checkpoint(tmp_path / "epoch1.pt")
    assert ckpt["step"] == 4
    resumed, _ = _fit(cfg, resume=ckpt, run=RunDir.reopen(run.path, ckpt["step"]))
    assert final(resumed.metrics) == final(ref.metrics)
    pd.testing.assert_frame_equal(_values(run), _values(ref_run))


def test_a_second_ctrl_c_stops_mid_step_and_keeps_the_last_checkpoint(tmp_path):
    from gradlab.training.callbacks import Callback

    class TwoCtrlC(Callback):
        def on_step_end(self, trainer, info):
            if info.step == 9:  # epoch 1 wrote last.pt at step 7 (checkpoint_seconds=0)
                signal.raise_signal(signal.SIGINT)
                signal.raise_signal(signal.SIGINT)  # the second one raises KeyboardInterrupt here

    result, run, written = _run_with_spy(_cfg(tmp_path, checkpoint_seconds=0), [TwoCtrlC()])
    assert result.status == "interrupted" and "last checkpoint is kept" in result.message
    assert written == [("last.pt", 7, 1, 0)]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored


@pytest.mark.parametrize("key, value, expect", [
    ("epochs", True, "invalid epochs: True (must be an integer >= 1)"),
    ("epochs", 1.5, "invalid epochs: 1.5 (must be an integer >= 1)"),
    ("batch_size", "64", "invalid batch size: '64' is text, not a number"),
    ("batch_size", 0, "invalid batch size: 0 (must be an integer >= 1)"),
    ("checkpoint_seconds", -1, "invalid checkpoint-seconds: -1 (must be a number >= 0)"),
    ("adv", "curls", "invalid adv: 'curls' (must be one of: fgsm, pgd)"),
    ("adv_ratio", 1.5, "invalid adv-ratio: 1.5 (must be a number in (0, 1])"),
    ("probe", 3, "invalid probe: 3 (must be text)"),
])
def test_train_options_check_types_and_ranges(tmp_path, key, value, expect):
    from gradlab.core.errors import GradlabError
    from gradlab.training.options import TRAIN_OPTIONS, train_defaults

    with pytest.raises(GradlabError) as e:
        _cfg(tmp_path, **{key: value})
    assert str(e.value).startswith(expect), str(e.value)
    assert set(TRAIN_OPTIONS.names()) <= set(train_defaults())
    cfg = _cfg(tmp_path, epochs=2.0, checkpoint_seconds=5)  # an integral float is an integer; an int a float
    assert (cfg["epochs"], cfg["checkpoint_seconds"]) == (2, 5.0)
    assert type(cfg["epochs"]) is int and type(cfg["checkpoint_seconds"]) is float
