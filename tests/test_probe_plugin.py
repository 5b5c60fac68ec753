"""The probe protocol end to end: a toy probe registered from this file runs through the CLI
(`gradlab probe toy`), the run folder and the training-loop entry point `probe_scalars`; the
built-in probes keep the same contract; the Jacobian Gram operator and BatchNorm recalibration
against exact references."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from clihelp import cli
from gradlab.core.errors import GradlabError
from gradlab.core.options import Option, Options
from gradlab.probes import PROBES, ProbeReport, probe_scalars

TOY_OPTIONS = Options(
    Option("batches", int, 2, "Batches to average over", low=1),
    Option("batch_size", int, 16, "Examples per batch", low=1),
    Option("scale", float, 1.0, "Multiplies the logits", low=0, low_open=True),
)


@PROBES.register("toy", "mean logit per batch, times --scale", options=TOY_OPTIONS)
def toy_probe(ctx):
    """Mean logit of each batch the probe asked for, times --scale."""
    from matplotlib.figure import Figure

    with torch.no_grad():
        means = [float(ctx.model(x).mean()) * ctx.options["scale"] for x, _ in ctx.batches]
    fig = Figure()
    fig.add_subplot().plot(means)
    overall = sum(means) / len(means)
    return ProbeReport(table=pd.DataFrame({"batch": range(len(means)), "mean_logit": means}),
                       scalars={"mean_logit": overall}, figures={"toy": fig},
                       summary_lines=[f"toy: mean logit {overall:.6g}"], metrics={"mean_logit": overall})


def _reference_means(depth, width, batches, batch_size, scale, seed=0):
    """The same numbers computed by hand: the fresh model and the seeded batches rebuilt."""
    from gradlab.data import load_dataset
    from gradlab.models import build_model

    data = load_dataset("digits", seed=seed)
    torch.manual_seed(seed)
    model = build_model("mlp", data.spec, depth=depth, width=width)
    perm = torch.randperm(data.x_train.shape[0], generator=torch.Generator().manual_seed(seed))
    idx = perm[: batches * batch_size].view(batches, batch_size)
    with torch.no_grad():
        return [float(model(data.x_train[i]).mean()) * scale for i in idx]


def test_toy_probe_through_the_cli_writes_its_report(tmp_path, capsys):
    r = cli(capsys, "probe", "toy", "--runs-dir", tmp_path, "--depth", "1", "--width", "4", "--batches", "3",
            "--scale", "2", "--quiet")
    assert r.code == 0, r.err
    path = r.run_path
    assert path.name.endswith("-probe-toy")
    df = pd.read_csv(path / "toy.csv")
    assert list(df.columns) == ["batch", "mean_logit"] and len(df) == 3
    ref = _reference_means(1, 4, 3, 16, 2.0)
    assert df["mean_logit"].tolist() == pytest.approx(ref, rel=1e-6)
    assert (path / "plots" / "toy.png").stat().st_size > 0
    s = pd.read_csv(path / "summary.csv")
    assert s.loc[0, "status"] == "completed" and s.loc[0, "command"] == "probe-toy"
    assert s.loc[0, "mean_logit"] == pytest.approx(sum(ref) / 3, rel=1e-6)
    assert s.loc[0, "model"] == "mlp" and s.loc[0, "depth"] == 1  # the model source is described
    doc = yaml.safe_load((path / "config.yaml").read_text())
    assert doc["command"] == "probe-toy"
    assert doc["config"]["scale"] == 2.0 and doc["config"]["batches"] == 3 and doc["config"]["batch_size"] == 16
    assert doc["config"]["width"] == 4 and doc["config"]["seed"] == 0
    metrics = pd.read_csv(path / "metrics.csv")  # the scalars, logged at step 0
    assert metrics["split"].tolist() == ["toy"] and metrics["metric"].tolist() == ["mean_logit"]
    assert any(p.name.startswith("events.out.tfevents") for p in path.iterdir())
    lines = r.out.strip().splitlines()
    assert lines[-2].startswith("toy: mean logit ") and lines[-1] == f"run: {path}"


def test_toy_probe_config_file_help_and_listing(tmp_path, capsys):
    cfg = tmp_path / "toy.yaml"
    cfg.write_text("scale: 0.5\nbatches: 1\nwidth: 4\ndepth: 1\n")
    r = cli(capsys, "probe", "toy", "--runs-dir", tmp_path / "runs", "--config", cfg, "--quiet")
    assert r.code == 0, r.err
    df = pd.read_csv(r.run_path / "toy.csv")
    assert df["mean_logit"].tolist() == pytest.approx(_reference_means(1, 4, 1, 16, 0.5), rel=1e-6)
    r = cli(capsys, "probe", "toy", "--help")
    out = " ".join(r.out.replace("│", " ").split())
    assert r.code == 0 and "--scale" in out and "Multiplies the logits. (default: 1)" in out and "--run" in out
    for args in (("probe", "--help"), ("list", "probes")):
        r = cli(capsys, *args)
        assert r.code == 0 and "toy" in r.out and "mean logit per batch" in r.out
    r = cli(capsys, "probe", "toyy")
    assert r.code == 2 and "unknown probe 'toyy'" in r.err and "did you mean 'toy'" in r.err


@pytest.mark.parametrize("args, words", [
    (["--scale", "0"], "invalid scale: 0.0 (must be a number > 0)"),
    (["--set-this", "1"], "No such option"),
    (["--run", "last", "--width", "4"], "--width describes a fresh model"),
])
def test_toy_probe_mistakes_are_one_line_before_any_folder(tmp_path, capsys, args, words):
    runs = tmp_path / "runs"
    r = cli(capsys, "probe", "toy", "--runs-dir", runs, *args)
    assert r.code == 2 and words in r.err and len(r.err.strip().splitlines()) == 1, r.err
    assert not runs.exists()
    bad = tmp_path / "bad.yaml"
    bad.write_text("scael: 2\n")
    r = cli(capsys, "probe", "toy", "--runs-dir", runs, "--config", bad)
    assert r.code == 2 and "did you mean 'scale'" in r.err and not runs.exists()


def _tiny_net():
    from gradlab.models import build_model
    from gradlab.data import load_dataset

    data = load_dataset("digits", seed=0)
    torch.manual_seed(0)
    return build_model("mlp", data.spec, depth=2, width=8), (data.x_train[:32], data.y_train[:32])


def test_probe_scalars_runs_probes_as_the_training_loop_does():
    from gradlab.probes.gradnorm import gradnorm_probe
    from gradlab.probes.hessian import quick_curvature

    model, (x, y) = _tiny_net()
    with torch.no_grad():
        mean = float(model(x).mean())
    assert probe_scalars("toy", model, F.cross_entropy, (x, y), scale=3.0) == {"mean_logit": pytest.approx(3 * mean)}
    got = probe_scalars("gradnorm", model, F.cross_entropy, (x, y))
    rep = gradnorm_probe(model, F.cross_entropy, [(x, y)])
    want = {}
    for lg in rep.layers:
        want[f"layer{lg.layer}_grad_norm"], want[f"layer{lg.layer}_signal_norm"] = lg.grad_norm, lg.signal_norm
    assert got == pytest.approx(want, rel=1e-12)
    lam, tr = quick_curvature(model, F.cross_entropy, (x, y))
    got = probe_scalars("hessian", model, F.cross_entropy, (x, y))
    assert got == pytest.approx({"lambda_max": lam, "trace": tr, "stability_bound": 2 / lam}, rel=1e-9)
    assert all(isinstance(v, float) for v in got.values())
    for name in ("landscape", "jacobian"):
        with pytest.raises(GradlabError, match=f"probe '{name}' does not run during training; probes that do: .*gradnorm"):
            probe_scalars(name, model, F.cross_entropy, (x, y))
    with pytest.raises(GradlabError, match="unknown option 'scael'.*did you mean 'scale'"):
        probe_scalars("toy", model, F.cross_entropy, (x, y), scael=1.0)
    with pytest.raises(GradlabError, match="invalid threshold"):
        probe_scalars("gradnorm", model, F.cross_entropy, (x, y), threshold=-1.0)


def test_catalogue_matches_what_the_modules_register():
    import importlib

    from gradlab.core.manifest import registry_view

    view = registry_view("probes")
    for name, module in PROBES.catalog.items():
        importlib.import_module(module)
        entry = PROBES.entry(name)
        assert entry.obj.__module__ == module and entry.description and len(entry.options) > 0, name
        assert view.entry(name).description == entry.description  # what `gradlab probe --help` shows
    assert set(PROBES.catalog) <= set(PROBES.names()) and "toy" in PROBES.names()
    with pytest.raises(ValueError, match="registered twice"):  # a built-in name cannot be taken over
        PROBES.register("hessian", "something else")(lambda ctx: None)


def test_jacobian_gram_matches_dense_per_example_jacobians():
    from gradlab.curvature import JacobianGram, per_example_jacobian

    torch.manual_seed(0)
    for n_in, n_out in ((5, 3), (3, 6)):  # both sides: J^T J when the input is smaller, else J J^T
        net = nn.Sequential(nn.Linear(n_in, 7), nn.Tanh(), nn.Linear(7, n_out)).double()
        h = torch.randn(4, n_in, dtype=torch.float64)
        jac = per_example_jacobian(net, h)  # (4, n_out, n_in)
        ref = jac.transpose(1, 2) @ jac if n_in <= n_out else jac @ jac.transpose(1, 2)
        gram = JacobianGram(net, h)
        assert gram.size == min(n_in, n_out) and gram.side == ("input" if n_in <= n_out else "output")
        torch.testing.assert_close(gram.to_dense(), ref, rtol=1e-12, atol=1e-12)
        v = torch.randn(4, n_in, dtype=torch.float64)
        torch.testing.assert_close(gram.jvp(v), (jac @ v.unsqueeze(-1)).squeeze(-1), rtol=1e-12, atol=1e-12)
        est = gram.moments(4000, torch.Generator().manual_seed(1))
        p = gram.size
        exact = torch.stack([torch.diagonal(ref, dim1=1, dim2=2).sum(-1) / p,
                             (ref @ ref).diagonal(dim1=1, dim2=2).sum(-1) / p], dim=1)
        torch.testing.assert_close(est, exact, rtol=0.1, atol=1e-3)


def test_recalibrate_batchnorm_sets_the_batch_statistics_and_keeps_flags():
    from gradlab.probes.source import recalibrate_batchnorm

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 2)).double()
    net.eval()
    net[2].train()  # a mixed mode must come back as it was
    x = torch.randn(50, 3, dtype=torch.float64)
    with torch.no_grad():
        h = net[0](x)
    assert recalibrate_batchnorm(net, x)
    bn = net[1]
    torch.testing.assert_close(bn.running_mean, h.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bn.running_var, h.var(0, unbiased=True), rtol=1e-12, atol=1e-12)
    assert bn.momentum == 0.1 and [m.training for m in net] == [False, False, True, False]
    assert not recalibrate_batchnorm(nn.Linear(3, 2), x)


def test_run_probe_from_python_gives_the_cli_report_without_a_folder(tmp_path, monkeypatch):
    from gradlab.probes import run_probe

    monkeypatch.chdir(tmp_path)
    rep = run_probe("toy", depth=1, width=4, batches=3, scale=2.0)
    assert rep.table["mean_logit"].tolist() == pytest.approx(_reference_means(1, 4, 3, 16, 2.0), rel=1e-6)
    rep = run_probe("hessian", depth=1, width=8, batches=1, batch_size=32, top_k=1, trace=False, lr=1e3)
    assert rep.summary_lines[0].startswith("point: ") and "ABOVE the gradient-descent stability bound" in rep.summary_lines[1]
    assert not list(tmp_path.iterdir())  # no run folder, no runs/ created
    with pytest.raises(GradlabError, match="invalid top_k: 0"):
        run_probe("hessian", top_k=0)
    with pytest.raises(GradlabError, match="unknown key: scael; did you mean 'scale'"):
        run_probe("toy", scael=2.0)


def test_a_probe_may_name_the_off_spelling_of_a_boolean_flag(tmp_path, capsys):
    r = cli(capsys, "probe", "gradnorm", "--runs-dir", tmp_path, "--eval-mode", "--depth", "1", "--width", "4",
            "--batches", "1", "--quiet")
    assert r.code == 0, r.err
    assert yaml.safe_load((r.run_path / "config.yaml").read_text())["config"]["train_mode"] is False
    r = cli(capsys, "probe", "jacobian", "--help")
    assert r.code == 0 and "--normalized-space" in r.out and "--no-pixel-space" not in r.out


def test_toy_probe_runs_during_training_as_a_callback(tmp_path, capsys):
    """The same toy probe, from this file, through `gradlab train --probe`: rows of its own split
    every N steps, in metrics.csv and TensorBoard; the training loop knows nothing of it."""
    r = cli(capsys, "train", "--runs-dir", tmp_path, "--epochs", "1", "--batch-size", "32", "--width", "8",
            "--set", "max_train=192", "--probe", "toy:every=2:scale=2", "--quiet")
    assert r.code == 0, r.err
    m = pd.read_csv(r.run_path / "metrics.csv")
    rows = m[(m.split == "toy") & (m.metric == "mean_logit")]
    assert rows["step"].tolist() == [2, 4, 6]
    assert rows["value"].notna().all() and (rows["value"] != 0).any()
    r = cli(capsys, "train", "--runs-dir", tmp_path, "--probe", "toy:every=2:scael=2", "--quiet")
    assert r.code == 2 and "did you mean 'scale'?" in r.err
