"""`gradlab optimize` with SAM/ASAM (defined on a 2-D function: they need only the loss and its
gradient) against a plain-loop reference, and the early refusal of the optimizers that need a network."""

import math

import pandas as pd
import pytest

from clihelp import cli


def _reference(start, lr, steps, rho, adaptive, eta=0.01, momentum=0.9, cond=10.0):
    """SAM/ASAM with a momentum-SGD base on f = (x^2 + cond y^2) / 2, written out by hand."""
    w, buf, path = list(start), None, [tuple(start)]

    def grad(p):
        return [p[0], cond * p[1]]

    for _ in range(steps):
        g = grad(w)
        t = [abs(v) + eta for v in w] if adaptive else [1.0, 1.0]
        tg = [ti * gi for ti, gi in zip(t, g)]
        norm = math.hypot(*tg)
        e = [rho * ti * tgi / norm for ti, tgi in zip(t, tg)]
        gs = grad([wi + ei for wi, ei in zip(w, e)])
        buf = gs if buf is None else [momentum * b + v for b, v in zip(buf, gs)]
        w = [wi - lr * b for wi, b in zip(w, buf)]
        path.append(tuple(w))
    return path


@pytest.mark.parametrize("name,rho,adaptive", [("sam", 0.05, False), ("asam", 0.5, True)])
def test_optimize_runs_sam_and_asam_as_the_hand_written_loop(tmp_path, capsys, name, rho, adaptive):
    r = cli(capsys, "optimize", "--runs-dir", tmp_path, "--fn", "quadratic", "--opt", name, "--steps", 6,
            "--lr", "0.02", "--quiet")
    assert r.code == 0, r.err
    df = pd.read_csv(r.run_path / "trajectories.csv")
    ref = _reference((-1.5, 1.0), 0.02, 6, rho, adaptive)
    assert len(df) == 7
    for (x, y), row in zip(ref, df.itertuples()):
        assert row.x == pytest.approx(x, rel=1e-5, abs=1e-6) and row.y == pytest.approx(y, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("name", ["kfac", "natural-gd"])
def test_optimize_refuses_network_optimizers_before_any_run_folder(tmp_path, capsys, name):
    r = cli(capsys, "optimize", "--runs-dir", tmp_path, "--opt", f"sgd,{name}", "--steps", 3)
    assert r.code == 2 and len(r.err.strip().splitlines()) == 1, r.err
    assert f"optimizer {name} needs a network" in r.err and "Traceback" not in r.err
    assert list(tmp_path.iterdir()) == []
