"""K-FAC, natural-gd, SAM, Newton and saddle-free Newton under torchrun (2 gloo processes): each
process steps on its half of a float64 batch, the optimizers all-reduce gradients and curvature
(K-FAC's factors weighted by examples, natural-gd's and Newton's products and losses, the
adaptive damping's trial loss), and both ranks end with the parameters and the damping history of
one process stepping on the whole batch (tests/dist_second_order.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from clihelp import two_rank_results
from dist_second_order import CASES, problem, train

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).with_name("dist_second_order.py")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return two_rank_results(SCRIPT, tmp_path_factory.mktemp("dist2"))


@pytest.mark.parametrize("name", list(CASES))
def test_two_processes_on_halves_take_the_one_process_steps(ranks, name):
    ref = train(name)
    start = problem()[0]
    moved = max(float((a - p.detach()).abs().max()) for a, p in zip(ref["params"], start.parameters()))
    assert moved > 1e-3  # the steps did something
    for got in ranks:
        for a, b in zip(got[name]["params"], ref["params"]):
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-12), (name, float((a - b).abs().max()))
        # SAM has no damping, K-FAC and SAM no trial point; the trial losses as close as the weights
        for key, rel in (("damping", 1e-12), ("trial", 1e-10)):
            if None in ref[key]:
                assert got[name][key] == ref[key], (name, key)
            else:
                assert got[name][key] == pytest.approx(ref[key], rel=rel), (name, key)


@pytest.mark.parametrize("name", ["natural-gd", "natural-gd-lm", "newton", "newton-cg", "saddle-free-newton"])
def test_the_adaptive_damping_moves_in_these_cases(name):
    """The cases above exercise the Levenberg-Marquardt rule: the damping changes during the run
    (so 2 processes equal to 1 means every rank took the same accept/reject decisions)."""
    start = CASES[name][1]["damping"]
    dampings = train(name)["damping"]
    assert len(set(dampings)) > 1 and any(d != start for d in dampings), dampings


def test_reduce_over_ranks_sums_or_averages_in_one_call_and_keeps_the_inputs(ranks):
    for got in ranks:
        assert torch.equal(got["reduce-sum"][0], torch.full((2, 3), 3.0, dtype=torch.float64))
        assert torch.equal(got["reduce-sum"][1], torch.arange(4, dtype=torch.float64) * 3)
        assert torch.equal(got["reduce-mean"][1], torch.arange(4, dtype=torch.float64) * 1.5)
    assert torch.equal(ranks[1]["inputs-after"][0], torch.full((2, 3), 2.0, dtype=torch.float64))
