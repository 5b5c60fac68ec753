"""Basins of attraction (gradlab.landscape.basins, `gradlab optimize --starts/--grid/--arrows`)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from clihelp import cli
from gradlab.landscape.basins import basin_counts, basins, label_basins, start_points
from gradlab.landscape.functions import build_function
from gradlab.landscape.trajectories import registry_optimizer_factory, run_trajectory


def test_gd_next_to_each_himmelblau_minimum_ends_in_its_basin():
    fn = build_function("himmelblau")
    mins = np.asarray(fn.minima)
    starts = mins + np.array([[0.3, -0.2], [-0.25, 0.3], [0.2, 0.25], [-0.3, -0.2]])
    table, _ = basins("himmelblau", ["sgd"], points=starts, steps=200)
    for (mx, my), basin, conv in zip(fn.minima, table["basin"], table["converged"]):
        assert basin == f"min ({mx:.3g}, {my:.3g})" and conv
    assert (table["steps"] < 200).all()


@pytest.mark.parametrize("name", ["sgd", "momentum", "adam"])
def test_vectorised_starts_follow_the_single_start_paths(name):
    starts = torch.tensor([[0.0, 0.0], [-4.0, 4.5], [4.5, -4.5], [-1.0, -3.0]], dtype=torch.float64)
    table, _ = basins("himmelblau", [name], points=starts, steps=40)
    factory, _ = registry_optimizer_factory(name, None)
    for i, s in enumerate(starts.tolist()):
        traj = run_trajectory(build_function("himmelblau", s), factory, 40)
        assert np.allclose(table[["end_x", "end_y"]].to_numpy()[i], traj.points[-1], rtol=1e-12, atol=1e-12)
        assert table["end_grad_norm"].iloc[i] == pytest.approx(traj.grad_norms[-1], rel=1e-9, abs=1e-12)


def test_coupled_optimizer_runs_per_start_and_finds_saddles():
    # Newton's step solves with the whole Hessian: looped per start; it is attracted by saddles
    table, _ = basins("himmelblau", ["newton"], points=[[3.2, 2.1], [-0.1, -1.9]], steps=20)
    assert table["basin"].iloc[0] == "min (3, 2)"
    assert table["basin"].iloc[1].startswith("saddle (") and table["converged"].iloc[1]


def test_labels_cluster_unlisted_critical_points_and_mark_the_rest():
    fn = build_function("rastrigin")  # lists only the global minimum; (0.995, 0.995) is a local one
    local = 0.99495864
    table = pd.DataFrame({"end_x": [local, local + 0.01, 0.0, 1.7, np.nan], "end_y": [local, local, 0.001, 0.3, 0.0],
                          "diverged": [False, False, False, False, True]})
    table["end_loss"] = [float(fn.value(torch.tensor(x), torch.tensor(y))) for x, y in zip(table.end_x, table.end_y)]
    table["end_grad_norm"] = [0.0, 0.0, 5.0, 9.0, np.nan]
    labels = label_basins(fn, table, radius=0.1).tolist()
    assert labels[0] == labels[1] == "minimum (0.995, 0.995)"
    assert labels[2] == "min (0, 0)"  # within the radius of the listed minimum, moving or not
    assert labels[3] == "not converged" and labels[4] == "diverged"


def test_start_points_are_seeded_in_the_box_and_the_grid_covers_it():
    fn = build_function("himmelblau")
    a, b = start_points(fn, 50, 3, seed=1), start_points(fn, 50, 3, seed=1)
    assert torch.equal(a, b) and a.shape == (59, 2)
    assert (a[:50].abs() <= 5).all() and not torch.equal(a[:50], start_points(fn, 50, 0, seed=2))
    assert {tuple(p) for p in a[50:].tolist()} >= {(-5.0, -5.0), (5.0, 5.0), (0.0, 0.0)}


def test_divergence_is_a_basin_and_counts_add_up():
    table, _ = basins("quadratic", ["sgd"], points=[[1.0, 1.0], [0.5, -0.5]], steps=100, lr=0.25)
    assert (table["basin"] == "diverged").all() and not table["converged"].any()  # lr * cond = 2.5 > 2
    assert (table["steps"] < 100).all()
    counts = basin_counts(table)
    assert counts["starts"].sum() == 2 and counts["share"].sum() == pytest.approx(1.0)


def test_gradient_field_points_downhill():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gradlab.landscape.basin_plots import gradient_field

    fn = build_function("quadratic", cond=4.0)
    fig, ax = plt.subplots()
    gradient_field(ax, fn, n=5)
    q = ax.collections[-1]
    xy = q.get_offsets()
    g = -np.stack([xy[:, 0], 4.0 * xy[:, 1]], axis=1)
    norm = np.linalg.norm(g, axis=1)
    ok = norm > 0
    uv = np.stack([np.asarray(q.U).ravel(), np.asarray(q.V).ravel()], axis=1)
    assert np.allclose(uv[ok], g[ok] / norm[ok, None])
    assert np.array_equal(np.asarray(q.Umask).ravel(), ~ok) and (~ok).sum() == 1  # no arrow at the minimum
    plt.close(fig)


def test_optimize_basins_command(tmp_path, capsys):
    r = cli(capsys, "optimize", "--runs-dir", tmp_path, "--fn", "himmelblau", "--opt", "sgd,adam", "--steps", 60,
            "--starts", 7, "--grid", 3, "--arrows")
    assert r.code == 0, r.err
    df = pd.read_csv(r.run_path / "basins.csv")
    assert {"start_x", "start_y", "end_x", "end_y", "basin", "steps", "converged"} <= set(df.columns)
    assert len(df) == 2 * 16 and df["converged"].dtype == bool
    counts = pd.read_csv(r.run_path / "basin_counts.csv")
    assert counts.groupby("optimizer")["starts"].sum().to_dict() == {"sgd": 16, "adam": 16}
    assert (r.run_path / "plots" / "basins.png").stat().st_size > 1000
    table = r.out[r.out.index("basins of attraction"):]
    assert "min (3, 2)" in table and max(len(line) for line in table.splitlines()[:12]) <= 80


@pytest.mark.parametrize("args, words", [
    (["--grid", 1], "grid"), (["--starts", -1], "starts"), (["--basin-radius", 0], "basin"),
    (["--starts", 100000, "--grid", 2], "too many starts"),
])
def test_bad_basin_values_exit_2_without_a_run_folder(tmp_path, capsys, args, words):
    r = cli(capsys, "optimize", "--runs-dir", tmp_path, *args)
    assert r.code == 2 and words in r.err and len(r.err.strip().splitlines()) == 1, r.err
    assert not any(tmp_path.iterdir())
