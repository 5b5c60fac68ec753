"""Landscape directions and grid evaluation against exact references (float64)."""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradlab.core.errors import GradlabError
from gradlab.landscape.directions import (
    dot,
    filter_normalize,
    flatten,
    interp_direction,
    pca_directions,
    plane_through,
    random_directions,
    weights_of,
)
from gradlab.landscape.grid import evaluate_grid, grid_coords, make_axes


def small_cnn():
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 16, 4)
    ).double()
    # give BatchNorm non-trivial running statistics so eval mode matters
    m.train()
    with torch.no_grad():
        m(torch.rand(32, 1, 4, 4, dtype=torch.float64) * 2)
    m.eval()
    return m


def data(n=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 4, 4, generator=g, dtype=torch.float64), torch.randint(0, 4, (n,), generator=g)


def test_quadratic_model_landscape_equals_closed_form():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, 5, generator=g, dtype=torch.float64)
    t = torch.randn(40, generator=g, dtype=torch.float64)
    model = nn.Linear(5, 1).double()
    d1 = {"weight": torch.randn(1, 5, generator=g, dtype=torch.float64), "bias": torch.randn(1, generator=g, dtype=torch.float64)}
    d2 = {"weight": torch.randn(1, 5, generator=g, dtype=torch.float64), "bias": torch.randn(1, generator=g, dtype=torch.float64)}
    axes = make_axes(-1.5, 1.5, 7, 2)
    coords = grid_coords(axes)
    mse = lambda out, y: F.mse_loss(out.squeeze(-1), y)  # noqa: E731
    # two batches of different sizes: the loss is the mean over all 40 samples
    batches = [(X[:25], t[:25]), (X[25:], t[25:])]
    res = evaluate_grid(model, [d1, d2], coords, batches, loss_fn=mse)
    # closed form: residual r = r0 + x a1 + y a2 is affine in (x, y), the loss its mean square
    Xn, tn = X.numpy(), t.numpy()
    w, b = model.weight.detach().numpy()[0], model.bias.detach().numpy()[0]
    r0 = Xn @ w + b - tn
    a1 = Xn @ d1["weight"].numpy()[0] + d1["bias"].numpy()[0]
    a2 = Xn @ d2["weight"].numpy()[0] + d2["bias"].numpy()[0]
    for (x, y), got in zip(coords.tolist(), res.loss.tolist()):
        assert got == pytest.approx(np.mean((r0 + x * a1 + y * a2) ** 2), rel=1e-12)
    assert torch.isnan(res.acc).all()  # regression: no accuracy


def test_filter_normalised_norms_match_weight_filters():
    m = small_cnn()
    w = weights_of(m)
    (d,) = random_directions(m, 1, generator=torch.Generator().manual_seed(3))
    for n, t in w.items():
        if t.ndim >= 2:
            torch.testing.assert_close(d[n].reshape(t.shape[0], -1).norm(dim=1), t.reshape(t.shape[0], -1).norm(dim=1))
            assert not torch.equal(d[n], t)  # a random direction, not the weights themselves
        else:
            assert torch.count_nonzero(d[n]) == 0  # biases and BN parameters stay put
    (dbn,) = random_directions(m, 1, include_bn=True, generator=torch.Generator().manual_seed(3))
    for n, t in w.items():
        if t.ndim == 1:
            assert float(dbn[n].norm()) == pytest.approx(float(t.norm()), rel=1e-12)
    # the normalisation itself: a direction whose filters have arbitrary scales
    raw = {n: torch.randn_like(t) * (torch.arange(t.shape[0], dtype=t.dtype) + 1).view(-1, *[1] * (t.ndim - 1))
           for n, t in w.items()}
    fn = filter_normalize(raw, w)
    torch.testing.assert_close(fn["4.weight"].norm(dim=1), w["4.weight"].norm(dim=1))


def reference_loop(model, dirs, coords, batches):
    """Plain per-point loop: a fresh copy with load_state_dict at every point."""
    out_l, out_a = [], []
    base = copy.deepcopy(model.state_dict())
    for c in coords.tolist():
        m = copy.deepcopy(model)
        sd = dict(base)
        for n, _ in model.named_parameters():
            sd[n] = base[n] + sum(ck * d[n] for ck, d in zip(c, dirs))
        m.load_state_dict(sd)
        m.eval()
        tot_l = tot_a = 0.0
        with torch.no_grad():
            for x, y in batches:
                o = m(x)
                tot_l += float(F.cross_entropy(o, y)) * len(y)
                tot_a += float((o.argmax(1) == y).sum())
        n = sum(len(y) for _, y in batches)
        out_l.append(tot_l / n)
        out_a.append(tot_a / n)
    return torch.tensor(out_l, dtype=torch.float64), torch.tensor(out_a, dtype=torch.float64)


@pytest.mark.parametrize("method,ppc", [("inplace", 1), ("functional", 1), ("functional", 4), ("inplace", 3)])
def test_grid_equals_plain_loop_and_leaves_model_untouched(method, ppc):
    m = small_cnn()
    m.train()
    m[1].eval()  # a mixed mode that must survive
    m[0].bias.requires_grad_(False)
    before_p = {n: p.detach().clone() for n, p in m.named_parameters()}
    before_b = {n: b.clone() for n, b in m.named_buffers()}
    flags = [mod.training for mod in m.modules()]
    x, y = data()
    batches = [(x[:10], y[:10]), (x[10:], y[10:])]
    dirs = random_directions(m, 2, include_bn=True, generator=torch.Generator().manual_seed(5))
    coords = grid_coords(make_axes(-1.0, 1.0, 5, 2))
    ref_l, ref_a = reference_loop(m, dirs, coords, batches)
    res = evaluate_grid(m, dirs, coords, batches, method=method, points_per_call=ppc)
    torch.testing.assert_close(res.loss, ref_l, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(res.acc, ref_a)
    for n, p in m.named_parameters():
        assert torch.equal(p.detach(), before_p[n]) and p.grad is None
    for n, b in m.named_buffers():
        assert torch.equal(b, before_b[n])
    assert [mod.training for mod in m.modules()] == flags
    assert m[0].bias.requires_grad is False and m[0].weight.requires_grad is True


@pytest.mark.parametrize("method", ["inplace", "functional"])
def test_grid_around_another_centre(method):
    m = small_cnn()
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    g = torch.Generator().manual_seed(7)
    centre = {n: t + 0.1 * torch.randn(t.shape, generator=g, dtype=t.dtype) for n, t in before.items()}
    moved = copy.deepcopy(m)
    moved.load_state_dict({**m.state_dict(), **centre})
    x, y = data()
    dirs = random_directions(m, 2, generator=torch.Generator().manual_seed(1))  # biases: zero, never written
    coords = grid_coords(make_axes(-0.5, 0.5, 3, 2))
    ref_l, ref_a = reference_loop(moved, dirs, coords, [(x, y)])
    res = evaluate_grid(m, dirs, coords, [(x, y)], centre=centre, method=method)
    torch.testing.assert_close(res.loss, ref_l, rtol=1e-10, atol=1e-12)
    for n, p in m.named_parameters():
        assert torch.equal(p.detach(), before[n])


def test_grid_split_across_ranks(monkeypatch):
    """Under torchrun each rank evaluates every world-th point; the sum over ranks is the grid."""
    m = small_cnn()
    x, y = data()
    dirs = random_directions(m, 2, generator=torch.Generator().manual_seed(0))
    coords = grid_coords(make_axes(-1.0, 1.0, 3, 2))
    full = evaluate_grid(m, dirs, coords, [(x, y)])
    dist = torch.distributed
    parts = []
    for rank in (0, 1):
        monkeypatch.setattr(dist, "is_initialized", lambda: True)
        monkeypatch.setattr(dist, "get_rank", lambda r=rank: r)
        monkeypatch.setattr(dist, "get_world_size", lambda: 2)
        monkeypatch.setattr(dist, "all_reduce", lambda t: None)  # keep this rank's share only
        parts.append(evaluate_grid(m, dirs, coords, [(x, y)]))
    assert torch.count_nonzero(parts[0].loss[1::2]) == 0 and torch.count_nonzero(parts[1].loss[0::2]) == 0
    torch.testing.assert_close(parts[0].loss + parts[1].loss, full.loss, rtol=0, atol=0)
    torch.testing.assert_close(parts[0].acc + parts[1].acc, full.acc, rtol=0, atol=0)


def test_model_restored_after_an_exception():
    m = small_cnn()
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    x, y = data()

    def bad_loss(out, target):
        raise RuntimeError("boom")

    dirs = random_directions(m, 1, generator=torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match="boom"):
        evaluate_grid(m, dirs, torch.tensor([[0.5]], dtype=torch.float64), [(x, y)], loss_fn=bad_loss)
    for n, p in m.named_parameters():
        assert torch.equal(p.detach(), before[n])


def test_start_point_is_on_the_grid_and_bad_axes_rejected():
    axes = make_axes(-1.0, 1.0, 21, 2)
    assert axes[0][10].item() == 0.0 and torch.equal(axes[0], axes[1])  # aligned axes
    m = small_cnn()
    x, y = data()
    coords = grid_coords(axes)
    centre = int(((coords[:, 0] == 0) & (coords[:, 1] == 0)).nonzero())
    res = evaluate_grid(m, random_directions(m, 2), coords[centre : centre + 1], [(x, y)])
    with torch.no_grad():
        assert res.loss.item() == pytest.approx(float(F.cross_entropy(m(x), y)), rel=1e-14)
    with pytest.raises(GradlabError, match="steps"):
        make_axes(-1, 1, 1, 2)
    with pytest.raises(GradlabError, match="empty range"):
        make_axes(1, 1, 5, 2)
    with pytest.raises(GradlabError, match="dims"):
        make_axes(-1, 1, 5, 3)


def test_pca_directions_orthonormal_and_recover_a_planar_trajectory():
    m = small_cnn()
    final = {n: t.clone() for n, t in weights_of(m).items()}
    names = list(final)
    g = torch.Generator().manual_seed(0)
    u = {n: torch.randn(t.shape, generator=g, dtype=torch.float64) for n, t in final.items()}
    v = {n: torch.randn(t.shape, generator=g, dtype=torch.float64) for n, t in final.items()}
    ts = torch.linspace(0, 1, 9, dtype=torch.float64)
    traj = [{n: final[n] + (1 - s) * 2 * u[n] + math.sin(3 * s) * v[n] for n in names} for s in ts.tolist()]
    dirs, coords, explained = pca_directions(traj, final)
    F1, F2 = flatten(dirs[0], names), flatten(dirs[1], names)
    assert float(F1 @ F1) == pytest.approx(1.0, abs=1e-12)
    assert float(F2 @ F2) == pytest.approx(1.0, abs=1e-12)
    assert float(F1 @ F2) == pytest.approx(0.0, abs=1e-12)
    # the trajectory lies in span(u, v), so the projection reconstructs it exactly
    for t, c in zip(traj, coords):
        diff = flatten(t, names) - flatten(final, names)
        torch.testing.assert_close(c[0] * F1 + c[1] * F2, diff, rtol=1e-9, atol=1e-9)
    assert sum(explained) == pytest.approx(1.0, abs=1e-9)
    with pytest.raises(GradlabError, match="checkpoints"):
        pca_directions(traj[:2], final)


def test_plane_through_three_vertices_and_interp():
    m = small_cnn()
    w = weights_of(m)
    g = torch.Generator().manual_seed(2)
    vs = [{n: t + torch.randn(t.shape, generator=g, dtype=torch.float64) for n, t in w.items()} for _ in range(3)]
    centre, (e1, e2), coords = plane_through(vs)
    assert dot(e1, e2) == pytest.approx(0.0, abs=1e-10) and dot(e1, e1) == pytest.approx(1.0)
    for v, c in zip(vs, coords.tolist()):
        for n in w:
            torch.testing.assert_close(centre[n] + c[0] * e1[n] + c[1] * e2[n], v[n])
    d = interp_direction(vs[0], vs[1])
    for n in w:
        torch.testing.assert_close(vs[0][n] + d[n], vs[1][n])
    with pytest.raises(GradlabError, match="collinear"):
        plane_through([vs[0], vs[1], {n: 2 * vs[1][n] - vs[0][n] for n in w}])


# --- the commands, through the real entry point ------------------------------------------------
import shutil  # noqa: E402

import pandas as pd  # noqa: E402

from clihelp import cli  # noqa: E402


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny MLP on 400 digits, 2 epochs, keeping 3 checkpoints (for PCA and interp)."""
    from gradlab_cli.main import main

    runs = tmp_path_factory.mktemp("runs")
    try:
        main(["train", "--runs-dir", str(runs), "--model", "mlp", "--width", "32", "--epochs", "2",
              "--keep-checkpoints", "3", "--set", "max_train=400", "--quiet"])
    except SystemExit as e:
        assert e.code in (0, None)
    (path,) = [p for p in runs.iterdir() if p.is_dir()]
    return runs, path


def test_probe_landscape_2d_outputs(trained_run, capsys):
    runs, path = trained_run
    r = cli(capsys, "probe", "landscape", "--runs-dir", runs, "--run", path.name, "--steps", 5, "--batches", 1,
            "--quiet")
    assert r.code == 0, r.err
    out = r.run_path
    df = pd.read_csv(out / "landscape.csv")
    assert list(df.columns) == ["x", "y", "loss", "acc"] and len(df) == 25
    assert sorted(df["x"].unique()) == [-1.0, -0.5, 0.0, 0.5, 1.0]
    # the grid's centre is the run's own weights: its loss is the model's loss on that batch
    from gradlab.training.load import load_run

    lr = load_run(str(path), runs)
    x, y = lr.data.x_train[:512], lr.data.y_train[:512]
    with torch.no_grad():
        ref = float(F.cross_entropy(lr.model(x), y))
    centre = df[(df.x == 0) & (df.y == 0)]
    assert centre["loss"].iloc[0] == pytest.approx(ref, rel=1e-5)
    saved = torch.load(out / "directions.pt", weights_only=True)
    assert set(saved) >= {"d1", "d2", "axes"}
    assert (out / "plots" / "contour.png").is_file() and (out / "plots" / "surface.png").is_file()
    assert pd.read_csv(out / "summary.csv")["status"].iloc[0] == "completed"


def test_probe_landscape_1d_pca_interp(trained_run, capsys):
    runs, path = trained_run
    r = cli(capsys, "probe", "landscape", "--runs-dir", runs, "--run", path.name, "--dims", 1, "--steps", 5,
            "--batches", 1, "--directions", "interp", "--quiet")
    assert r.code == 0, r.err
    df = pd.read_csv(r.run_path / "landscape.csv")
    assert df["y"].isna().all() and len(df) == 5
    assert (r.run_path / "plots" / "landscape_1d.png").is_file()
    r = cli(capsys, "probe", "landscape", "--runs-dir", runs, "--run", path.name, "--steps", 3, "--batches", 1,
            "--directions", "pca", "--quiet")
    assert r.code == 0, r.err
    saved = torch.load(r.run_path / "directions.pt", weights_only=True)
    assert saved["trajectory"].shape[1] == 2


def test_probe_landscape_bad_input_is_one_line(trained_run, capsys, tmp_path):
    runs, path = trained_run
    base = ["probe", "landscape", "--runs-dir", runs, "--run", path.name]
    for extra, words in ((["--steps", 1], "steps"), (["--range", "1,-1"], "empty range"),
                         (["--directions", "sideways"], "random, pca"), (["--range", "1"], "lo,hi"),
                         (["--to", path.name], "interp")):
        r = cli(capsys, *base, *extra)
        assert r.code == 2 and words in r.err and len(r.err.strip().splitlines()) == 1, r.err
    bare = tmp_path / "bare"
    shutil.copytree(path, bare)
    for p in (bare / "checkpoints").glob("*.pt"):
        if p.name != "last.pt":
            p.unlink()
    r = cli(capsys, "probe", "landscape", "--runs-dir", runs, "--run", bare, "--directions", "pca", "--steps", 3)
    assert r.code == 2 and "--keep-checkpoints" in r.err and len(r.err.strip().splitlines()) == 1


def test_optimize_command(tmp_path, capsys):
    r = cli(capsys, "optimize", "--runs-dir", tmp_path, "--fn", "saddle", "--opt", "sgd,adam", "--steps", 30,
            "--start=-1.5,0.01", "--lr", "0.1", "--quiet")
    assert r.code == 0, r.err
    df = pd.read_csv(r.run_path / "trajectories.csv")
    assert list(df.columns) == ["optimizer", "step", "x", "y", "loss", "grad_norm"]
    assert len(df) == 2 * 31 and set(df["optimizer"]) == {"sgd", "adam"}
    rep = pd.read_csv(r.run_path / "optimizers.csv")
    assert rep["escaped"].all() and (r.run_path / "plots" / "trajectories.png").is_file()
    for args, words in ((["--start", "1,2,3"], "2 (x,y)"), (["--fn", "nope"], "rosenbrock"),
                        (["--opt", "sgd,nope"], "adam"), (["--steps", 0], "steps")):
        r = cli(capsys, "optimize", "--runs-dir", tmp_path, *args)
        assert r.code == 2 and words in r.err and len(r.err.strip().splitlines()) == 1, r.err


def test_trajectories_gif(tmp_path):
    from gradlab.landscape.plots import trajectories_gif
    from gradlab.landscape.trajectories import run_trajectory
    from gradlab.landscape.functions import build_function

    fn = build_function("saddle")
    traj = run_trajectory(fn, lambda ps: torch.optim.SGD(ps, lr=0.1), 4, name="sgd", lr=0.1)
    path = tmp_path / "t.gif"
    assert trajectories_gif(build_function("saddle"), traj.frame(), path, max_frames=5)
    from PIL import Image

    with Image.open(path) as im:
        assert im.n_frames == 5
