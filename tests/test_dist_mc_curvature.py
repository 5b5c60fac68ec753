"""Monte Carlo curvature under torchrun (2 gloo processes): K-FAC with ``fisher_type="mc"`` and
natural-gd with the sampled Fisher draw their labels on the gathered global batch, so two
processes on the strided halves of a batch (16 and 15 examples, equal and unequal shares) end
with the parameters of one process on the whole batch (tests/dist_mc_curvature.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from clihelp import two_rank_results
from dist_mc_curvature import CASES, problem, train

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).with_name("dist_mc_curvature.py")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return two_rank_results(SCRIPT, tmp_path_factory.mktemp("distmc"))


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
