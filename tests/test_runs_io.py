"""Run records on stock I/O: TensorBoard events as SummaryWriter writes them, what a resumed run
shows, and checkpoint writes that fail cleanly."""

from __future__ import annotations

import pandas as pd
import pytest

from gradlab.runs import RunDir, load_checkpoint


def _events(run_path):
    """The summary events of a run, as written (no conversion to tensors)."""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto.event_pb2 import Event

    out = []
    for f in sorted(run_path.glob("events.out.tfevents.*")):
        out += [e for e in map(Event.FromString, RawEventFileLoader(str(f)).Load()) if e.HasField("summary")]
    return out


def test_one_event_per_log_metrics_call_holds_all_its_scalars(tmp_path):
    run = RunDir.create(tmp_path, "train", None, {})
    run.log_metrics(5, 0, "train-step", {"loss": 2.5, "lr": 0.1, "grad_norm": 3.0})
    run.log_metrics(6, 0, "test", {"acc": 0.75})
    run.close()
    events = _events(run.path)
    assert [e.step for e in events] == [5, 6]
    assert [(v.tag, v.simple_value) for v in events[0].summary.value] == [
        ("train-step/loss", 2.5), ("train-step/lr", pytest.approx(0.1)), ("train-step/grad_norm", 3.0)]
    wall = pd.read_csv(run.path / "metrics.csv")["wall_time"]
    assert events[0].wall_time == pytest.approx(wall.iloc[0], abs=1e-3)  # the same time in both


def _scalars(path, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(path), size_guidance={"scalars": 0})
    ea.Reload()
    return [(s.step, s.value) for s in ea.Scalars(tag)]


@pytest.mark.parametrize("first_sorts_last", [False, True])
def test_reopened_run_shows_each_step_once_in_tensorboard(tmp_path, first_sorts_last):
    """A run killed at step 6 after a checkpoint at step 4, resumed and run to step 8: steps 5
    and 6 of the first attempt are gone from metrics.csv and from what TensorBoard reads, also
    when the first attempt's event file was made in the same second by a process whose name
    part sorts after ours (TensorBoard reads the files in name order)."""
    run = RunDir.create(tmp_path, "train", None, {})
    for step in range(1, 7):
        run.log_metrics(step, 0, "train-step", {"loss": float(step)})
    run.close()  # what a kill leaves, and more: the writer flushes every second
    if first_sorts_last:
        (f,) = run.path.glob("events.out.tfevents.*")
        stamp = f.name.split(".")[3]
        f.rename(f.with_name(f"events.out.tfevents.{stamp}.~other-host.1.0"))
    again = RunDir.reopen(run.path, 4)
    for step in range(5, 9):
        again.log_metrics(step, 0, "train-step", {"loss": 10.0 * step})
    again.finish("completed")
    expected = [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 50.0), (6, 60.0), (7, 70.0), (8, 80.0)]
    assert _scalars(run.path, "train-step/loss") == expected
    df = pd.read_csv(run.path / "metrics.csv")
    assert list(zip(df["step"], df["value"])) == expected
    assert len(list(run.path.glob("events.out.tfevents.*"))) == 2


def test_failed_checkpoint_write_keeps_the_previous_file_and_no_temporary(tmp_path):
    run = RunDir.create(tmp_path, "train", None, {})
    run.save_checkpoint({"step": 1})
    run.save_checkpoint({"step": 2, "code": lambda: 0}, wait=False)  # cannot be pickled
    with pytest.raises(Exception, match="pickle"):
        run.wait_checkpoints()
    assert load_checkpoint(run.path / "checkpoints" / "last.pt") == {"step": 1}
    assert sorted(p.name for p in (run.path / "checkpoints").iterdir()) == ["last.pt"]
    run.close()


def test_disabled_run_writes_nothing(tmp_path):
    import torch

    run = RunDir(tmp_path / "r", "train", enabled=False)
    run.log_metrics(1, 0, "train-step", {"loss": 1.0})
    run.log_histograms({"w": torch.ones(3)}, 1)
    run.log_text("t", "x")
    run.save_checkpoint({"step": 1})
    run.tb.add_scalar("a", 1.0, 0)
    run.finish("completed")
    assert not (tmp_path / "r").exists()


def test_run_records_do_not_import_models_data_or_optimizers(tmp_path):
    """The records layer sits below the model zoo: writing and finding runs loads none of it."""
    import sys

    from clihelp import run_proc

    code = ("import sys, torch\n"
            "from gradlab.runs import RunDir, find_run, load_checkpoint\n"
            "from gradlab.runs.table import runs_table\n"
            f"run = RunDir.create({str(tmp_path)!r}, 'train', None, {{}})\n"
            "run.log_metrics(1, 0, 'train', {'loss': 1.0}); run.log_histogram('w', torch.ones(3), 1)\n"
            "run.save_checkpoint({'w': torch.ones(2)}); run.finish('completed')\n"
            f"load_checkpoint(find_run({str(tmp_path)!r}) / 'checkpoints' / 'last.pt'); runs_table({str(tmp_path)!r})\n"
            "print(sorted(m for m in sys.modules if m.split('.')[:2] in "
            "(['gradlab', 'models'], ['gradlab', 'data'], ['gradlab', 'optim'], ['gradlab', 'training'])))\n")
    r = run_proc([sys.executable, "-c", code])
    assert r.code == 0, r.err
    assert r.out.strip() == "[]"
