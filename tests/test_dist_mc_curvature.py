"""Monte Carlo curvature under torchrun (2 gloo processes): K-FAC with ``fisher_type="mc"`` and
natural-gd with the sampled Fisher draw their labels on the gathered global batch, so two
processes on the strided halves of a batch (16 and 15 examples, equal and unequal shares) end
with the parameters of one process on the whole batch (tests/dist_mc_curvature.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist_mc_curvature import CASES, problem, train

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).with_name("dist_mc_curvature.py")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("distmc")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(SCRIPT.parent), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(SCRIPT), str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_draw_the_labels_one_process_draws(ranks, case):
    ref = train(case)
    start = problem()[0]
    assert max(float((a - p.detach()).abs().max()) for a, p in zip(ref, start.parameters())) > 1e-3
    for got in ranks:
        for a, b in zip(got[case], ref):
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-12), (case, float((a - b).abs().max()))


def test_global_rows_interleaves_strided_shares_and_concatenates_others(ranks):
    rows = torch.arange(10, dtype=torch.float64).reshape(5, 2)
    for r, got in enumerate(ranks):
        whole, mine = got["strided"]
        assert torch.equal(whole, rows) and torch.equal(mine, rows[r::2])
        whole, mine = got["block"]
        assert torch.equal(whole, rows) and torch.equal(mine, rows[:1] if r == 0 else rows[1:])
