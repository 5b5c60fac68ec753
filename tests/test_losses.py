"""``--loss cross-entropy|mse``: the loss module, its curvature against dense references, and a
run trained with mse whose probes and attacks default to mse."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from clihelp import cli, train_in_process
from gradlab.core.errors import GradlabError
from gradlab.core.losses import check_loss, loss_fn, mse_one_hot, per_example_loss, run_loss
from gradlab.curvature import dense_hessian
from gradlab.curvature.likelihood import likelihood_of


def tiny():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    g = torch.Generator().manual_seed(1)
    return net, torch.rand(12, 4, dtype=torch.float64, generator=g), torch.randint(0, 3, (12,), generator=g)


def test_mse_is_the_mean_over_examples_of_the_sum_over_classes():
    z = torch.randn(6, 4, dtype=torch.float64)
    y = torch.tensor([0, 3, 1, 1, 2, 0])
    ref = sum(float(((z[n] - torch.eye(4, dtype=torch.float64)[y[n]]) ** 2).sum()) for n in range(6)) / 6
    assert float(mse_one_hot(z, y)) == pytest.approx(ref)
    assert float(mse_one_hot(z, y, reduction="sum")) == pytest.approx(6 * ref)
    assert float(per_example_loss("mse")(z, y).mean()) == pytest.approx(ref)
    assert float(mse_one_hot(z, F.one_hot(y, 4).double())) == pytest.approx(ref)  # float targets as given
    assert float(mse_one_hot(z, y)) == pytest.approx(4 * float(F.mse_loss(z, F.one_hot(y, 4).double())))
    assert loss_fn("cross-entropy") is F.cross_entropy and loss_fn(None) is F.cross_entropy


def test_bad_names_and_old_runs():
    with pytest.raises(GradlabError, match="invalid loss: 'l1'"):
        check_loss("l1")
    assert run_loss({}) == "cross-entropy" and run_loss({"loss": "mse"}) == "mse"


def test_mse_hessian_against_a_dense_reference():
    """The Hessian of the network's mse loss (probe engine) equals torch.func's dense Hessian of
    the loss written out by hand as a function of the flat parameters."""
    from torch.func import functional_call

    net, x, y = tiny()
    H = dense_hessian(net, mse_one_hot, (x, y))
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for p in net.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in net.parameters()])

    def f(v):
        parts, i = {}, 0
        for n, s in zip(names, shapes):
            parts[n] = v[i : i + s.numel()].reshape(s)
            i += s.numel()
        z = functional_call(net, parts, (x,))
        return ((z - torch.eye(3, dtype=z.dtype)[y]) ** 2).sum(1).mean()

    ref = torch.func.hessian(f)(flat)
    assert torch.allclose(torch.as_tensor(H, dtype=torch.float64), ref, atol=1e-10)


def test_mse_gauss_newton_and_likelihood():
    """The GGN of mse is J^T (2I/N) J (dense check), and likelihood_of reads mse_one_hot as the
    Gaussian with factor 1/N."""
    from gradlab.curvature.matrices import curvature_matrix

    net, x, y = tiny()
    lik = likelihood_of(mse_one_hot)
    assert lik.kind == "mse" and lik.factor(torch.zeros(12, 3)) == pytest.approx(1 / 12)
    z = net(x).detach()
    assert torch.allclose(lik.output_gradients(z, y), torch.func.vmap(torch.func.grad(
        lambda zi, yi: mse_one_hot(zi[None], yi[None])))(z, y))
    G = curvature_matrix("ggn", net, mse_one_hot, [(x, y)]).to_dense()
    params = dict(net.named_parameters())
    jac = torch.func.jacrev(lambda p: torch.func.functional_call(net, p, (x,)))({k: v.detach() for k, v in params.items()})
    J = torch.cat([jac[k].reshape(12 * 3, -1) for k in params], dim=1)
    ref = J.T @ J * (2 / 12)
    assert torch.allclose(torch.as_tensor(G, dtype=torch.float64), ref, atol=1e-10)


ARGS = ["--epochs", "1", "--batch-size", "32", "--width", "8", "--depth", "1", "--set", "max_train=96"]


@pytest.fixture(scope="module")
def mse_run(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    return runs, train_in_process("--runs-dir", runs, "--loss", "mse", *ARGS)


def test_mse_run_records_its_loss_and_probes_default_to_it(mse_run, capsys):
    runs, path = mse_run
    cfg = yaml.safe_load((path / "config.yaml").read_text())["config"]
    assert cfg["loss"] == "mse"
    res = cli(capsys, "probe", "hessian", "--run", path, "--runs-dir", runs, "--top-k", "1", "--no-trace",
              "--batches", "1", "--batch-size", "32", "--quiet")
    assert res.code == 0, res.err
    pcfg = yaml.safe_load((res.run_path / "config.yaml").read_text())["config"]
    assert pcfg["loss"] == "mse"
    # the probed loss is the mse of the run's model on those examples, not its cross-entropy
    from gradlab.training.load import load_run
    import pandas as pd

    loaded = load_run(str(path), str(runs))
    xb, yb = loaded.data.x_train[:32], loaded.data.y_train[:32]
    with torch.no_grad():
        out = loaded.model.eval()(xb)
    summary = pd.read_csv(res.run_path / "summary.csv")
    assert float(summary["loss"].iloc[0]) == pytest.approx(float(mse_one_hot(out, yb)), rel=1e-4)
    res_ce = cli(capsys, "probe", "hessian", "--run", path, "--runs-dir", runs, "--top-k", "1", "--no-trace",
                 "--batches", "1", "--batch-size", "32", "--quiet", "--loss", "cross-entropy")
    assert res_ce.code == 0, res_ce.err
    ce = float(pd.read_csv(res_ce.run_path / "summary.csv")["loss"].iloc[0])
    assert ce == pytest.approx(float(F.cross_entropy(out, yb)), rel=1e-4)


def test_attack_on_an_mse_run_ascends_mse(mse_run, capsys):
    runs, path = mse_run
    res = cli(capsys, "attack", "fgsm", "--run", path, "--runs-dir", runs, "--eps", "0.1", "--n-examples", "8",
              "--quiet")
    assert res.code == 0, res.err
    assert yaml.safe_load((res.run_path / "config.yaml").read_text())["config"]["loss"] == "mse"
    from gradlab.attacks import build_attack

    net, x, y = tiny()
    att = build_attack("fgsm", net.float(), 0.1, criterion="mse")
    with att.session(x.float(), y) as (x0, y0):
        obj = att.objective(net(x0))
    assert torch.allclose(obj, per_example_loss("mse")(net(x.float()), y))


@pytest.mark.parametrize("args", [["train", "--loss", "l2"], ["probe", "hessian", "--loss", "hinge"]])
def test_bad_loss_is_one_line_exit_2(args, capsys, tmp_path):
    res = cli(capsys, *args, "--runs-dir", tmp_path)
    assert res.code == 2
    assert len(res.err.strip().splitlines()) == 1 and "loss" in res.err, res.err
    assert not any(tmp_path.iterdir())
