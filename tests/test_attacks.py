"""Attacks: closed forms, budgets, modes, EOT, and the dense-Hessian reference for the curvature attack."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from attack_models import digits_split, trained_mlp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from gradlab.attacks import ATTACKS, attack_batch, build_attack
from gradlab.attacks.curvature import CurvatureAttack
from gradlab.attacks.report import COLUMNS, robustness_report, robustness_sweep
from gradlab.curvature.batched import batched_lanczos
from gradlab.core.errors import GradlabError
from gradlab.models.base import GradlabNet, Normalize

# Small settings so every attack stays cheap in property tests.
FAST = {
    "fgsm": {},
    "pgd": {"steps": 3, "restarts": 2},
    "curvature": {"steps": 2, "lanczos_iters": 4},
    "curls": {"steps": 4, "search_steps": 4, "whey_groups": 4, "whey_rounds": 3},
    "apgd": {"steps": 5, "restarts": 2},
    "square": {"n_queries": 15},
    "fab": {"steps": 4, "n_target_classes": 2},
    "autoattack": {"steps": 3, "n_queries": 10, "n_target_classes": 2},
    "cw": {"steps": 5, "binary_search_steps": 2},
    "deepfool": {"steps": 5},
    "fmn": {"steps": 5},
}


# ----------------------------------------------------------------------- fixtures ----------
@pytest.fixture(scope="module")
def trained():
    return trained_mlp(1500, 150)


def _tiny_model(seed: int, d_in: int = 12, classes: int = 3, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(d_in, 7), nn.Tanh(), nn.Linear(7, classes)).to(dtype)


# ----------------------------------------------------------------------- FGSM ---------------
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_fgsm_equals_closed_form_on_softmax_regression(norm):
    torch.manual_seed(1)
    lin = nn.Linear(10, 4).double()
    model = nn.Sequential(nn.Flatten(), lin)
    x = torch.rand(6, 1, 10, dtype=torch.float64)
    y = torch.randint(0, 4, (6,))
    eps = 0.07
    # d CE / dx = W^T (softmax(Wx + b) - onehot(y)), per example
    p = torch.softmax(x.flatten(1) @ lin.weight.T + lin.bias, dim=1)
    g = (p - F.one_hot(y, 4).double()) @ lin.weight
    step = g.sign() if norm == "linf" else g / g.norm(dim=1, keepdim=True)
    expected = (x.flatten(1) + eps * step).clamp(0, 1).reshape(x.shape)
    got = attack_batch("fgsm", model, x, y, eps, norm=norm)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)


def test_targeted_fgsm_descends_target_loss():
    torch.manual_seed(2)
    lin = nn.Linear(10, 4).double()
    model = nn.Sequential(nn.Flatten(), lin)
    x = torch.rand(5, 10, dtype=torch.float64)
    y = torch.zeros(5, dtype=torch.long)
    p = torch.softmax(x @ lin.weight.T + lin.bias, dim=1)
    g = (p - F.one_hot(torch.full_like(y, 2), 4).double()) @ lin.weight
    expected = (x - 0.05 * g.sign()).clamp(0, 1)
    got = attack_batch("fgsm", model, x, y, 0.05, targeted=True, target_class=2)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)


# ----------------------------------------------------------------------- budgets ------------
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(sorted(FAST)),
    norm=st.sampled_from(["linf", "l2"]),
    eps_frac=st.floats(0.0, 1.0),
    seed=st.integers(0, 10_000),
    targeted=st.booleans(),
)
def test_every_attack_stays_within_budget_and_box(name, norm, eps_frac, seed, targeted):
    model = _tiny_model(seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(4, 1, 3, 4, generator=gen)
    x[0, 0, 0] = 0.0  # pixels on the box boundary
    x[1, 0, 1] = 1.0
    y = torch.randint(0, 3, (4,), generator=gen)
    eps = eps_frac if norm == "linf" else 3.0 * eps_frac
    norm = "l2" if name == "cw" else norm  # CW is an L2 attack
    # autoattack and deepfool refuse targeted (untargeted by definition)
    aim = {} if name in ("autoattack", "deepfool") else {"targeted": targeted}
    adv = attack_batch(name, model, x, y, eps, norm=norm, seed=seed, **aim, **FAST[name])
    assert adv.shape == x.shape and adv.dtype == x.dtype and not adv.requires_grad
    assert adv.min() >= 0 and adv.max() <= 1
    delta = (adv - x).flatten(1).double()
    size = delta.abs().amax(dim=1) if norm == "linf" else delta.norm(dim=1)
    assert (size <= eps + 1e-6).all(), (size.max().item(), eps)


def test_eps_zero_returns_clean_inputs_and_clean_accuracy_with_batchnorm():
    x_tr, y_tr, x_te, y_te = digits_split(1500, 150)
    torch.manual_seed(0)
    model = GradlabNet(Normalize([0.3], [0.4]), [nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU())], nn.Linear(32, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(20):
        opt.zero_grad()
        F.cross_entropy(model(x_tr[:256]), y_tr[:256]).backward()
        opt.step()
    model.train()  # left in train mode: the attack must still evaluate in eval mode
    x, y = x_te[:60], y_te[:60]
    for name in ATTACKS.names():
        adv = attack_batch(name, model, x, y, 0.0, **FAST[name])
        assert torch.equal(adv, x), name
        assert model.training
    model.eval()
    eval_acc = (model(x).argmax(1) == y).float().mean().item()
    probe = copy.deepcopy(model).train()  # a copy: a train-mode forward updates running stats
    train_acc = (probe(x).argmax(1) == y).float().mean().item()
    assert eval_acc != train_acc  # otherwise the test could not tell the modes apart
    model.train()
    table = robustness_report(model, x, y, "pgd", [0.0], batch_size=16, steps=2)
    assert table.loc[0, "robust_acc"] == pytest.approx(eval_acc)
    assert table.loc[0, "clean_acc"] == pytest.approx(eval_acc)
    assert model.training


def test_model_modes_and_requires_grad_flags_are_restored():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.Dropout(0.3), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))
    model.train()
    model[3].eval()  # mixed modes
    model[1].weight.requires_grad_(False)
    before_modes = [m.training for m in model.modules()]
    before_flags = [p.requires_grad for p in model.parameters()]
    running = model[3].running_mean.clone()
    x, y = torch.rand(5, 12), torch.randint(0, 3, (5,))
    for name in ATTACKS.names():
        attack_batch(name, model, x, y, 0.1, eot=3, **FAST[name])
        assert [m.training for m in model.modules()] == before_modes, name
        assert [p.requires_grad for p in model.parameters()] == before_flags, name
        assert all(p.grad is None for p in model.parameters()), name
    # BatchNorm stayed in eval mode even during EOT passes: running statistics untouched
    assert torch.equal(model[3].running_mean, running)


# ----------------------------------------------------------------------- EOT ---------------
def test_eot_on_a_deterministic_model_equals_one_gradient():
    model = _tiny_model(3)
    x, y = torch.rand(6, 12), torch.randint(0, 3, (6,))
    one = build_attack("fgsm", model, 0.1)
    many = build_attack("fgsm", model, 0.1, eot=5)
    with one.session(x, y):
        g1, o1 = one.grad(x)
    with many.session(x, y):
        g5, o5 = many.grad(x)
    torch.testing.assert_close(g5, g1, atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(o5, o1)
    assert torch.equal(attack_batch("fgsm", model, x, y, 0.1, eot=5), attack_batch("fgsm", model, x, y, 0.1))


def test_eot_averages_gradients_over_dropout_masks():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Dropout(0.5), nn.Linear(16, 3)).double()
    x = torch.rand(4, 12, dtype=torch.float64)
    y = torch.randint(0, 3, (4,))
    attack = build_attack("fgsm", model, 0.1, eot=4, seed=0)  # seeded: no draw from the global stream
    torch.manual_seed(123)
    with attack.session(x, y):
        g_eot, _ = attack.grad(x)
    # reference: the same four dropout masks (same RNG stream), one gradient each, averaged
    torch.manual_seed(123)
    model.train()
    ref = torch.zeros_like(x)
    for _ in range(4):
        xr = x.clone().requires_grad_(True)
        F.cross_entropy(model(xr), y, reduction="sum").backward()
        ref += xr.grad / 4
    model.eval()
    torch.testing.assert_close(g_eot, ref, atol=1e-12, rtol=0)
    single = build_attack("fgsm", model, 0.1)
    with single.session(x, y):
        g1, _ = single.grad(x)
    assert not torch.allclose(g1, g_eot)  # eval-mode gradient differs: the masks were sampled


# ----------------------------------------------------------------------- trained model ------
def test_robust_accuracy_never_above_clean_accuracy(trained):
    model, x, y = trained
    for name in ATTACKS.names():
        table = robustness_report(model, x[:80], y[:80], name, [0.05, 0.2], batch_size=40, seed=0, **FAST[name])
        assert list(table.columns[: len(COLUMNS)]) == COLUMNS  # autoattack adds its broken_by_* counts
        assert (table["robust_acc"] <= table["clean_acc"] + 1e-12).all(), (name, table)
        assert table["clean_acc"].iloc[0] > 0.85


def test_pgd_at_least_as_strong_as_fgsm(trained):
    model, x, y = trained
    for eps in (0.05, 0.1):
        fgsm = robustness_report(model, x, y, "fgsm", [eps])
        pgd = robustness_report(model, x, y, "pgd", [eps], steps=10, seed=0)
        assert pgd.loc[0, "robust_acc"] <= fgsm.loc[0, "robust_acc"], (eps, fgsm, pgd)
    assert pgd.loc[0, "robust_acc"] < pgd.loc[0, "clean_acc"]  # the attack does something


def test_pgd_restarts_keep_the_worst_case_per_example(trained):
    model, x, y = trained
    x, y = x[:60], y[:60]
    one = build_attack("pgd", model, 0.08, steps=3, restarts=1, seed=5)
    three = build_attack("pgd", model, 0.08, steps=3, restarts=3, seed=5)
    a1, a3 = one(x, y), three(x, y)
    with one.session(x, y):
        adv1, obj1 = one.score(a1)
        adv3, obj3 = one.score(a3)
    assert (adv3 >= adv1).all()
    same = adv3 == adv1
    assert (obj3[same] >= obj1[same] - 1e-6).all()


def test_targeted_pgd_reaches_the_target_class(trained):
    model, x, y = trained
    res = robustness_sweep(model, x[:60], y[:60], "pgd", [0.3], steps=20, targeted=True, target_class=3, seed=0)
    hit = (res.adv_pred[0.3] == 3).float().mean().item()
    assert hit > 0.8
    assert res.table.loc[0, "success_rate"] > 0.8


def test_curls_whey_needs_less_perturbation_than_pgd_for_the_same_success(trained):
    model, x, y = trained
    eps = 0.15
    pgd = robustness_sweep(model, x, y, "pgd", [eps], steps=20, seed=0)
    curls = robustness_sweep(model, x, y, "curls", [eps], steps=20, seed=0)
    p, c = pgd.table.loc[0], curls.table.loc[0]
    assert c["success_rate"] >= p["success_rate"] - 1e-12
    ok = pgd.clean_pred == y
    fooled = ok & (curls.adv_pred[eps] != y) & (pgd.adv_pred[eps] != y)
    assert fooled.sum() > 20
    l2_pgd = (pgd.adv[eps] - x)[fooled].flatten(1).norm(dim=1).mean()
    l2_curls = (curls.adv[eps] - x)[fooled].flatten(1).norm(dim=1).mean()
    assert l2_curls < 0.7 * l2_pgd, (l2_curls, l2_pgd)
    assert c["mean_l2"] < p["mean_l2"]


# ----------------------------------------------------------------------- curvature ---------
def _dense_input_hessians(model, x, y):
    hs = []
    for i in range(x.shape[0]):
        def loss(xi, i=i):
            return F.cross_entropy(model(xi.unsqueeze(0)), y[i : i + 1], reduction="sum")

        hs.append(torch.autograd.functional.hessian(loss, x[i]).reshape(x[i].numel(), -1))
    return torch.stack(hs)


@pytest.mark.parametrize("act", [nn.Tanh, nn.ReLU])
def test_curvature_direction_is_the_dense_hessian_top_eigenvector(act):
    torch.manual_seed(7)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 9), act(), nn.Linear(9, 4)).double()
    x = torch.rand(5, 1, 6, dtype=torch.float64)
    y = torch.randint(0, 4, (5,))
    hess = _dense_input_hessians(model, x, y)
    evals, evecs = torch.linalg.eigh(hess)
    attack = CurvatureAttack(model, 0.1, lanczos_iters=20, seed=0)
    lam, vec = attack.top_eigenpairs(x, y)
    torch.testing.assert_close(lam, evals[:, -1], atol=1e-9, rtol=1e-8)
    gap = evals[:, -1] - evals[:, -2]
    assert (gap > 1e-6).all()
    cos = (vec.flatten(1) * evecs[:, :, -1]).sum(dim=1).abs()
    torch.testing.assert_close(cos, torch.ones_like(cos), atol=1e-8, rtol=0)


def test_batched_lanczos_matches_eigh_including_low_rank_blocks():
    torch.manual_seed(8)
    b, d = 4, 15
    a = torch.randn(b, d, d, dtype=torch.float64)
    mats = (a + a.transpose(1, 2)) / 2
    low = torch.randn(d, 2, dtype=torch.float64)
    mats[1] = low @ low.T  # rank 2: the Krylov space closes after two steps
    mats[2] = -(mats[2] @ mats[2].T)  # negative definite: the top eigenvalue is negative
    eig = batched_lanczos(lambda v: torch.einsum("bij,bj->bi", mats, v), torch.randn(b, d, dtype=torch.float64), 1,
                          max_iter=30, tol=0.0, return_vectors=True)
    lam, vec = eig.eigenvalues[:, 0], eig.eigenvectors[:, 0]
    ref = torch.linalg.eigvalsh(mats)[:, -1]
    torch.testing.assert_close(lam, ref, atol=1e-9, rtol=1e-9)
    residual = torch.einsum("bij,bj->bi", mats, vec) - lam[:, None] * vec
    assert residual.norm(dim=1).max() < 1e-7


def test_curvature_attack_moves_where_the_gradient_vanishes():
    # CE of a logit pair that is symmetric around x = 0.5: gradient 0 there, curvature > 0
    class Sym(nn.Module):
        def forward(self, x):
            s = ((x.flatten(1) - 0.5) ** 2).sum(dim=1, keepdim=True) * 40
            return torch.cat([-s, torch.zeros_like(s) - 1.0], dim=1)  # class 0 wins only near 0.5

    x = torch.full((3, 5), 0.5)
    y = torch.zeros(3, dtype=torch.long)
    model = Sym()
    fgsm = attack_batch("fgsm", model, x, y, 0.2)
    curv = attack_batch("curvature", model, x, y, 0.2, seed=0)
    assert torch.equal(fgsm, x)  # zero gradient: FGSM is stuck
    assert (model(curv).argmax(1) != y).all()
    assert ((curv - x).abs().amax(dim=1) <= 0.2 + 1e-6).all()


# ----------------------------------------------------------------------- errors ------------
@pytest.mark.parametrize(
    "name,eps,opts,match",
    [
        ("fgsm", -0.1, {}, "eps"),
        ("fgsm", 1.5, {}, "eps"),
        ("pgd", 0.1, {"steps": 0}, "steps"),
        ("pgd", 0.1, {"norm": "l1"}, "norm"),
        ("pgd", 0.1, {"restarts": 0}, "restarts"),
        ("nope", 0.1, {}, "choose from"),
        ("fgsm", 0.1, {"steps": 3}, r"'steps' is an option of attack apgd, attack autoattack, attack curls, attack curvature, attack cw, attack deepfool, attack fab, attack fmn, attack pgd, not of attack fgsm"),
        ("pgd", 0.1, {"step": 3}, "unknown option 'step' of attack pgd; did you mean 'steps'"),
        ("pgd", 0.1, {"steps": "3"}, "is text, not a number"),
        ("pgd", 0.1, {"random_start": 1}, "invalid random_start: 1 .must be true or false"),
        ("curls", 0.1, {"steps": 4, "descent_steps": 4}, "descent_steps"),
        ("fgsm", 0.1, {"eot": 0}, "eot"),
        ("curls", 0.1, {"steps": 0}, "steps"),
        ("curvature", 0.1, {"steps": 0}, "steps"),
    ],
)
def test_bad_options_raise_one_clear_error(name, eps, opts, match):
    with pytest.raises(GradlabError, match=match):
        attack_batch(name, _tiny_model(0), torch.rand(2, 12), torch.zeros(2, dtype=torch.long), eps, **opts)


def test_inputs_outside_the_unit_box_and_bad_target_are_rejected():
    model = _tiny_model(0)
    with pytest.raises(GradlabError, match=r"\[0, 1\]"):
        attack_batch("fgsm", model, torch.rand(2, 12) + 1, torch.zeros(2, dtype=torch.long), 0.1)
    with pytest.raises(GradlabError, match="target class"):
        attack_batch("fgsm", model, torch.rand(2, 12), torch.zeros(2, dtype=torch.long), 0.1, target_class=7)


def test_single_step_curvature_attack_fools_every_example_fgsm_fools(trained):
    # its candidate set contains the FGSM step, and an adversarial candidate always wins
    model, x, y = trained
    fgsm = robustness_sweep(model, x, y, "fgsm", [0.08])
    curv = robustness_sweep(model, x, y, "curvature", [0.08], seed=0, lanczos_iters=10)
    fooled_fgsm = fgsm.adv_pred[0.08] != y
    fooled_curv = curv.adv_pred[0.08] != y
    assert (fooled_curv | ~fooled_fgsm).all()
    assert curv.table.loc[0, "robust_acc"] <= fgsm.table.loc[0, "robust_acc"]


def test_eot_samples_every_public_dropout_module_of_torch():
    from gradlab.attacks.base import DROPOUTS

    public = {getattr(nn, n) for n in dir(nn) if "Dropout" in n and isinstance(getattr(nn, n), type)}
    assert public == set(DROPOUTS)
