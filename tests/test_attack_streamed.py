"""An attack over a streamed test set: the same table as the in-memory sweep over the same batches."""

import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gradlab.attacks.report import robustness_sweep
from gradlab.attacks.streamed import streamed_robustness


def _model_and_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3))
    with torch.no_grad():
        model[1].weight.mul_(8)  # inputs matter: the predictions vary and an attack can move them
    x = torch.rand(23, 3, 2, 2)
    y = model(x).argmax(1)  # mostly right: attacks have examples to break
    y[::5] = (y[::5] + 1) % 3
    return model, x, y


@pytest.mark.parametrize("attack,opts", [
    ("pgd", {"steps": 3, "seed": 1}),  # random start: the seed restarts its generator per batch
    ("fgsm", {}),
    ("deepfool", {"steps": 5}),  # a minimum-norm attack: one search serves every eps
])
def test_streamed_robust_accuracy_equals_in_memory(attack, opts):
    model, x, y = _model_and_data()
    eps = [0.0, 0.05, 0.3]
    mem = robustness_sweep(model, x, y, attack, eps, batch_size=8, keep_adv=False, **opts).table
    loader = DataLoader(TensorDataset(x, y), batch_size=8)  # 3 batches: 8, 8, 7
    seen = []
    streamed = streamed_robustness(model, loader, attack, eps, progress=seen.append, **opts)
    assert seen == [8, 16, 23]
    assert list(streamed.columns) == list(mem.columns)
    pd.testing.assert_frame_equal(streamed, mem, check_dtype=False, rtol=1e-6)
    assert streamed["robust_acc"].iloc[-1] < streamed["clean_acc"].iloc[-1]  # the attack did something
