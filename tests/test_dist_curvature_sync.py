"""The distributed curvature operator's one collective per product (tests/dist_curvature_sync.py
under torchrun, 2 and 3 gloo processes, 3 holding uneven shares): seeded solvers give one process's results with the ranks'
vectors equal bit for bit and no broadcast; inputs that differ between the ranks are detected
by the fingerprint in the product's one collective (an all-gather for small products, an
all-reduce for large ones: both are run), and rank 0's are then used (as the broadcast before
every product did); the fingerprint tells apart blocks that differ in one bit or in the order of
two entries. With 3 ranks the all-gather's rank-order sum is checked to give the same bits on
every rank, and a block that differs on the last rank alone is caught."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from clihelp import rank_results
from dist_curvature_sync import reference

SCRIPT = Path(__file__).with_name("dist_curvature_sync.py")


@pytest.fixture(scope="module", params=[2, 3], ids=["2ranks", "3ranks"])
def both_paths(request, tmp_path_factory):
    return rank_results(SCRIPT, tmp_path_factory.mktemp("sync"), request.param)


@pytest.fixture(params=["gather", "allreduce"])
def ranks(request, both_paths):
    return [r[request.param] for r in both_paths]


@pytest.fixture(scope="module")
def one():
    return reference()


def test_seeded_top_eigenpairs_equal_one_process_and_agree_bit_for_bit(ranks, one):
    for r in ranks:
        torch.testing.assert_close(r["values"], one["values"], rtol=1e-6, atol=1e-9)
        assert r["products"] == one["products"]
        assert r["mismatches_after_eigsh"] == 0
    for r in ranks[1:]:  # the same bits on every rank
        assert torch.equal(ranks[0]["vectors"], r["vectors"])
        assert torch.equal(ranks[0]["values"], r["values"])


def test_an_input_that_differs_between_ranks_is_detected_and_rank_0s_is_used(ranks, one):
    for r in ranks:
        assert r["mismatches_after_product"] == 1
        torch.testing.assert_close(r["product"], one["product"], rtol=1e-6, atol=1e-9)  # rank 0's input
        # afterwards every input is broadcast first: the unseeded probes are rank 0's
        assert r["mismatches_after_trace"] == 1 and r["broadcast_inputs"]
    torch.testing.assert_close(ranks[0]["trace"], one["trace"], rtol=1e-6, atol=1e-9)


def test_an_input_that_differs_on_the_last_rank_alone_is_caught(ranks, one):
    for r in ranks:
        assert r["mismatches_last_differs"] == 1
        torch.testing.assert_close(r["product_last_differs"], one["product_last_differs"], rtol=1e-6, atol=1e-9)
    for r in ranks[1:]:
        assert torch.equal(ranks[0]["product_last_differs"], r["product_last_differs"])


def test_the_fingerprint_sees_one_bit_and_a_swap():
    from gradlab.core.distributed import DistInfo
    from gradlab.curvature.distributed import DistributedOperator
    from gradlab.curvature.operator import DenseOperator

    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        dense = DenseOperator(torch.eye(6, dtype=dtype))
        dense.num_samples = 1
        op = DistributedOperator(dense, DistInfo())
        V = torch.linspace(-1, 1, 12, dtype=dtype).reshape(6, 2)
        f = op._fingerprint(V)
        assert f.dtype == dtype and f.shape == (16,) and torch.equal(f, op._fingerprint(V.clone()))
        ulp = V.clone()
        ulp.view(torch.int16 if dtype == torch.bfloat16 else torch.int32)[0, 0] += 1  # one bit
        swap = V.clone()
        swap[[1, 4], 0] = swap[[4, 1], 0]
        for W in (ulp, swap, -V):
            assert not torch.equal(f, op._fingerprint(W))
        assert bool(((f >= 0) & (f <= 255) & (f == f.round())).all())  # exact small integers
