"""Config resolution and the run-folder contract, without training."""

from __future__ import annotations

import csv

import pandas as pd
import pytest

from gradlab.core.config import load_yaml, resolve
from gradlab.core.errors import GradlabError
from gradlab.runs.folder import METRIC_COLUMNS, RunDir, find_run, load_checkpoint, read_config, validate_run_name


def test_resolve_precedence_and_unknown_keys():
    d = {"lr": 0.1, "epochs": 3, "batch_size": 8}
    assert resolve(d, {"epochs": 5, "batch-size": 16}, {"epochs": 7, "lr": None}) == {"lr": 0.1, "epochs": 7, "batch_size": 16}
    with pytest.raises(GradlabError, match="unknown key in config file: colour"):
        resolve(d, {"colour": 1}, {})
    with pytest.raises(GradlabError, match="valid keys: batch_size, epochs, lr"):
        resolve(d, {}, {"nope": 1})


def test_yaml_errors_name_the_file_and_line(tmp_path):
    with pytest.raises(GradlabError, match="config file not found"):
        load_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: 0.1\nepochs: [1, 2\n")
    with pytest.raises(GradlabError, match=r"malformed YAML in .*bad\.yaml \(line"):
        load_yaml(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(GradlabError, match="expected a mapping"):
        load_yaml(lst)
    unsafe = tmp_path / "unsafe.yaml"
    unsafe.write_text("x: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(GradlabError, match="malformed YAML"):
        load_yaml(unsafe)


@pytest.mark.parametrize("name", ["../x", "a/b", "a\\b", "..", "", " x"])
def test_bad_run_names(name):
    with pytest.raises(GradlabError, match="invalid run name"):
        validate_run_name(name)


def test_run_folder_contract(tmp_path):
    run = RunDir.create(tmp_path, "train", "t1", {"lr": 0.1, "seed": 3}, argv=["gradlab", "train"])
    assert run.path.name.endswith("-train-t1")
    assert (run.path / "checkpoints").is_dir() and (run.path / "plots").is_dir()
    doc = read_config(run.path)
    assert doc["config"] == {"lr": 0.1, "seed": 3}
    assert set(doc["versions"]) == {"gradlab", "torch", "python"} and doc["command_line"] == "gradlab train"
    run.log_metrics(1, 0, "train-step", {"loss": 2.5, "lr": 0.1})
    run.log_metrics(2, 0, "train-step", {"loss": 2.0, "lr": 0.1})
    # Flushed as it goes: readable before the run ends.
    rows = list(csv.DictReader(open(run.path / "metrics.csv")))
    assert list(rows[0]) == METRIC_COLUMNS and len(rows) == 4
    run.finish("completed", {"test_acc": 0.9, "note": "a,b"})
    s = pd.read_csv(run.path / "summary.csv")
    assert list(s.columns[:3]) == ["run_id", "command", "status"] and len(s) == 1
    assert s.loc[0, "status"] == "completed" and s.loc[0, "note"] == "a,b"
    assert not list(run.path.glob(".*.tmp"))


def test_context_manager_marks_failures(tmp_path):
    with pytest.raises(RuntimeError):
        with RunDir.create(tmp_path, "probe-x", None, {}) as run:
            raise RuntimeError("boom")
    assert pd.read_csv(run.path / "summary.csv").loc[0, "status"] == "failed"
    with pytest.raises(KeyboardInterrupt):
        with RunDir.create(tmp_path, "probe-y", None, {}) as run2:
            raise KeyboardInterrupt
    assert pd.read_csv(run2.path / "summary.csv").loc[0, "status"] == "interrupted"


def test_reopen_drops_rows_after_the_checkpoint_and_torn_lines(tmp_path):
    run = RunDir.create(tmp_path, "train", None, {})
    for step in range(1, 6):
        run.log_metrics(step, 0, "train-step", {"loss": 1.0 / step})
    run.close()
    with open(run.path / "metrics.csv", "a") as f:
        f.write("6,0,train-st")  # killed mid-write
    RunDir.reopen(run.path, 3)
    df = pd.read_csv(run.path / "metrics.csv")
    assert df["step"].tolist() == [1, 2, 3]


def test_find_run(tmp_path):
    with pytest.raises(GradlabError, match="run `gradlab train` first"):
        find_run(tmp_path, "last")
    a = RunDir.create(tmp_path, "train", "a", {})
    a.save_checkpoint({"step": 1})
    b = RunDir.create(tmp_path, "probe-jacobian", "b", {})
    assert find_run(tmp_path, "last") == b.path
    assert find_run(tmp_path, "last", require_checkpoint=True) == a.path
    assert find_run(tmp_path, a.path.name) == a.path
    with pytest.raises(GradlabError, match="no checkpoint"):
        find_run(tmp_path, str(b.path), require_checkpoint=True)
    (tmp_path / "junk").mkdir()
    with pytest.raises(GradlabError, match="not a gradlab run folder"):
        find_run(tmp_path, str(tmp_path / "junk"))
    assert load_checkpoint(a.path / "checkpoints" / "last.pt") == {"step": 1}
    (a.path / "checkpoints" / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(GradlabError, match="cannot read checkpoint"):
        load_checkpoint(a.path / "checkpoints" / "bad.pt")


# -- the fast paths under the run folder: same bytes as the slow ones -----------------------------
def _trainer_like_state():
    """model, Adam and LambdaLR state dicts after a step, an RNG state, and plain values."""
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    sched.step()
    x = torch.arange(12.0)
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "rng": {"torch": torch.get_rng_state()}, "step": 7, "epoch_sums": [1.5, 3.0, 64],
            "views": [x, x[2:5], x.view(3, 4).t()], "ints": torch.arange(3), "f16": torch.zeros(2, dtype=torch.float16),
            "empty": torch.zeros(0), "misc": (None, True, "s", float("inf"), torch.float32, torch.Size([2]))}


def test_checkpoint_bytes_are_torch_saves():
    import io

    import torch

    from gradlab._serialize import _fast_dumps, dumps

    def torch_save(obj):
        buf = io.BytesIO()
        torch.save(obj, buf)
        return buf.getvalue()

    state = _trainer_like_state()
    assert _fast_dumps(state) == torch_save(state)  # the fast path itself, not the fallback
    back = torch.load(io.BytesIO(dumps(state)), weights_only=True)
    assert back["views"][2].stride() == (1, 4) and back["views"][1].tolist() == [2.0, 3.0, 4.0]
    assert torch.equal(back["model"]["2.weight"], state["model"]["2.weight"])
    # What the fast path does not write itself goes through torch.save.
    for other in ([torch.nn.Parameter(torch.ones(2))], torch.ones(3).to_sparse(), torch.ones(2).untyped_storage()):
        assert dumps(other) == torch_save(other)
    t = torch.ones(2)
    with pytest.raises(RuntimeError):  # as torch.save: one storage viewed as two dtypes
        dumps([t, t.view(torch.int32)])


def _same(a, b) -> bool:
    import torch

    if isinstance(a, torch.Tensor):
        return (type(b) is torch.Tensor and a.dtype == b.dtype and a.shape == b.shape
                and a.stride() == b.stride() and torch.equal(a, b))
    if isinstance(a, dict):
        return (type(a) is type(b) and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
                and (type(a) is dict or _same(dict(vars(a)), dict(vars(b)))))
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b or (a != a and b != b)


def test_checkpoint_snapshot_loads_as_torch_save(tmp_path):
    """A background checkpoint freezes the values when saved; the file loads as torch.save's."""
    import io

    import torch

    from gradlab._serialize import Snapshots

    state = _trainer_like_state()
    del state["views"]  # non-contiguous views: not snapshotted (below)
    buf = io.BytesIO()
    torch.save(state, buf)
    expected = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    run = RunDir.create(tmp_path, "train", None, {})
    for _ in range(2):  # the second reuses the first one's buffers
        run.save_checkpoint(state, wait=False)
        for t in state["model"].values():
            t.add_(1.0)  # after the snapshot: not in the file
        run.wait_checkpoints()
        back = load_checkpoint(run.path / "checkpoints" / "last.pt")
        assert _same(expected, back)
        for t in expected["model"].values():
            t.add_(1.0)
    assert back["model"]._metadata == state["model"]._metadata
    snaps = Snapshots()
    assert snaps.take(state) is not None
    for other in ({"step": 1}, {"v": torch.arange(4.0)[::2]}, {"p": torch.nn.Parameter(torch.ones(2))},
                  {"s": torch.ones(2).to_sparse()}, {"o": object()}, {(1, 2): torch.ones(1)}):
        assert snaps.take(other) is None  # written by dumps(), as torch.save would


def test_background_checkpoint_write(tmp_path):
    run = RunDir.create(tmp_path, "train", None, {})
    run.save_checkpoint({"step": 1}, wait=False)
    run.save_checkpoint({"step": 2}, wait=False)  # waits for the first, then queues
    run.wait_checkpoints()
    assert load_checkpoint(run.path / "checkpoints" / "last.pt") == {"step": 2}
    (run.path / "checkpoints").rename(run.path / "moved")
    run.save_checkpoint({"step": 3}, "other.pt", wait=False)
    with pytest.raises(FileNotFoundError):  # a failed write surfaces at the next wait
        run.close()
    assert not list(run.path.rglob(".*.tmp"))


def test_crc32c_matches_tensorboard():
    import numpy as np
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as reference

    from gradlab._crc32c import _B, _Q, masked_crc32c, masked_crc32c_many

    rng = np.random.default_rng(0)
    sizes = [0, 1, 3, 4, 5, 31, 32, 63, 64, 65, 100, 128, 129, 2000, _B * _Q, _B * _Q + 1]
    messages = [rng.bytes(n) for n in sizes + sizes[::-1]]
    expected = [reference(m) for m in messages]
    assert [masked_crc32c(m) for m in messages] == expected
    assert masked_crc32c_many(messages) == expected


def test_event_file_is_tensorboards_format(tmp_path):
    import torch
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import PyRecordReader_New

    run = RunDir.create(tmp_path, "train", None, {})
    for step in range(1, 4):
        run.log_metrics(step, 0, "train-step", {"loss": 1.0 / step, "lr": 0.1})
    run.log_histogram("grads/w", torch.randn(50, 40), 3)
    run.log_histogram("grads/const", torch.ones(5), 3)
    run.log_histogram("grads/bad", torch.tensor([1.0, float("inf")]), 3)  # skipped
    run.log_text("config", "x" * 5000)  # a record longer than one CRC chunk
    run.close()
    files = list(run.path.glob("events.out.tfevents.*"))
    assert len(files) == 1
    reader, records = PyRecordReader_New(str(files[0])), 0
    with pytest.raises(Exception, match="No more events"):  # every record passes its CRC checks
        while True:
            reader.GetNext()
            records += 1
    assert records == 1 + 3 + 2 + 1
    ea = EventAccumulator(str(run.path), size_guidance={"scalars": 0, "histograms": 0})
    ea.Reload()
    assert [s.value for s in ea.Scalars("train-step/loss")] == pytest.approx([1.0, 0.5, 1 / 3])
    h = ea.Histograms("grads/w")[0].histogram_value
    assert h.num == 2000 and sum(h.bucket) == 2000 and len(h.bucket_limit) == 64
    assert ea.Histograms("grads/const")[0].histogram_value.bucket[0] == 5
    assert "grads/bad" not in ea.Tags()["histograms"]


def test_scalar_events_are_protobufs_bytes():
    import random

    from tensorboard.compat.proto import event_pb2
    from tensorboard.compat.proto.summary_pb2 import Summary

    from gradlab._tbwriter import _scalar_event

    rng = random.Random(0)
    values = [0.0, -0.0, 1.0, 0.1, float("nan"), float("inf"), -float("inf"), 1e50, -1e50, 1e-50, 3.4028236e38]
    for _ in range(300):
        tags_values = [(rng.choice(["", "a", "train-step/loss", "x" * 200, "ü/é"]), rng.choice(values))
                       for _ in range(rng.randint(0, 4))]
        step, wall = rng.choice([0, 1, 127, 128, 2**40, -5]), rng.choice([0.0, 1795383777.091])
        summary = Summary(value=[Summary.Value(tag=t, simple_value=v) for t, v in tags_values])
        expected = event_pb2.Event(wall_time=wall, step=step, summary=summary).SerializeToString()
        assert _scalar_event(step, wall, tags_values) == expected, (step, wall, tags_values)


def test_histograms_of_many_tensors_in_one_pass(tmp_path):
    import torch

    run = RunDir.create(tmp_path, "train", None, {})
    torch.manual_seed(0)
    tensors = {"w": torch.randn(40, 30), "b": torch.randn(30), "const": torch.full((5,), 3.0),
               "inf": torch.tensor([1.0, float("inf")]), "nan": torch.tensor([float("nan"), 1.0]),
               "empty": torch.zeros(0), "tiny": torch.randn(7, dtype=torch.float64) * 1e-30}
    got = {}
    run.tb.add_histogram_values = lambda tag, step, wall, **h: got.setdefault(tag, h)
    run.log_histograms(tensors, step=3)
    assert list(got) == ["w", "b", "const", "tiny"]  # non-finite and empty tensors are skipped
    for tag, h in got.items():
        x = tensors[tag].double().reshape(-1)
        assert h["num"] == len(x) and h["min"] == x.min().item() and h["bucket_limit"][-1] == h["max"]
        assert h["sum"] == pytest.approx(x.sum().item(), rel=1e-9, abs=1e-9)
        assert h["sum_squares"] == pytest.approx(x.dot(x).item(), rel=1e-12)
        assert h["bucket"] == torch.histc(x, 64, h["min"], h["max"]).tolist()
    run.close()


def test_histogram_events_are_protobufs_bytes():
    import random

    from tensorboard.compat.proto import event_pb2
    from tensorboard.compat.proto.summary_pb2 import HistogramProto, Summary

    from gradlab._tbwriter import _histogram_event

    rng = random.Random(0)
    for _ in range(200):
        n = rng.choice([0, 1, 64])
        h = dict(min=rng.choice([0.0, -0.0, -1.5]), max=rng.choice([0.0, 2.5]), num=rng.choice([0, 1, 300]),
                 sum=rng.choice([0.0, 1.25]), sum_squares=rng.choice([0.0, 4.0]),
                 bucket_limit=[rng.uniform(-1, 1) for _ in range(n)], bucket=[rng.choice([0, 1, 5]) for _ in range(n)])
        tag, step, wall = rng.choice(["", "grads/w", "x" * 300]), rng.choice([0, 5, -3]), rng.choice([0.0, 17.5])
        summary = Summary(value=[Summary.Value(tag=tag, histo=HistogramProto(**h))])
        expected = event_pb2.Event(wall_time=wall, step=step, summary=summary).SerializeToString()
        assert _histogram_event(tag, step, wall, h) == expected, (tag, step, wall, h)


def test_step_logger_writes_what_log_metrics_writes(tmp_path):
    """The prepared per-step logger of training: the same metrics.csv rows and TensorBoard scalars
    as log_metrics for the same values (the wall time aside)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = [(1, 0, 2.5, 0.1, 3.25), (2, 0, 1e-9, 0.1, float("inf")), (3, 1, -0.5, 0.05, 12345.678)]
    runs = []
    for prepared in (False, True):
        run = RunDir.create(tmp_path / str(prepared), "train", None, {})
        log = run.step_logger("train-step", ["loss", "lr", "grad_norm"]) if prepared else None
        for step, epoch, loss, lr, gnorm in values:
            if prepared:
                log(step, epoch, loss, lr, gnorm)
            else:
                run.log_metrics(step, epoch, "train-step", {"loss": loss, "lr": lr, "grad_norm": gnorm})
        run.close()
        runs.append(run)
    frames = [pd.read_csv(r.path / "metrics.csv") for r in runs]
    for f in frames:
        assert list(f.columns) == METRIC_COLUMNS and f["wall_time"].gt(1e9).all()
    frames = [f.drop(columns="wall_time") for f in frames]
    assert len(frames[0]) == 9
    pd.testing.assert_frame_equal(frames[0], frames[1])
    scalars = []
    for r in runs:
        ea = EventAccumulator(str(r.path), size_guidance={"scalars": 0})
        ea.Reload()
        scalars.append({t: [(s.step, s.value) for s in ea.Scalars(t)] for t in ea.Tags()["scalars"]})
    assert scalars[0] == scalars[1] and set(scalars[0]) == {"train-step/loss", "train-step/lr", "train-step/grad_norm"}
