"""`gradlab probe hessian --density` reports the Morse index with the training instrument's
Gauss-Radau code (gradlab.probes.hessian_morse): value, standard error and bracket in its CSV and
table, checked against the dense Hessian's eigenvalues of a small float64 model."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _model_and_batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x, y = torch.randn(40, 5, dtype=torch.float64), torch.randint(0, 3, (40,))
    return model, (x, y)


def test_probe_and_training_share_one_morse_index_against_the_dense_spectrum():
    from gradlab.curvature import dense_hessian
    from gradlab.probes.curvature_train import training_curvature
    from gradlab.probes.hessian import hessian_probe
    from gradlab.probes.hessian_morse import KEYS

    model, batch = _model_and_batch()
    rep = hessian_probe(model, [batch], top_k=1, bottom_k=1, trace=False, density=True, density_starts=4,
                        density_steps=30, seed=0)
    H = dense_hessian(model, F.cross_entropy, batch)
    ev = torch.linalg.eigvalsh((H + H.T) / 2)
    tol = 1e-6 * float(ev.abs().max())
    strict = float((ev < -tol).double().mean())
    ambiguous = float((ev.abs() <= tol).double().mean())
    m = rep.metrics()
    assert set(KEYS) <= set(m)
    assert 0.05 < strict < 0.6
    # the bracket holds the dense count; the value is within its reported error of it (zeros count half)
    assert m["morse_index_low"] <= strict <= strict + ambiguous <= m["morse_index_high"]
    assert abs(m["morse_index"] - (strict + 0.5 * ambiguous)) <= m["morse_index_error"]
    assert 0 < m["morse_index_stderr"] < m["morse_index_error"]
    # the same numbers as the training-time instrument on the same batch and budget (one implementation)
    train = training_curvature(model, F.cross_entropy, batch, density=True, density_starts=4, density_steps=30)
    for key in KEYS:
        assert abs(train[key] - m[key]) < 1e-9, key
    table = rep.to_frame()
    row = table[table["kind"] == "morse_index"].iloc[0]
    assert row["value"] == m["morse_index"] and row["stderr"] == m["morse_index_stderr"]
    assert float(table[table["kind"] == "morse_index_low"]["value"].iloc[0]) == m["morse_index_low"]
    assert float(table[table["kind"] == "morse_index_high"]["value"].iloc[0]) == m["morse_index_high"]


def test_the_table_and_summary_show_the_bracket_and_no_morse_rows_without_a_density():
    from gradlab.probes.hessian import hessian_probe
    from gradlab.probes.hessian_text import overview_frame, summary_lines

    model, batch = _model_and_batch()
    rep = hessian_probe(model, [batch], top_k=1, bottom_k=1, trace=False, density=True, density_starts=2,
                        density_steps=10, seed=1)
    view = overview_frame(rep)
    assert {"Morse index (negative share)", "Morse index bracket, low", "Morse index bracket, high"} <= set(
        view["quantity"])
    assert any("bracket [" in line for line in summary_lines(rep, None))
    bare = hessian_probe(model, [batch], top_k=1, bottom_k=1, trace=False, density=False)
    assert not bare.to_frame()["kind"].str.startswith("morse").any() and "morse_index" not in bare.metrics()
    ggn = hessian_probe(model, [batch], top_k=1, bottom_k=0, trace=False, density=True, density_steps=10,
                        matrix="ggn")
    assert "morse_index" not in ggn.metrics()  # a positive semi-definite matrix has no Morse index


def test_hessian_module_keeps_its_public_names():
    import gradlab.probes.hessian as h
    from gradlab.probes.hessian_report import HessianReport

    assert h.HessianReport is HessianReport
    for name in ("FRAME_COLUMNS", "HessianProbe", "OPTIONS", "as_batches", "hessian_probe", "quick_curvature",
                 "stability_bound"):
        assert hasattr(h, name), name
