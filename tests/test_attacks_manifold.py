"""On-manifold attacks (gradlab.attacks.manifold): local PCA against dense references, the
perturbation staying in a known subspace, and on- >= off-manifold robustness on a trained model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from attack_models import digits_split, trained_mlp
from gradlab.attacks.manifold import LocalPCA, constrained, manifold_sweep, parse_manifold, project_onto
from gradlab.core.errors import GradlabError

D, R = 16, 3  # inputs (1, 4, 4), a 3-dimensional affine subspace


def subspace_data(n_train=200, n_test=12, seed=0):
    """Points c + A z on an R-dim affine subspace of R^16 (A orthonormal), inside (0.2, 0.8)^16."""
    g = torch.Generator().manual_seed(seed)
    a, _ = torch.linalg.qr(torch.randn(D, R, generator=g, dtype=torch.float64))
    z = (torch.rand(n_train + n_test, R, generator=g, dtype=torch.float64) - 0.5) * 0.5
    x = (0.5 + z @ a.T).reshape(-1, 1, 4, 4)
    assert x.min() > 0.1 and x.max() < 0.9
    return a, x[:n_train], x[n_train:]


def tiny64(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(D, 12), nn.Tanh(), nn.Linear(12, 10)).double().eval()


def test_tangent_basis_spans_the_known_subspace():
    a, xtr, xte = subspace_data()
    u = LocalPCA(xtr, k=20, dim=R).basis(xte)
    assert u.shape == (xte.shape[0], D, R)
    p_true = a @ a.T
    for i in range(xte.shape[0]):
        assert torch.allclose(u[i].T @ u[i], torch.eye(R, dtype=torch.float64), atol=1e-10)
        assert torch.allclose(u[i] @ u[i].T, p_true, atol=1e-9)
    # asking for more directions than the neighbours span gives the rank, not noise directions
    u5 = LocalPCA(xtr, k=20, dim=5).basis(xte)
    assert ((u5.abs().sum(1) > 0).sum(1) == R).all()
    assert torch.allclose(u5[0] @ u5[0].T, p_true, atol=1e-9)


def test_explained_variance_rule_matches_numpy_svd():
    x_tr, _, x_te, _ = digits_split()
    est = LocalPCA(x_tr.double(), k=15, variance=0.8)
    u = est.basis(x_te[:5].double())
    idx = est.neighbours(x_te[:5])
    for i in range(5):
        nb = x_tr[idx[i]].reshape(15, -1).double().numpy()
        # reference neighbours: a plain sort of the distances
        dist = np.linalg.norm(x_tr.reshape(len(x_tr), -1).double().numpy() - x_te[i].reshape(-1).double().numpy(), axis=1)
        assert set(np.argsort(dist)[:15]) == set(idx[i].tolist())
        c = nb - nb.mean(0)
        _, s, vt = np.linalg.svd(c, full_matrices=False)
        d = int(np.searchsorted(np.cumsum(s**2) / np.sum(s**2), 0.8) + 1)
        got = u[i][:, (u[i].abs().sum(0) > 0)]
        assert got.shape[1] == d
        assert np.allclose(got.numpy() @ got.numpy().T, vt[:d].T @ vt[:d], atol=1e-8)


def test_project_onto_equals_the_dense_projector():
    g = torch.Generator().manual_seed(1)
    u, _ = torch.linalg.qr(torch.randn(3, D, 4, generator=g, dtype=torch.float64))
    v = torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64)
    for i in range(3):
        p = u[i] @ u[i].T
        assert torch.allclose(project_onto(v, u)[i].reshape(-1), p @ v[i].reshape(-1), atol=1e-12)
        assert torch.allclose(project_onto(v, u, "normal")[i].reshape(-1), v[i].reshape(-1) - p @ v[i].reshape(-1),
                              atol=1e-12)


@pytest.mark.parametrize("name,opts", [("fgsm", {}), ("pgd", {"steps": 5}), ("apgd", {"steps": 8}),
                                       ("pgd", {"steps": 5, "norm": "l2", "restarts": 2}), ("apgd", {"steps": 8, "norm": "l2"})])
@pytest.mark.parametrize("space", ["tangent", "normal"])
def test_perturbation_stays_in_the_subspace_and_the_ball(name, opts, space):
    a, xtr, xte = subspace_data()
    est = LocalPCA(xtr, k=20, dim=R)
    model = tiny64()
    with torch.no_grad():
        y = model(xte).argmax(1)  # every example correct, so APGD attacks each
    eps = 0.05 if opts.get("norm", "linf") == "linf" else 0.2
    attack = constrained(name, model, eps, est, space, seed=0, **opts)
    delta = (attack(xte, y) - xte).reshape(xte.shape[0], -1)
    inside = delta @ a @ a.T  # component in span(A)
    off = delta - inside
    assert float(delta.norm(dim=1).min()) > 1e-3  # it moved
    if space == "tangent":
        assert float(off.abs().max()) < 1e-10
    else:
        assert float(inside.abs().max()) < 1e-10
    norm = delta.abs().amax(1) if opts.get("norm", "linf") == "linf" else delta.norm(dim=1)
    assert float(norm.max()) <= eps + 1e-9


def test_on_manifold_robust_accuracy_is_at_least_off_manifold_on_a_trained_model():
    model, x_te, y_te = trained_mlp()
    x_tr = digits_split()[0]
    est = LocalPCA(x_tr, k=20)
    for name, opts in (("fgsm", {}), ("pgd", {"steps": 10})):
        t = manifold_sweep(model, x_te[:120], y_te[:120], name, [0.1, 0.2], est, seed=0, **opts)
        assert (t["robust_on"] >= t["robust_off"]).all(), t
        assert (t["robust_on"] >= t["robust_acc"]).all(), t
        assert (t["robust_on"] <= t["clean_acc"] + 1e-12).all()
        assert (t["tangent_dim"] >= 1).all() and t["tangent_dim"].iloc[0] <= 19
        assert ((t["leak"] >= 0) & (t["leak"] <= 1)).all()


def test_bad_manifold_specs_and_attacks_are_one_line_errors():
    for spec in ("pca", "pca:1", "pca:x", "knn:5", ""):
        with pytest.raises(GradlabError, match="pca:K"):
            parse_manifold(spec)
    assert parse_manifold("pca:50") == 50
    _, xtr, _ = subspace_data(n_train=10)
    with pytest.raises(GradlabError, match="at least 20"):
        LocalPCA(xtr, 20)
    with pytest.raises(GradlabError, match="fgsm, pgd, apgd"):
        constrained("square", tiny64(), 0.1, LocalPCA(xtr, 5))
