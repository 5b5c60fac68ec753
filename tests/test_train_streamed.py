"""Training from a streamed dataset: the same steps as in memory (imagefolder), and CIFAR-10 file
blocks shuffled so an epoch reads each file once."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from gradlab.runs import RunDir


def _fit(tmp_path, name, **over):
    from gradlab.training.loop import Trainer
    from gradlab.training.options import train_defaults, validate_train_config

    cfg = validate_train_config({**train_defaults(), "runs_dir": str(tmp_path / "runs"), "name": name, "seed": 1,
                                 "device": "cpu", "epochs": 2, "batch_size": 5, "width": 8, "depth": 1, **over})
    run = RunDir.create(cfg["runs_dir"], "train", name, cfg, argv=["gradlab", "train"])
    trainer = Trainer(cfg)
    result = trainer.fit(run)
    run.finish(result.status, result.metrics)
    return trainer, result


def test_streamed_training_takes_the_in_memory_steps(tmp_path):
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "img" / c).mkdir(parents=True)
        for i in range(9):
            Image.fromarray(rng.integers(0, 256, (4, 4), dtype=np.uint8), mode="L").save(tmp_path / "img" / c / f"{i}.png")
    common = dict(dataset="imagefolder", data_dir=str(tmp_path / "img"), channels="gray")
    mem, r_mem = _fit(tmp_path, "mem", **common)
    st, r_st = _fit(tmp_path, "st", stream=True, **common)
    assert st.x_train is None and r_st.status == "completed"
    for a, b in zip(mem.model.parameters(), st.model.parameters()):
        assert torch.equal(a, b)
    assert r_st.metrics["test_loss"] == pytest.approx(r_mem.metrics["test_loss"], rel=1e-12)
    # the Hessian probe of each run: the in-memory batches, or the streamed split batch by batch
    from gradlab.probes.runner import run_probe

    runs = tmp_path / "runs"
    lam = [run_probe("hessian", run=str(next(runs.glob(f"*{n}"))), runs_dir=str(runs), batches=0, batch_size=4,
                     top_k=2, bottom_k=0, trace=False, tol=1e-8).scalars["lambda_max"] for n in ("mem", "st")]
    assert lam[1] == pytest.approx(lam[0], rel=1e-6)


def test_cifar_blocks_are_shuffled_file_by_file(tmp_path):
    from gradlab.training.streaming import BlockBatchSampler

    sampler = BlockBatchSampler([4, 6, 5], batch_size=5, seed=0)
    batches = sampler.epoch_batches(0)
    flat = torch.cat([idx for idx, _ in batches]).tolist()
    assert sorted(flat) == list(range(15)) and [n for _, n in batches] == [5, 5, 5]
    owner = [0 if i < 4 else 1 if i < 10 else 2 for i in flat]
    assert sum(a != b for a, b in zip(owner, owner[1:])) == 2  # three runs: one per file
    assert flat != torch.cat([idx for idx, _ in sampler.epoch_batches(1)]).tolist()
    halves = [BlockBatchSampler([4, 6, 5], 5, 0, r, 2).epoch_batches(0) for r in range(2)]
    assert all(sorted(torch.cat([h[i][0] for h in halves]).tolist()) == sorted(batches[i][0].tolist())
               for i in range(3))


def test_training_streams_cifar_pickles(tmp_path, no_network):
    from test_data_stream import _write_cifar

    _write_cifar(tmp_path / "c")
    trainer, result = _fit(tmp_path, "c", dataset="cifar10", data_dir=str(tmp_path / "c"), stream=True)
    assert result.status == "completed" and trainer.step == 2 * 4 and 0 <= result.metrics["test_acc"] <= 1
