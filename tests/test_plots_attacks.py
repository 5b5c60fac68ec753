"""The attack image grid shows examples the model classified correctly before the attack."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradlab.attacks.plots import adversarial_grid, grid_examples


def _model_and_data():
    """A fixed linear classifier on 12 random 1x4x4 images, labels chosen so that examples
    0, 1, 2 and 5 are misclassified before any attack."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    x = torch.rand(12, 1, 4, 4)
    with torch.no_grad():
        pred = model(x).argmax(1)
    y = pred.clone()
    wrong = torch.tensor([0, 1, 2, 5])
    y[wrong] = (pred[wrong] + 1) % 3
    return model, x, y


def test_grid_shows_only_examples_correct_before_the_attack():
    model, x, y = _model_and_data()
    with torch.no_grad():
        pred_clean = model(x).argmax(1)
    assert (pred_clean != y).tolist()[:6] == [True, True, True, False, False, True]
    x_adv = (x + 0.1 * torch.sign(torch.randn_like(x))).clamp(0, 1)
    with torch.no_grad():
        pred_adv = model(x_adv).argmax(1)
    fig = adversarial_grid(x, x_adv, y, pred_clean, pred_adv, n=4, eps=0.1)
    top = fig.axes[:4]  # row-major 3 x 4: the first row holds the clean images
    shown = [3, 4, 6, 7]  # the first four the model got right
    for ax, i in zip(top, shown):
        torch.testing.assert_close(torch.as_tensor(ax.images[0].get_array()), x[i, 0])
        assert ax.title.get_color() == "black"
    for col, i in enumerate(shown):  # the adversarial row and the perturbation row match them
        torch.testing.assert_close(torch.as_tensor(fig.axes[4 + col].images[0].get_array()), x_adv[i, 0])
        torch.testing.assert_close(torch.as_tensor(fig.axes[8 + col].images[0].get_array()), (x_adv[i] - x[i])[0])
    assert "correct before the attack" in fig.get_suptitle()


def test_grid_fills_with_wrong_examples_only_when_too_few_were_right():
    y = torch.tensor([0, 1, 2, 0])
    pred = torch.tensor([1, 1, 0, 0])
    assert grid_examples(y, pred, 2) == [1, 3]
    assert grid_examples(y, pred, 3) == [1, 3, 0]
    x = torch.rand(4, 1, 3, 3)
    fig = adversarial_grid(x, x, y, pred, pred, n=3)
    assert [ax.title.get_color() for ax in fig.axes[:3]] == ["black", "black", "red"]
    assert "(wrong)" in fig.axes[2].get_title()
    assert "2 of 3 shown correct before the attack" in fig.get_suptitle()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from gradlab_cli.main import main

    runs = tmp_path_factory.mktemp("runs")
    with pytest.raises(SystemExit) as exc:
        main(["train", "--epochs", "1", "--max-train", "200", "--runs-dir", str(runs), "--quiet", "--name", "tiny"])
    assert exc.value.code == 0
    return runs


def test_attack_command_gives_the_grid_every_example(trained, monkeypatch, capsys):
    """`gradlab attack --grid N` passes all attacked examples, so the grid can pick correct ones."""
    import gradlab.attacks.plots as plots
    from gradlab_cli.main import main

    seen = []
    real = plots.adversarial_grid

    def spy(x, x_adv, y, pred_clean, pred_adv, n=8, **kw):
        seen.append((x.shape[0], n, grid_examples(y, pred_clean, n), (pred_clean == y).tolist()))
        return real(x, x_adv, y, pred_clean, pred_adv, n=n, **kw)

    monkeypatch.setattr(plots, "adversarial_grid", spy)
    with pytest.raises(SystemExit) as exc:
        main(["attack", "fgsm", "--eps", "0.1", "--n-examples", "60", "--grid", "4", "--runs-dir", str(trained),
              "--quiet"])
    assert exc.value.code == 0, capsys.readouterr().err
    (count, n, idx, ok), = seen
    assert count == 60 and n == 4
    assert all(ok[i] for i in idx) and not all(ok)  # a 1-epoch model gets some wrong; none of them shown
