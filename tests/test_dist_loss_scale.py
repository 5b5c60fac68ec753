"""fp16 loss scaling under torchrun (tests/dist_loss_scale.py, 2 gloo processes): when one rank's
gradient overflows float16 at loss scale 1, EVERY rank raises GradientOverflow (and so skips the
step together) instead of that rank alone, whichever rank it is; with no overflow no rank
raises, each returns the float32 gradient, and the ranks' next collective still pairs up."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from clihelp import fp16_autocast_on_cpu, two_rank_results

pytestmark = pytest.mark.skipif(not fp16_autocast_on_cpu(), reason="this torch has no CPU fp16 autocast")

SCRIPT = Path(__file__).with_name("dist_loss_scale.py")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return two_rank_results(SCRIPT, tmp_path_factory.mktemp("loss_scale"))


def test_no_overflow_no_rank_skips_and_the_gradient_is_the_float32_one(ranks):
    from torch import nn

    torch.manual_seed(0)
    layer = nn.Linear(3, 2)
    layer(torch.ones(4, 3)).sum().backward()
    for r in ranks:
        assert not r["none"]["raised"]
        for g, p in zip(r["none"]["grad"], layer.parameters()):
            torch.testing.assert_close(g, p.grad, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("which", ["last", "first"])
def test_an_overflow_on_one_rank_makes_every_rank_skip(ranks, which):
    assert all(r[which]["raised"] for r in ranks)


def test_the_ranks_stay_paired_in_the_next_collective(ranks):
    for r in ranks:
        assert float(r["after"]) == 3.0
