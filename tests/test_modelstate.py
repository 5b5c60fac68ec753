"""gradlab.core.modelstate.model_state: every temporary change to a model is undone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradlab.core.modelstate import BATCH_NORMS, DROPOUTS, model_state


class _Net(nn.Sequential):
    """Linear, BatchNorm, Dropout, ReLU, Linear, then an InstanceNorm over (N, 1, 2)."""

    def forward(self, x):
        h = x
        for m in list(self)[:5]:
            h = m(h)
        return self[5](h.unsqueeze(1)).squeeze(1)


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    net = _Net(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Dropout(0.5), nn.ReLU(), nn.Linear(6, 2),
               nn.InstanceNorm1d(1, track_running_stats=True))
    net.train()
    net[2].eval()  # mixed modes must come back exactly
    net[0].bias.requires_grad_(False)  # and mixed flags
    with torch.no_grad():
        net(torch.randn(8, 4))  # non-trivial running statistics
    return net


def _state(net):
    modes = [m.training for m in net.modules()]
    flags = [p.requires_grad for p in net.parameters()]
    bufs = [b.clone() for b in net.buffers()]
    tracking = [m.track_running_stats for m in net.modules() if hasattr(m, "track_running_stats")]
    return modes, flags, bufs, tracking


def _same(a, b) -> bool:
    return a[0] == b[0] and a[1] == b[1] and a[3] == b[3] and all(torch.equal(x, y) for x, y in zip(a[2], b[2]))


def test_sets_what_was_asked_and_restores_it():
    net = _net()
    before = _state(net)
    with model_state(net, train=False, requires_grad=False) as m:
        assert m is net
        assert not any(mod.training for mod in net.modules())
        assert not any(p.requires_grad for p in net.parameters())
    assert _same(_state(net), before)
    with model_state(net, train=True, requires_grad=True):
        assert all(mod.training for mod in net.modules()) and all(p.requires_grad for p in net.parameters())
    assert _same(_state(net), before)
    with model_state(net):  # nothing asked: changes made inside are undone all the same
        net.eval()
        net[4].weight.requires_grad_(False)
    assert _same(_state(net), before)


def test_restores_after_an_exception():
    net = _net()
    before = _state(net)
    with pytest.raises(RuntimeError, match="inside"):
        with model_state(net, train=False, requires_grad=False, keep_bn_stats=True):
            net[1].running_mean.add_(5.0)
            net.train()
            raise RuntimeError("inside")
    assert _same(_state(net), before)


def test_keep_bn_stats_freezes_batchnorm_and_restores_every_running_buffer():
    net = _net()
    before = _state(net)
    x = torch.randn(16, 4)
    with model_state(net, train=True, keep_bn_stats=True):
        net(x)
        h = net[0](x)
        # train mode normalises with the batch's own statistics
        ref = torch.nn.functional.batch_norm(h, None, None, net[1].weight, net[1].bias, training=True)
        torch.testing.assert_close(net[1](h), ref)
        assert not net[1].track_running_stats
        net[5].running_var.mul_(3.0)  # a layer that is not BatchNorm: restored by copy
        net[5].num_batches_tracked += 1
    assert _same(_state(net), before)
    # without keep_bn_stats a train-mode pass does update them
    with model_state(net, train=True):
        net(x)
    assert not torch.equal(net[1].running_mean, before[2][0])


def test_buffers_are_restored_in_place():
    net = _net()
    ptr = net[1].running_mean.data_ptr()
    with model_state(net, train=True, keep_bn_stats=True):
        net[1].running_mean.fill_(7.0)
    assert net[1].running_mean.data_ptr() == ptr and not bool((net[1].running_mean == 7.0).any())


def test_nested_contexts_each_restore_what_they_found():
    net = _net()
    before = _state(net)
    with model_state(net, train=False, requires_grad=False):
        inner_before = _state(net)
        with model_state(net, train=True):
            for m in net.modules():
                if isinstance(m, DROPOUTS):
                    m.eval()
            assert net[1].training and not net[2].training
        assert _same(_state(net), inner_before)
        assert not any(mod.training for mod in net.modules())
    assert _same(_state(net), before)


def test_a_module_train_override_is_honoured():
    class FrozenBN(nn.Module):  # a common pattern: BatchNorm kept in eval even when training
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(3)

        def train(self, mode: bool = True):
            super().train(mode)
            self.bn.eval()
            return self

    net = nn.Sequential(nn.Linear(2, 3), FrozenBN())
    net.eval()
    with model_state(net, train=True):
        assert net[0].training and not net[1].bn.training
    assert not any(m.training for m in net.modules())


def test_families_are_public_classes():
    assert all(cls.__module__.startswith("torch.nn") and not cls.__name__.startswith("_") for cls in BATCH_NORMS + DROPOUTS)
    assert isinstance(nn.SyncBatchNorm(3), BATCH_NORMS) and isinstance(nn.AlphaDropout(0.1), DROPOUTS)
