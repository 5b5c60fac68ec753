"""Config resolution and the run-folder contract, without training."""

from __future__ import annotations

import csv
from fractions import Fraction

import pandas as pd
import pytest

from gradlab.core.config import load_yaml, resolve
from gradlab.core.errors import GradlabError
from gradlab.runs import METRIC_COLUMNS, RunDir, find_run, load_checkpoint, read_config, validate_run_name


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


# -- checkpoints: plain torch.save of cloned state ------------------------------------------------
def _trainer_like_state():
    """model, Adam and LambdaLR state dicts after a step, RNG states, and plain values."""
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    sched.step()
    x = torch.arange(12.0)
    gen = torch.Generator().manual_seed(5)
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "optimizer": gen.get_state()}, "step": 7,
            "epoch_sums": [1.5, 3.0, 64], "views": [x, x[2:5], x.view(3, 4).t()], "ints": torch.arange(3),
            "f16": torch.zeros(2, dtype=torch.float16), "empty": torch.zeros(0),
            "misc": (None, True, "s", float("inf"), torch.float32, torch.Size([2]))}


def _same_values(a, b) -> bool:
    """Same containers (types, keys, order) and tensors equal in dtype, shape and values."""
    import torch

    if isinstance(a, torch.Tensor):
        return type(b) is torch.Tensor and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return type(a) is type(b) and list(a) == list(b) and all(_same_values(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same_values(x, y) for x, y in zip(a, b))
    return a == b or (a != a and b != b)


def _tensors(obj):
    import torch

    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def test_clone_state_gives_every_tensor_its_own_contiguous_storage():
    import torch

    from gradlab.runs.checkpoints import clone_state

    state = _trainer_like_state()
    snap = clone_state(state)
    assert _same_values(state, snap)
    originals = {t.untyped_storage().data_ptr() for t in _tensors(state) if t.numel()}
    for t in _tensors(snap):
        assert t.is_contiguous() and t.storage_offset() == 0 and not t.requires_grad
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size()  # no shared flat buffer
        assert t.numel() == 0 or t.untyped_storage().data_ptr() not in originals
    assert snap["model"]._metadata == state["model"]._metadata  # module versions, for load_state_dict
    assert snap["epoch_sums"] is not state["epoch_sums"] and snap["optimizer"]["state"] is not state["optimizer"]["state"]
    for t in state["model"].values():
        t.add_(1.0)
    assert not _same_values(state["model"], snap["model"])
    torch.Generator().set_state(snap["rng"]["optimizer"])  # fails on a view into a shared buffer


def test_checkpoint_is_a_plain_torch_save_taken_when_saved(tmp_path):
    """A background checkpoint holds the values at the time it was saved and loads with
    weights_only=True like the file torch.save writes; RNG states load back into generators."""
    import io

    import torch

    state = _trainer_like_state()
    buf = io.BytesIO()
    torch.save(state, buf)
    expected = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    run = RunDir.create(tmp_path, "train", None, {})
    for _ in range(2):
        run.save_checkpoint(state, wait=False)
        for t in state["model"].values():
            t.add_(1.0)  # after the save: not in the file
        run.wait_checkpoints()
        back = load_checkpoint(run.path / "checkpoints" / "last.pt")
        assert _same_values(expected, back)
        for t in expected["model"].values():
            t.add_(1.0)
    assert back["model"]._metadata == state["model"]._metadata
    assert back["views"][1].tolist() == [2.0, 3.0, 4.0] and back["views"][2].tolist() == torch.arange(12.0).view(3, 4).t().tolist()
    loaded, saved = torch.Generator(), torch.Generator()
    loaded.set_state(back["rng"]["optimizer"])  # the resume crash: "Invalid mt19937 state"
    saved.set_state(state["rng"]["optimizer"])
    assert torch.equal(torch.rand(3, generator=loaded), torch.rand(3, generator=saved))


def test_load_checkpoint_names_the_file_for_empty_truncated_and_foreign_files(tmp_path):
    import torch

    good = tmp_path / "good.pt"
    torch.save({"w": torch.randn(100)}, good)
    data = good.read_bytes()
    cases = {"empty.pt": b"", "truncated.pt": data[: len(data) // 2], "foreign.pt": b"not a checkpoint"}
    for name, payload in cases.items():
        (tmp_path / name).write_bytes(payload)
        with pytest.raises(GradlabError, match=f"cannot read checkpoint .*{name}") as e:
            load_checkpoint(tmp_path / name)
        assert "\n" not in str(e.value)
    with pytest.raises(GradlabError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "missing.pt")


def test_checkpoint_with_code_is_refused(tmp_path):
    import torch

    path = tmp_path / "code.pt"
    torch.save({"f": Fraction(1, 3)}, path)  # a pickled class: not tensors and plain values
    with pytest.raises(GradlabError, match="cannot read checkpoint .*code.pt"):
        load_checkpoint(path)


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
    assert h.num == 2000 and sum(h.bucket) == 2000 and len(h.bucket_limit) == 30  # TensorBoard's default
    assert ea.Histograms("grads/const")[0].histogram_value.bucket[0] == 5
    assert "grads/bad" not in ea.Tags()["histograms"]


def test_histograms_bin_each_tensor_as_histc(tmp_path):
    """One call's histograms are one event; each is torch.histc's binning of its tensor, with
    exact moments; empty and non-finite tensors are skipped."""
    import torch
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import PyRecordReader_New

    from gradlab.runs.logging import histogram_stats, histograms_stats

    run = RunDir.create(tmp_path, "train", None, {})
    torch.manual_seed(0)
    tensors = {"w": torch.randn(40, 30), "b": torch.randn(30), "const": torch.full((5,), 3.0),
               "inf": torch.tensor([1.0, float("inf")]), "nan": torch.tensor([float("nan"), 1.0]),
               "empty": torch.zeros(0), "tiny": torch.randn(7, dtype=torch.float64) * 1e-30}
    got = histograms_stats(tensors, 64)
    assert list(got) == ["w", "b", "const", "tiny"]  # non-finite and empty tensors are skipped
    for tag, h in got.items():
        x = tensors[tag].double().reshape(-1)
        assert h == histogram_stats(tensors[tag], 64)
        assert h["num"] == len(x) and h["min"] == x.min().item() and h["bucket_limits"][-1] == h["max"]
        assert h["sum"] == pytest.approx(x.sum().item(), rel=1e-9, abs=1e-9)
        assert h["sum_squares"] == pytest.approx(x.dot(x).item(), rel=1e-12)
        assert h["bucket_counts"] == torch.histc(x, 64, h["min"], h["max"]).tolist()
        assert len(h["bucket_limits"]) == 64 and sum(h["bucket_counts"]) == len(x)
    run.log_histograms(tensors, step=3)
    run.close()
    files = list(run.path.glob("events.out.tfevents.*"))
    reader, records = PyRecordReader_New(str(files[0])), 0
    with pytest.raises(Exception, match="No more events"):
        while True:
            reader.GetNext()
            records += 1
    assert records == 1 + 1  # the file-version header, then one event for all four histograms
    ea = EventAccumulator(str(run.path), size_guidance={"histograms": 0})
    ea.Reload()
    assert sorted(ea.Tags()["histograms"]) == sorted(got)
    for tag in got:
        (event,) = ea.Histograms(tag)
        h, x = event.histogram_value, tensors[tag].double().reshape(-1)
        assert event.step == 3 and h.num == len(x) and h.min == x.min().item()
        assert list(h.bucket) == torch.histc(x, 30, h.min, h.max).tolist()


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
