"""Step quality (alpha, update/weight ratio, distance from init): alpha against the closed form on
an exact quadratic, the ratios against a plain computation from the weights a test callback
records, training unchanged by the probe, and the probe through the CLI."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from gradlab.probes.stepquality import alpha, ratios, step_alpha


def _quadratic(seed=0, n=6):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(n, n, generator=g, dtype=torch.float64)
    a = m @ m.T + n * torch.eye(n, dtype=torch.float64)
    b = torch.randn(n, generator=g, dtype=torch.float64)
    return (lambda w: 0.5 * w @ a @ w - b @ w), a, b


def _value_grad(f, w):
    w = w.detach().requires_grad_(True)
    v = f(w)
    (g,) = torch.autograd.grad(v, w)
    return float(v.detach()), g


@pytest.mark.parametrize("scale, expected", [(1.0, 0.0), (2.0, 1.0), (0.5, -0.5), (3.0, 2.0)])
def test_alpha_of_a_gradient_step_on_a_quadratic_is_the_closed_form(scale, expected):
    # Along the gradient g the quadratic has curvature k = g'Ag / g'g; GD with lr = 1/k lands in
    # the minimum of that line (alpha 0), lr = 2/k on its other side (alpha 1), lr = s/k at s - 1.
    f, a, _ = _quadratic()
    w0 = torch.randn(6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    f0, g0 = _value_grad(f, w0)
    k = float(g0 @ a @ g0 / (g0 @ g0))
    w1 = w0 - scale / k * g0
    f1, g1 = _value_grad(f, w1)
    out = step_alpha([w0], [w1], f0, [g0], f1, [g1])
    assert out["alpha"] == pytest.approx(expected, abs=1e-9)
    assert out["step_length"] == pytest.approx(float((w1 - w0).norm()))
    assert out["slope_before"] == pytest.approx(-float(g0.norm()))


def test_alpha_edge_cases():
    assert alpha(0.0, 1.0, 1.0, 0.0, 0.0) == -1.0  # no move
    assert alpha(1.0, 0.0, -2.0, -1.0, -3.0) == -1.0  # concave: still going downhill (Cockpit's -1)
    assert math.isnan(alpha(1.0, 0.0, math.nan, -1.0, 0.0))
    # q(s) = (s - 2)^2 sampled at 0 and 3 (the minimum is at 2, the other side at 4): alpha 0.5
    assert alpha(3.0, 4.0, 1.0, -4.0, 2.0) == pytest.approx(0.5)


def test_ratios_per_layer_and_total():
    torch.manual_seed(0)
    names = ["fc.weight", "fc.bias", "out.weight"]
    init = [torch.randn(3, 2), torch.randn(3), torch.randn(1, 3)]
    w0 = [t + 0.1 for t in init]
    w1 = [t * 1.5 for t in w0]
    out = ratios(names, w0, w1, init)
    fc0 = torch.cat([w0[0].reshape(-1), w0[1]])
    fc1 = torch.cat([w1[0].reshape(-1), w1[1]])
    assert out["update_ratio/fc"] == pytest.approx(float((fc1 - fc0).norm() / fc0.norm()), rel=1e-6)
    assert out["update_ratio"] == pytest.approx(0.5, rel=1e-6)
    flat = lambda ts: torch.cat([t.reshape(-1) for t in ts])  # noqa: E731
    assert out["distance_from_init"] == pytest.approx(float((flat(w1) - flat(init)).norm()), rel=1e-6)
    assert out["distance/out"] == pytest.approx(float((w1[2] - init[2]).norm()), rel=1e-6)
    assert "distance_from_init" not in ratios(names, w0, w1)


def _cfg(tmp_path, **over):
    from gradlab.training.options import train_defaults, validate_train_config

    base = {**train_defaults(), "runs_dir": str(tmp_path), "name": None, "seed": 0, "device": "cpu",
            "max_train": 96, "epochs": 1, "batch_size": 32, "width": 8, "depth": 2}
    return validate_train_config({**base, **over})


def _fit(cfg, callbacks=()):
    from gradlab.runs.folder import RunDir
    from gradlab.training.loop import Trainer

    trainer = Trainer(cfg, callbacks=callbacks)
    run = RunDir.create(cfg["runs_dir"], "train", None, cfg, argv=["gradlab", "train"])
    result = trainer.fit(run)
    run.finish(result.status, result.metrics)
    return trainer, result, run


class _Weights:
    """A test callback: the weights at the start and after each step, and each step's batch."""

    def __init__(self):
        from gradlab.training.callbacks import Callback

        rec = self
        self.after, self.batches = {}, {}

        class _CB(Callback):
            key = "weights"
            order = 50

            def on_fit_start(cb, trainer):
                rec.after[0] = [p.detach().clone() for p in trainer.params]

            def on_step_end(cb, trainer, info):
                rec.after[info.step] = [p.detach().clone() for p in trainer.params]
                rec.batches[info.step] = (info.x.clone(), info.y.clone())

        self.callback = _CB()


@pytest.mark.parametrize("extra", [{"opt": "sgd"}, {"opt": "adam"}, {"opt": "sgd", "adv": "fgsm", "adv_eps": 0.05}])
def test_step_quality_during_training_matches_a_plain_computation(tmp_path, extra):
    import torch.nn.functional as F
    from torch.func import functional_call

    rec = _Weights()
    trainer, result, run = _fit(_cfg(tmp_path, probe="stepquality:every=2", **extra), [rec.callback])
    assert result.status == "completed"
    m = pd.read_csv(run.path / "metrics.csv")
    rows = m[m["split"] == "step_quality"]
    assert sorted(set(rows["step"])) == [2]
    got = dict(zip(rows["metric"], rows["value"]))
    names = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    w1, w2, init = rec.after[1], rec.after[2], rec.after[0]
    plain = ratios(names, w1, w2, init)
    for key, value in plain.items():
        assert got[key] == pytest.approx(value, rel=1e-5), key
    assert sum(k.startswith("update_ratio/") for k in plain) >= 2  # per layer, each checked above

    x, y = rec.batches[2]  # the clean loss of the batch, also under --adv

    def value_grad(ws):
        params = dict(zip(names, [w.detach().requires_grad_(True) for w in ws]))
        loss = F.cross_entropy(functional_call(trainer.model, params, (x,)), y)
        return float(loss.detach()), list(torch.autograd.grad(loss, list(params.values())))

    (f1, g1), (f2, g2) = value_grad(w1), value_grad(w2)
    ref = step_alpha(w1, w2, f1, g1, f2, g2)
    assert got["alpha"] == pytest.approx(ref["alpha"], rel=1e-4, abs=1e-6)
    assert got["step_length"] == pytest.approx(ref["step_length"], rel=1e-5)
    assert "alpha" in result.metrics and "update_ratio" in result.metrics


def test_step_quality_leaves_training_unchanged(tmp_path):
    cfg = dict(opt="sgd", dropout=0.2) if "dropout" in _cfg(tmp_path) else dict(opt="sgd")
    a, _, _ = _fit(_cfg(tmp_path, **cfg))
    b, _, _ = _fit(_cfg(tmp_path, probe="stepquality:every=1", **cfg))
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(p, q)


def test_closure_optimizer_measures_before_at_the_saved_weights(tmp_path):
    rec = _Weights()
    _, result, run = _fit(_cfg(tmp_path, opt="adahessian", probe="stepquality:every=1"), [rec.callback])
    assert result.status == "completed", result.message
    m = pd.read_csv(run.path / "metrics.csv")
    rows = m[(m["split"] == "step_quality") & (m["metric"] == "alpha")]
    assert len(rows) == 3 and rows["value"].notna().all()


def test_cli_stepquality_probe_and_bad_spec(tmp_path, capsys):
    from clihelp import cli

    r = cli(capsys, "probe", "stepquality", "--runs-dir", tmp_path, "--depth", "2", "--width", "8",
            "--batches", "2", "--batch-size", "32", "--lr", "0.5", "--quiet")
    assert r.code == 0, r.err
    table = pd.read_csv(r.run_path / "stepquality.csv")
    assert len(table) == 2 and {"alpha", "step_length", "update_ratio", "loss_before", "loss_after"} <= set(table)
    assert (table["step_length"] > 0).all()
    r = cli(capsys, "train", "--runs-dir", tmp_path, "--probe", "stepquality:every=0", "--quiet")
    assert r.code == 2 and "every" in r.err


def test_a_resumed_run_measures_the_distance_from_the_same_initial_weights(tmp_path):
    from gradlab.runs import RunDir, load_checkpoint
    from gradlab.training.loop import Trainer

    cfg = _cfg(tmp_path / "ref", epochs=2, probe="stepquality:every=3")
    _, ref, ref_run = _fit(cfg)
    cfg = _cfg(tmp_path / "cut", epochs=1, probe="stepquality:every=3")
    _, first, run = _fit(cfg)  # one epoch, then continue to two from its last.pt
    ckpt = load_checkpoint(run.path / "checkpoints" / "last.pt")
    assert "init" in ckpt["callbacks"]["probe/stepquality"]
    cfg2 = {**cfg, "epochs": 2}
    trainer = Trainer(cfg2, resume=ckpt)
    again = RunDir.reopen(run.path, ckpt["step"])
    result = trainer.fit(again)
    again.finish(result.status, result.metrics)

    def rows(r):
        m = pd.read_csv(r.path / "metrics.csv")
        m = m[(m["split"] == "step_quality") & (m["metric"] == "distance_from_init")]
        return m.set_index("step")["value"]

    pd.testing.assert_series_equal(rows(run), rows(ref_run), rtol=1e-6)
    assert result.metrics["distance_from_init"] == pytest.approx(ref.metrics["distance_from_init"], rel=1e-6)
