"""`gradlab train`, `runs`, `list` and `run` through the real entry point."""

from __future__ import annotations

import pandas as pd
import pytest
import yaml

from clihelp import cli

SMALL = ["--set", "max_train=400", "--quiet"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One default `gradlab train` on digits, shared by the contract tests."""
    runs = tmp_path_factory.mktemp("runs")
    capsys = _Capture()
    from gradlab_cli.main import main

    with capsys:
        try:
            main(["train", "--runs-dir", str(runs), "--name", "default", "--quiet"])
        except SystemExit as e:
            assert e.code in (0, None), capsys.err
    path = capsys.out.strip().splitlines()[-1]
    assert path.startswith("run: ")
    from pathlib import Path

    return Path(path[5:])


class _Capture:
    """capsys is function-scoped; a module fixture captures stdout/stderr itself."""

    def __enter__(self):
        import io
        import sys

        self._old = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = io.StringIO(), io.StringIO()
        return self

    def __exit__(self, *exc):
        import sys

        self.out, self.err = sys.stdout.getvalue(), sys.stderr.getvalue()
        sys.stdout, sys.stderr = self._old
        return False


def test_default_train_reaches_95_percent_on_digits(trained):
    s = pd.read_csv(trained / "summary.csv")
    assert list(s.columns[:10]) == ["run_id", "command", "status", "train_loss", "train_acc", "test_loss",
                                    "test_acc", "epochs", "steps", "seconds"]
    assert s.loc[0, "status"] == "completed"
    assert s.loc[0, "test_acc"] >= 0.95


def test_run_folder_holds_config_metrics_checkpoint_and_events(trained):
    doc = yaml.safe_load((trained / "config.yaml").read_text())
    cfg = doc["config"]
    for key in ("model", "dataset", "opt", "lr", "epochs", "batch_size", "seed", "depth", "width", "act"):
        assert key in cfg and cfg[key] is not None, key  # every default filled in
    assert doc["command"] == "train" and doc["versions"]["torch"]
    m = pd.read_csv(trained / "metrics.csv")
    assert list(m.columns) == ["step", "epoch", "split", "metric", "value", "wall_time", "grad_equivalents"]
    steps = m[(m.split == "train-step") & (m.metric == "loss")]
    total = int(pd.read_csv(trained / "summary.csv").loc[0, "steps"])
    assert steps["step"].tolist() == list(range(10, total + 1, 10))  # every log_every_steps (default 10)
    assert set(m[m.split == "test"].metric) == {"loss", "acc"}
    assert set(m[m.split == "train-step"].metric) == {"loss", "lr", "grad_norm"}
    assert (trained / "checkpoints" / "last.pt").is_file()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(trained), size_guidance={"scalars": 0, "histograms": 0})
    ea.Reload()
    tags = ea.Tags()
    assert {"train-step/loss", "train-step/lr", "train-step/grad_norm", "test/acc", "train/loss"} <= set(tags["scalars"])
    assert len(ea.Scalars("train-step/loss")) == len(steps)
    assert ea.Scalars("test/acc")[-1].value == pytest.approx(m[(m.split == "test") & (m.metric == "acc")].value.iloc[-1])
    assert any(t.startswith("grads/") for t in tags["histograms"])


def test_same_seed_same_metrics(tmp_path, capsys):
    vals = []
    for i in range(2):
        r = cli(capsys, "train", "--runs-dir", tmp_path / str(i), "--epochs", "2", "--seed", "7", *SMALL)
        assert r.code == 0, r.err
        vals.append(pd.read_csv(r.run_path / "metrics.csv")[["step", "split", "metric", "value"]])
    pd.testing.assert_frame_equal(vals[0], vals[1])
    r = cli(capsys, "train", "--runs-dir", tmp_path / "2", "--epochs", "2", "--seed", "8", *SMALL)
    other = pd.read_csv(r.run_path / "metrics.csv")
    assert not other["value"].equals(vals[0]["value"])


def test_nan_loss_stops_with_status_diverged(tmp_path, capsys):
    # Every step logged: no row of the steps before the NaN is skipped by the schedule.
    r = cli(capsys, "train", "--runs-dir", tmp_path, "--opt", "sgd", "--lr", "1e8", "--epochs", "3",
            "--log-every-steps", "1", *SMALL)
    assert r.code == 1
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and "diverged" in lines[0] and "step" in lines[0] and "lr 1e+08" in lines[0]
    s = pd.read_csv(r.run_path / "summary.csv")
    assert s.loc[0, "status"] == "diverged"
    m = pd.read_csv(r.run_path / "metrics.csv")
    assert m["value"].map(lambda v: v == v).all()  # the NaN step is never logged as a value


def test_config_file_and_flags(tmp_path, capsys):
    cfgfile = tmp_path / "c.yaml"
    cfgfile.write_text("epochs: 1\nbatch-size: 32\nwidth: 16\nmax_train: 200\n")
    r = cli(capsys, "train", "--runs-dir", tmp_path, "--config", cfgfile, "--width", "24", "--quiet")
    assert r.code == 0, r.err
    cfg = yaml.safe_load((r.run_path / "config.yaml").read_text())["config"]
    assert (cfg["epochs"], cfg["batch_size"], cfg["width"]) == (1, 32, 24)


def _bad_inputs(tmp_path):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("epochs: [1\n")
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("epochz: 3\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    notrun = tmp_path / "notrun"
    notrun.mkdir()
    return [
        (["--model", "nope"], "unknown model 'nope'; choose from"),
        (["--dataset", "nope"], "unknown dataset 'nope'; choose from"),
        (["--opt", "nope"], "unknown optimizer 'nope'; choose from"),
        (["--lr", "0"], "invalid lr: 0"),
        (["--lr", "-1"], "invalid lr: -1"),
        (["--epochs", "0"], "invalid epochs: 0"),
        (["--batch-size", "0"], "invalid batch size: 0"),
        (["--depth", "0"], "depth"),
        (["--config", tmp_path / "missing.yaml"], "config file not found"),
        (["--config", bad_yaml], "malformed YAML"),
        (["--config", unknown], "unknown key in config file: epochz"),
        (["--name", "../escape"], "invalid run name"),
        (["--name", "a/b"], "invalid run name"),
        (["--resume", notrun], "not a gradlab run folder"),
        (["--dataset", "mnist", "--data-dir", empty, "--set", "download=false"], "t10k-images-idx3-ubyte.gz"),
        (["--epochs", "abc"], "epochs"),
    ]


def test_bad_input_gives_one_line_exit_2_and_no_run_folder(tmp_path, capsys):
    runs = tmp_path / "runs"
    for args, expect in _bad_inputs(tmp_path):
        r = cli(capsys, "train", "--runs-dir", runs, *args)
        lines = r.err.strip().splitlines()
        assert r.code == 2, (args, r.err)
        assert len(lines) == 1 and lines[0].startswith("gradlab: error: "), (args, r.err)
        assert expect in lines[0], (args, lines[0])
        assert "Traceback" not in r.err
        assert not runs.exists() or not any(runs.iterdir()), args


def test_runs_table_and_list(tmp_path, capsys, trained):
    r = cli(capsys, "runs", "--runs-dir", trained.parent, "--csv", tmp_path / "all.csv")
    assert r.code == 0 and trained.name in r.out
    df = pd.read_csv(tmp_path / "all.csv")
    row = df[df.run_id == trained.name].iloc[0]
    assert (row.command, row.model, row.dataset, row.status) == ("train", "mlp", "digits", "completed")
    assert row.test_acc >= 0.95
    for kind, name in (("models", "resnet20"), ("datasets", "digits"), ("optimizers", "adahessian"),
                       ("probes", "jacobian"), ("probes", "gradnorm"), ("attacks", "curls")):
        r = cli(capsys, "list", kind)
        assert r.code == 0 and name in r.out
    r = cli(capsys, "list", "things")
    assert r.code == 2 and len(r.err.strip().splitlines()) == 1


def test_experiment_sweep_continues_past_divergence(tmp_path, capsys):
    exp = tmp_path / "exp.yaml"
    exp.write_text(yaml.safe_dump({
        "command": "train", "opt": "sgd", "epochs": 1, "max_train": 200, "runs_dir": str(tmp_path / "runs"),
        "sweep": {"lr": [1e8, 0.05]},
    }))
    r = cli(capsys, "run", exp)
    assert r.code == 1  # one run diverged: reported, and the sweep went on
    assert "diverged" in r.err and "completed" in r.out
    df = cli(capsys, "runs", "--runs-dir", tmp_path / "runs") and pd.concat(
        [pd.read_csv(p) for p in (tmp_path / "runs").glob("*/summary.csv")])
    assert sorted(df["status"]) == ["completed", "diverged"]
    done = [p.parent for p in (tmp_path / "runs").glob("*/summary.csv")
            if pd.read_csv(p).loc[0, "status"] == "completed"][0]
    assert "lr=0.05" in done.name
    events = b"".join(p.read_bytes() for p in done.glob("events.out.tfevents.*"))
    assert b"_hparams_" in events  # TensorBoard's HParams plugin data
    r = cli(capsys, "run", tmp_path / "missing.yaml")
    assert r.code == 2 and "not found" in r.err


def test_experiment_file_shapes(tmp_path):
    from gradlab.core.errors import GradlabError
    from gradlab.training.experiment import load_experiment

    f = tmp_path / "e.yaml"
    f.write_text(yaml.safe_dump({"seed": 1, "steps": [
        {"command": "train", "sweep": {"opt": ["sgd", "adam"], "lr": [0.1, 0.01]}},
        {"command": "probe-landscape", "run": "@previous", "steps": 9},
        {"command": "attack", "args": ["pgd"], "run": "@previous", "steps": 5},
    ]}, sort_keys=False))
    train, land, attack = load_experiment(f)
    assert train.command == ["train"] and len(train.combinations()) == 4
    assert train.combinations()[1] == {"seed": 1, "opt": "sgd", "lr": 0.01}
    assert train.label(train.combinations()[1]) == "opt=sgd_lr=0.01"
    assert land.command == ["probe", "landscape"] and land.base["steps"] == 9  # the command's own --steps
    assert attack.args == ["pgd"] and attack.base == {"seed": 1, "run": "@previous", "steps": 5}
    f.write_text(yaml.safe_dump({"command": "train", "run": "@previous"}))
    with pytest.raises(GradlabError, match="first stage"):
        load_experiment(f)
    f.write_text(yaml.safe_dump({"command": "train", "sweep": {"lr": 0.1}}))
    with pytest.raises(GradlabError, match="non-empty list"):
        load_experiment(f)
    f.write_text(yaml.safe_dump({"opt": "sgd"}))
    with pytest.raises(GradlabError, match="missing 'command'"):
        load_experiment(f)


def test_probes_during_training_do_not_change_the_run(tmp_path, capsys):
    """--hessian-every / --probe-every log extra rows but leave the training itself identical,
    even with dropout drawing from the random stream."""
    base = ["train", "--epochs", "2", "--set", "dropout=0.2", *SMALL]
    r0 = cli(capsys, *base, "--runs-dir", tmp_path / "a")
    r1 = cli(capsys, *base, "--runs-dir", tmp_path / "b", "--hessian-every", "5", "--probe-every", "7")
    assert r0.code == 0 and r1.code == 0, r1.err
    m0, m1 = (pd.read_csv(r.run_path / "metrics.csv") for r in (r0, r1))
    assert {"curvature", "gradnorm"} <= set(m1.split)
    keep = lambda m: m[m.split.isin(["train-step", "train", "test"])][["step", "split", "metric", "value"]].reset_index(drop=True)  # noqa: E731
    pd.testing.assert_frame_equal(keep(m0), keep(m1))
    curv = m1[m1.split == "curvature"]
    assert (curv[curv.metric == "lambda_max"].value > 0).all()


def test_adversarial_training_options(tmp_path, capsys):
    for adv in ("fgsm", "pgd"):
        r = cli(capsys, "train", "--runs-dir", tmp_path, "--epochs", "1", "--adv", adv, "--adv-eps", "0.05",
                "--adv-ratio", "1.0", *SMALL)
        assert r.code == 0, r.err
        cfg = yaml.safe_load((r.run_path / "config.yaml").read_text())["config"]
        assert (cfg["adv"], cfg["adv_eps"], cfg["adv_ratio"]) == (adv, 0.05, 1.0)
        assert pd.read_csv(r.run_path / "summary.csv").loc[0, "status"] == "completed"
    for args, msg in ((["--adv", "curls"], "must be one of: fgsm, pgd"), (["--adv", "fgsm", "--adv-eps", "0"], "adv-eps"),
                      (["--adv", "fgsm", "--adv-ratio", "1.5"], "adv-ratio")):
        r = cli(capsys, "train", "--runs-dir", tmp_path / "bad", *args)
        assert r.code == 2 and msg in r.err and len(r.err.strip().splitlines()) == 1


def test_keep_checkpoints_spreads_snapshots_over_training(tmp_path, capsys):
    r = cli(capsys, "train", "--runs-dir", tmp_path, "--epochs", "3", "--keep-checkpoints", "4", *SMALL)
    assert r.code == 0, r.err
    names = {p.name for p in (r.run_path / "checkpoints").iterdir()}
    # 400 examples / batch 64 = 7 steps per epoch, 21 in all: 4 snapshots evenly spread.
    assert names == {"init.pt", "last.pt", "step-00000005.pt", "step-00000010.pt", "step-00000016.pt",
                     "step-00000021.pt"}
    from gradlab.runs.checkpoints import load_checkpoint

    assert load_checkpoint(r.run_path / "checkpoints" / "init.pt")["step"] == 0


def test_tensorboard_command(tmp_path, capsys):
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    r = cli(capsys, "tensorboard", "--runs-dir", tmp_path / "missing")
    assert r.code == 2 and "no runs folder" in r.err
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "runs").mkdir()
    # Its own process group, so that the clean-up below can stop everything even if it fails.
    p = subprocess.Popen([sys.executable, "-m", "gradlab", "tensorboard", "--runs-dir", str(tmp_path / "runs"),
                          "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    try:
        deadline, body = time.time() + 90, b""
        while time.time() < deadline and not body:
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2).read()
            except OSError:
                time.sleep(0.5)
        assert b"TensorBoard" in body or b"tensorboard" in body.lower()
        p.terminate()  # SIGTERM to gradlab alone: it must stop the server it started
        assert p.wait(timeout=30) == 0
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2).read()
    finally:
        import os
        import signal

        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait(timeout=30)
