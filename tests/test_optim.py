"""Optimizer registry, factory, schedules, first-order mapping, SWATS and Langevin.

Second-order optimizers (AdaHessian, curvature-GD) have their own file; the "every entry reduces
the loss" and "state_dict round-trip" checks here run over the whole registry.
"""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradlab.core.errors import GradlabError
import gradlab.optim.first_order as first_order
from gradlab.core.options import Options
from gradlab.optim import OPTIMIZERS, build_optimizer, build_scheduler, default_lr, resolve_options
from gradlab.optim.langevin import Langevin
from gradlab.optim.swats import SWATS

ALL = ["sgd", "momentum", "nesterov", "adam", "adamw", "rmsprop", "adahessian", "curvature-gd", "swats",
       "langevin", "lbfgs", "sr1", "newton", "saddle-free-newton", "sam", "asam", "natural-gd", "kfac"]


@pytest.fixture(scope="module")
def digits():
    """500 standardised digits images (flattened, float32) and labels; loaded straight from sklearn."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data[:500] / 16.0, dtype=torch.float32)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(d.target[:500], dtype=torch.int64)
    return x, y


def mlp(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).to(dtype)


def train_step(opt, model, x, y):
    """One step in the calling convention the optimizer asks for; returns the loss value."""
    opt.zero_grad()
    if getattr(opt, "needs_model", False):
        opt.bind(model, F.cross_entropy)  # once; binding again is a no-op
    if getattr(opt, "needs_loss_closure", False):
        return float(opt.step(lambda: F.cross_entropy(model(x), y)))
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return float(loss.detach())


def test_registry_holds_every_optimizer_with_a_description():
    assert sorted(OPTIMIZERS.names()) == sorted(ALL)
    for entry in OPTIMIZERS:
        assert entry.description and entry.option_flags.startswith("--lr")
        assert default_lr(entry.name) > 0
        assert default_lr(entry.name) == entry.options["lr"].default


# The declarations: each optimizer's own options, defaults and papers ------------------------------

OWN_OPTIONS = {
    "sgd": {"lr": 0.1, "weight_decay": 0.0},
    "momentum": {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.0},
    "nesterov": {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.0},
    "adam": {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0},
    "adamw": {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-2},
    "rmsprop": {"lr": 1e-3, "momentum": 0.0, "eps": 1e-8, "weight_decay": 0.0},
    "adahessian": {"lr": 0.15, "betas": (0.9, 0.999), "eps": 1e-4, "weight_decay": 0.0, "hessian_power": 1.0,
                   "hessian_update_every": 1, "hessian_warmup": 10, "hessian_samples": 1},
    "curvature-gd": {"lr": 0.1, "damping": 0.1, "hessian_ema": 0.9, "weight_decay": 0.0,
                     "hessian_update_every": 1, "hessian_warmup": 10, "hessian_samples": 1},
    "langevin": {"lr": 0.1, "noise_eta": 0.01, "noise_gamma": 0.55, "temperature": 0.0, "weight_decay": 0.0},
    "swats": {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "switch_eps": 1e-9},
    "lbfgs": {"lr": 1.0, "history_size": 20, "max_iter": 1, "line_search": True, "exact_line_search": False,
              "exact_tol": 1e-10, "tolerance_grad": 1e-10, "tolerance_change": 1e-20},
    "sr1": {"lr": 1.0, "history_size": 10, "skip_tol": 1e-8, "eta": 1e-4},
    "newton": {"lr": 1.0, "damping": 1e-4, "damping_rule": "auto", "exact_max_params": 200, "cg_max_iter": 50,
               "cg_tol": 1e-8},
    "saddle-free-newton": {"lr": 1.0, "damping": 0.1, "damping_rule": "auto", "krylov_dim": 20},
    "sam": {"lr": 0.05, "rho": 0.05, "base": "momentum", "weight_decay": 0.0},
    "asam": {"lr": 0.05, "rho": 0.5, "base": "momentum", "weight_decay": 0.0, "eta": 0.01},
    "natural-gd": {"lr": 1.0, "damping": 1.0, "adapt_damping": True, "cg_iters": 20, "cg_decay": 0.95,
                   "curvature": "ggn", "mc_samples": 1},
    "kfac": {"lr": 0.05, "momentum": 0.9, "damping": 0.01, "factor_every": 10, "inverse_every": 10,
             "factor_decay": 0.95, "kl_clip": 0.001, "fisher_type": "mc", "damping_mode": "exact", "weight_decay": 0.0},
}


@pytest.mark.parametrize("name", ALL)
def test_each_optimizer_declares_exactly_its_options_with_help_and_its_defaults(name):
    entry = OPTIMIZERS.entry(name)
    assert isinstance(entry.options, Options) and entry.paper
    assert entry.options.defaults() == OWN_OPTIONS[name]
    for opt in entry.options:
        assert len(opt.help.split()) >= 2, (name, opt.name)  # a phrase, not a blank or the name again
    assert "seed" not in entry.options and "schedule" not in entry.options  # see gradlab.optim's docstring
    assert resolve_options(name) == OWN_OPTIONS[name]


def test_the_papers_behind_the_options_are_named():
    papers = {(e.name, o.name): o.paper for e in OPTIMIZERS for o in e.options}
    assert papers["adahessian", "hessian_power"] == "Yao et al. 2021"
    assert papers["swats", "switch_eps"] == "Keskar & Socher 2017"
    assert papers["langevin", "noise_eta"] == papers["langevin", "noise_gamma"] == "Neelakantan et al. 2015"
    assert all(papers[n, "betas"] == "Kingma & Ba 2015" for n in ("adam", "adamw", "swats", "adahessian"))


def test_one_option_name_has_one_type_across_optimizers():
    for name, owners in OPTIMIZERS.declarations().items():
        assert len({o.kind for _, o in owners}) == 1, name


@pytest.mark.parametrize("name", ALL)
def test_each_optimizer_rejects_an_option_of_another_in_one_line_naming_the_owner(name):
    own = set(OWN_OPTIONS[name])
    for other, options in OWN_OPTIONS.items():
        for key in set(options) - own:
            with pytest.raises(GradlabError) as info:
                build_optimizer(name, nn.Linear(2, 1).parameters(), **{key: options[key]})
            msg = str(info.value)
            assert f"{key!r} is an option of " in msg and f"optimizer {other}" in msg, msg
            assert f"not of optimizer {name} " in msg and "\n" not in msg, msg


@pytest.mark.parametrize("name", ALL)
def test_each_optimizer_reduces_the_loss_on_digits(name, digits):
    x, y = digits
    model = mlp()
    opt = build_optimizer(name, model.parameters())  # defaults: Newton's damping adapts on a network
    with torch.no_grad():
        before = F.cross_entropy(model(x), y).item()
    for i in range(40):
        sl = slice((i * 100) % 500, (i * 100) % 500 + 100)
        train_step(opt, model, x[sl], y[sl])
    with torch.no_grad():
        after = F.cross_entropy(model(x), y).item()
    assert after < 0.75 * before, (name, before, after)
    assert isinstance(opt, torch.optim.Optimizer) and isinstance(opt.events, list)


# -- first-order: the gradlab names map onto the right torch.optim configuration ------------------

TORCH_EQUIVALENTS = [
    ("sgd", {}, lambda p: torch.optim.SGD(p, lr=0.1)),
    ("sgd", {"weight_decay": 1e-3}, lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=1e-3)),
    ("momentum", {}, lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)),
    ("momentum", {"momentum": 0.5, "lr": 0.2}, lambda p: torch.optim.SGD(p, lr=0.2, momentum=0.5)),
    ("nesterov", {"weight_decay": 1e-2}, lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True,
                                                                   weight_decay=1e-2)),
    # Adam and AdamW run torch's fused kernel where it exists (see test_adam_fused_kernel_...)
    ("adam", {}, lambda p: torch.optim.Adam(p, lr=1e-3, fused=True)),
    ("adam", {"betas": [0.8, 0.99], "weight_decay": 0.1}, lambda p: torch.optim.Adam(p, lr=1e-3, betas=(0.8, 0.99),
                                                                                   weight_decay=0.1, fused=True)),
    ("adamw", {}, lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=1e-2, fused=True)),
    ("adamw", {"weight_decay": 0.0}, lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.0, fused=True)),
    ("rmsprop", {}, lambda p: torch.optim.RMSprop(p, lr=1e-3)),
    ("rmsprop", {"momentum": 0.5, "eps": 1e-6}, lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.5, eps=1e-6)),
]


@pytest.mark.parametrize("name,opts,reference", TORCH_EQUIVALENTS)
def test_first_order_optimizers_match_torch_optim_exactly(name, opts, reference, digits):
    x, y = digits[0][:64].double(), digits[1][:64]
    ours, theirs = mlp(dtype=torch.float64), mlp(dtype=torch.float64)
    opt_a, opt_b = build_optimizer(name, ours.parameters(), **opts), reference(theirs.parameters())
    assert opt_a.needs_loss_closure is False
    for _ in range(5):
        train_step(opt_a, ours, x, y)
        train_step(opt_b, theirs, x, y)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name,reference", [
    ("adam", lambda p: torch.optim.Adam(p, lr=1e-3, weight_decay=0.1, foreach=False)),
    ("adamw", lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=1e-2, foreach=False)),
])
def test_adam_fused_kernel_is_the_same_update_as_torchs_default(name, reference, digits):
    """gradlab's Adam/AdamW take torch's fused kernel on CPU: the same algorithm as the per-tensor
    reference loop, equal up to float64 rounding over 20 steps (not bit for bit: other op order)."""
    x, y = digits[0][:64].double(), digits[1][:64]
    ours, theirs = mlp(dtype=torch.float64), mlp(dtype=torch.float64)
    opts = {"weight_decay": 0.1} if name == "adam" else {}
    opt_a, opt_b = build_optimizer(name, ours.parameters(), **opts), reference(theirs.parameters())
    assert opt_a.defaults["fused"] is True
    for _ in range(20):
        train_step(opt_a, ours, x, y)
        train_step(opt_b, theirs, x, y)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert not all(torch.equal(a, b) for a, b in zip(mlp(dtype=torch.float64).parameters(), ours.parameters()))


def test_adam_keeps_the_foreach_path_for_parameters_the_fused_kernel_does_not_take():
    real = nn.Parameter(torch.randn(3))
    cplx = nn.Parameter(torch.randn(3, dtype=torch.complex64))
    for params in ([cplx], [real, cplx], [{"params": [real]}, {"params": [cplx]}]):
        opt = build_optimizer("adam", params)
        assert opt.defaults["fused"] is None
        for t in (real, cplx):
            t.grad = torch.ones_like(t)
        before = cplx.detach().clone()
        opt.step()
        assert not torch.equal(cplx, before)
    assert build_optimizer("adamw", [{"params": [real]}]).defaults["fused"] is True


@pytest.mark.parametrize("refuses_at", ["construction", "step"])
@pytest.mark.parametrize("name,cls,reference", [
    ("adam", first_order.Adam, lambda p: torch.optim.Adam(p, lr=1e-3, weight_decay=0.1)),
    ("adamw", first_order.AdamW, lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=1e-2)),
])
def test_a_torch_that_refuses_the_fused_kernel_gets_torchs_default_adam(name, cls, reference, refuses_at, digits,
                                                                        monkeypatch):
    """As on a torch without the fused kernel for these parameters (an older one raises at
    construction, a newer one at the first step): gradlab builds torch's default implementation,
    and its steps are bit for bit those of ``torch.optim.Adam``/``AdamW`` with torch's defaults."""
    refused = []
    message = "`fused=True` requires all the params to be floating point Tensors of supported devices: ['cuda']"
    real_init, real_step = cls.__init__, cls.step

    def init(self, params, *args, fused=None, **kwargs):
        if fused and refuses_at == "construction":
            refused.append(fused)
            raise RuntimeError(message)
        real_init(self, params, *args, fused=fused, **kwargs)

    def step(self, closure=None):
        if self.defaults["fused"]:
            refused.append(True)
            raise RuntimeError(message)
        return real_step(self, closure)

    x, y = digits[0][:64].double(), digits[1][:64]
    ours, theirs = mlp(dtype=torch.float64), mlp(dtype=torch.float64)
    opt_b = reference(theirs.parameters())
    groups = [{"params": (p for p in ours.parameters())}]  # a generator: listed once
    opts = {"weight_decay": 0.1} if name == "adam" else {}
    monkeypatch.setattr(cls, "__init__", init)
    monkeypatch.setattr(cls, "step", step)
    before = [p.detach().clone() for p in ours.parameters()]
    opt_a = build_optimizer(name, groups, **opts)
    assert refused == [True]  # one trial, on a scratch tensor
    assert all(torch.equal(a, b) for a, b in zip(before, ours.parameters()))  # the trial left them alone
    assert opt_a.defaults["fused"] is None and opt_a.param_groups[0]["fused"] is None
    assert len(opt_a.param_groups[0]["params"]) == 4
    for _ in range(5):
        train_step(opt_a, ours, x, y)
        train_step(opt_b, theirs, x, y)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(a, b)
    assert not all(torch.equal(a, b) for a, b in zip(before, ours.parameters()))


def test_the_fused_trial_hides_no_other_mistake():
    """An error that is not about ``fused`` still comes from the construction itself."""
    with pytest.raises(ValueError, match="Invalid learning rate"):
        first_order.fused_or_default(first_order.Adam, [nn.Parameter(torch.zeros(2))], lr=-1.0)


def test_adam_resumes_from_a_state_saved_by_the_foreach_path(digits):
    """Checkpoints written before gradlab chose the fused kernel hold ``fused: None``; they load,
    and training continues (on the path the checkpoint names)."""
    x, y = digits[0][:64], digits[1][:64]
    old_model, new_model = mlp(), mlp()
    old = torch.optim.Adam(old_model.parameters(), lr=1e-3)
    for _ in range(3):
        train_step(old, old_model, x, y)
    new_model.load_state_dict(old_model.state_dict())
    opt = build_optimizer("adam", new_model.parameters())
    opt.load_state_dict(old.state_dict())
    before = train_step(opt, new_model, x, y)
    for _ in range(5):
        after = train_step(opt, new_model, x, y)
    assert math.isfinite(after) and after < before


# -- validation -----------------------------------------------------------------------------------

BAD = [
    ("sgd", {"lr": 0}, "lr: 0"),
    ("adam", {"lr": -1e-3}, "lr: -0.001"),
    ("sgd", {"lr": float("nan")}, "lr: nan"),
    ("momentum", {"momentum": 1.0}, "momentum: 1.0"),
    ("momentum", {"momentum": -0.1}, "momentum: -0.1"),
    ("nesterov", {"momentum": 0.0}, "invalid momentum: 0.0 (must be a number in (0, 1))"),
    ("adamw", {"weight_decay": -1}, "weight_decay: -1"),
    ("adam", {"betas": [1.0, 0.9]}, "invalid betas: 1.0 (must be 2 numbers, each in [0, 1))"),
    ("adam", {"betas": [0.9]}, "betas"),
    ("adam", {"eps": 0}, "eps: 0"),
    ("adahessian", {"hessian_power": 1.5}, "hessian_power: 1.5"),
    ("adahessian", {"hessian_update_every": 0}, "hessian_update_every: 0"),
    ("adahessian", {"hessian_update_every": 1.5}, "hessian_update_every: 1.5"),
    ("curvature-gd", {"hessian_warmup": -1}, "hessian_warmup: -1"),
    ("curvature-gd", {"damping": 0}, "damping: 0"),
    ("curvature-gd", {"hessian_ema": 1.0}, "hessian_ema: 1.0"),
    ("swats", {"switch_eps": -1}, "switch_eps: -1"),
    ("langevin", {"noise_eta": -0.1}, "noise_eta: -0.1"),
    ("langevin", {"temperature": -1}, "temperature: -1"),
    ("sgd", {"lr": "fast"}, "lr: 'fast'"),
    ("sgd", {"learning_rate": 0.1}, "unknown option 'learning_rate' of optimizer sgd"),
    ("sgd", {"lrr": 0.1}, "did you mean 'lr'?"),
    ("adam", {"schedule": "cosine"}, "unknown option 'schedule' of optimizer adam"),
    ("adam", {"seed": -1}, "invalid seed: -1"),
    ("adamm", {}, "unknown optimizer 'adamm'; choose from: sgd, momentum"),
]


@pytest.mark.parametrize("name,opts,fragment", BAD)
def test_bad_hyperparameters_raise_gradlab_error_naming_the_value(name, opts, fragment):
    with pytest.raises(GradlabError) as info:
        build_optimizer(name, nn.Linear(2, 1).parameters(), **opts)
    assert fragment in str(info.value)


def test_the_classes_validate_too_when_used_directly():
    p = [nn.Parameter(torch.zeros(2))]
    with pytest.raises(GradlabError, match="lr: -1"):
        SWATS(p, lr=-1)
    with pytest.raises(GradlabError, match="noise_gamma: -2"):
        Langevin(p, noise_gamma=-2)


def test_none_means_not_given_even_for_options_of_other_optimizers(digits):
    x, y = digits[0][:32].double(), digits[1][:32]
    a, b = mlp(dtype=torch.float64), mlp(dtype=torch.float64)
    opt_a = build_optimizer("sgd", a.parameters(), lr=None, damping=None, noise_eta=None, hessian_power=None)
    opt_b = build_optimizer("sgd", b.parameters())
    for _ in range(3):
        train_step(opt_a, a, x, y)
        train_step(opt_b, b, x, y)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    with pytest.raises(GradlabError, match="'damping' is an option of optimizer curvature-gd, .*not of optimizer sgd"):
        build_optimizer("sgd", a.parameters(), damping=0.5)


def test_a_declarations_defaults_given_explicitly_build_the_same_optimizer():
    for name in ALL:
        given = OPTIMIZERS.entry(name).options.defaults()
        opt = build_optimizer(name, nn.Linear(2, 1).parameters(), **given)
        plain = build_optimizer(name, nn.Linear(2, 1).parameters())
        assert opt.defaults == plain.defaults, name
    opt = build_optimizer("adahessian", nn.Linear(2, 1).parameters())
    assert opt.defaults["lr"] == 0.15 and opt.defaults["eps"] == 1e-4 and opt.defaults["hessian_power"] == 1.0
    assert build_optimizer("adamw", nn.Linear(2, 1).parameters()).defaults["weight_decay"] == 1e-2


# -- schedules ------------------------------------------------------------------------------------

def _lrs(schedule, total, steps):
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(schedule, opt, total)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_schedules_follow_their_closed_forms():
    assert _lrs("constant", 10, 12) == [1.0] * 12
    step = _lrs("step", 8, 8)
    assert step[:4] == [1.0] * 4 and step[4:6] == pytest.approx([0.1] * 2) and step[6:] == pytest.approx([0.01] * 2)
    cos = _lrs("cosine", 10, 12)
    assert cos == pytest.approx([0.5 * (1 + math.cos(math.pi * min(t, 10) / 10)) for t in range(12)], abs=1e-15)
    assert cos[10] == pytest.approx(0.0, abs=1e-15)


def test_scheduler_errors_and_resume():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(GradlabError, match="unknown schedule 'linear'; choose from: constant, cosine, step"):
        build_scheduler("linear", opt, 10)
    with pytest.raises(GradlabError, match="total_steps: 0"):
        build_scheduler("cosine", opt, 0)
    sched = build_scheduler("cosine", opt, 10)
    for _ in range(4):
        opt.step()
        sched.step()
    opt2 = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    opt2.load_state_dict(opt.state_dict())
    sched2 = build_scheduler("cosine", opt2, 10)
    sched2.load_state_dict(sched.state_dict())
    opt.step(), sched.step(), opt2.step(), sched2.step()
    assert opt.param_groups[0]["lr"] == opt2.param_groups[0]["lr"]


# -- checkpoint round-trip over the whole registry ------------------------------------------------

def _roundtrip(obj):
    """Through torch.save / torch.load(weights_only=True), as the training loop's checkpoints go."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("name", ALL)
def test_state_dict_round_trip_continues_bit_identically(name, digits):
    x, y = digits
    batches = [(x[i * 50:(i + 1) * 50], y[i * 50:(i + 1) * 50]) for i in range(8)]
    # k=3 without warm-up: the first step after the resume reuses the checkpointed diagonal
    extra = {"hessian_update_every": 3, "hessian_warmup": 0} if name in ("adahessian", "curvature-gd") else {}
    extra.update({"switch_eps": 1e-2} if name == "swats" else {})  # switch during the run
    straight = mlp()
    opt = build_optimizer(name, straight.parameters(), seed=5, **extra)
    for xb, yb in batches:
        train_step(opt, straight, xb, yb)

    first = mlp()
    opt1 = build_optimizer(name, first.parameters(), seed=5, **extra)
    for xb, yb in batches[:4]:
        train_step(opt1, first, xb, yb)
    saved_model, saved_opt = _roundtrip(first.state_dict()), _roundtrip(opt1.state_dict())
    resumed = mlp(seed=99)  # different init: everything must come from the checkpoint
    resumed.load_state_dict(saved_model)
    opt2 = build_optimizer(name, resumed.parameters(), seed=123, **extra)  # seed overridden by the state
    opt2.load_state_dict(saved_opt)
    for xb, yb in batches[4:]:
        train_step(opt2, resumed, xb, yb)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
    assert opt2.events == opt.events


# -- SWATS ----------------------------------------------------------------------------------------

def _least_squares():
    torch.manual_seed(0)
    a = torch.randn(50, 5, dtype=torch.float64)
    b = torch.randn(50, dtype=torch.float64)
    return a, b, lambda w: 0.5 * ((a @ w - b) ** 2).mean()


def test_swats_switches_on_a_convex_problem_records_it_and_reaches_the_minimum():
    a, b, loss_fn = _least_squares()
    w = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    opt = SWATS([w], lr=0.01, switch_eps=1e-3)
    # Reference Adam phase written out independently: the projected lr and its corrected EMA.
    wr, m, v, lam = torch.zeros(5, dtype=torch.float64), 0.0, 0.0, 0.0
    expected = None
    for k in range(1, 20):
        g = torch.func.grad(loss_fn)(wr)
        m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
        p = -0.01 * math.sqrt(1 - 0.999 ** k) / (1 - 0.9 ** k) * m / (v.sqrt() + 1e-8)
        wr = wr + p
        gamma = (p @ p / -(p @ g)).item()
        lam = 0.999 * lam + 0.001 * gamma
        if k > 1 and abs(lam / (1 - 0.999 ** k) - gamma) < 1e-3:
            expected = (k, lam / (1 - 0.999 ** k))
            break
    assert expected is not None
    for _ in range(1500):
        opt.zero_grad()
        loss_fn(w).backward()
        opt.step()
    assert opt.phase == "sgd"
    assert len(opt.events) == 1 and opt.events[0]["event"] == "switch-to-sgd"
    assert opt.events[0]["step"] == expected[0]
    assert opt.events[0]["sgd_lr"] == pytest.approx(expected[1], rel=1e-12)
    w_star = torch.linalg.lstsq(a, b.unsqueeze(1)).solution.squeeze(1)
    assert torch.allclose(w.detach(), w_star, atol=1e-8)


def test_swats_sgd_phase_is_momentum_sgd_at_the_chosen_rate():
    """After the switch: v = b1 v + g; w -= (1 - b1) Lambda v (Algorithm 1)."""
    _, _, loss_fn = _least_squares()
    w = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    opt = SWATS([w], lr=0.01, switch_eps=1e-3)
    while not opt.events:
        opt.zero_grad()
        loss_fn(w).backward()
        opt.step()
    lam, v, w_ref = opt.sgd_lr, torch.zeros(5, dtype=torch.float64), w.detach().clone()
    for _ in range(3):
        g = torch.func.grad(loss_fn)(w_ref)
        v = 0.9 * v + g
        w_ref = w_ref - 0.1 * lam * v
        opt.zero_grad()
        loss_fn(w).backward()
        opt.step()
    assert torch.allclose(w.detach(), w_ref, rtol=0, atol=1e-14)


def test_swats_with_the_paper_tolerance_switches_when_the_projection_is_constant():
    """A linear loss has a constant gradient, so gamma_k is constant and the 1e-9 test passes at k=2."""
    w = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    c = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    opt = SWATS([w])
    for _ in range(3):
        opt.zero_grad()
        (c @ w).backward()
        opt.step()
    assert [e["step"] for e in opt.events] == [2]


# -- Langevin -------------------------------------------------------------------------------------

def _noise_only_displacements(opt, p, steps):
    """Variance of p's displacement per step with a zero gradient: the injected noise alone."""
    out = []
    for _ in range(steps):
        before = p.detach().clone()
        p.grad = torch.zeros_like(p)
        opt.step()
        out.append((p.detach() - before).var().item())
    return out


def test_langevin_noise_variance_follows_the_annealing_schedule():
    n = 40_000
    p = nn.Parameter(torch.zeros(n, dtype=torch.float64))
    lr, eta, gamma = 0.5, 0.01, 0.55
    opt = Langevin([p], lr=lr, noise_eta=eta, noise_gamma=gamma)
    variances = _noise_only_displacements(opt, p, 12)
    for t in (0, 1, 4, 11):
        expected = lr ** 2 * eta / (1 + t) ** gamma
        # sample variance of n Gaussians: relative standard error sqrt(2 / n) = 0.7%; allow 5 of them
        assert variances[t] == pytest.approx(expected, rel=5 * math.sqrt(2 / n)), t


def test_sgld_mode_adds_sqrt_2_lr_T_noise_and_a_gradient_step():
    n = 40_000
    p = nn.Parameter(torch.zeros(n, dtype=torch.float64))
    opt = Langevin([p], lr=0.01, temperature=0.5)
    variances = _noise_only_displacements(opt, p, 3)
    assert variances == pytest.approx([2 * 0.01 * 0.5] * 3, rel=5 * math.sqrt(2 / n))
    q = nn.Parameter(torch.ones(4, dtype=torch.float64))
    noiseless = Langevin([q], lr=0.1, noise_eta=0.0)
    q.grad = torch.full((4,), 2.0, dtype=torch.float64)
    noiseless.step()
    assert torch.equal(q.detach(), torch.full((4,), 0.8, dtype=torch.float64))


def test_langevin_leaves_the_global_rng_alone_and_is_seeded():
    state = torch.get_rng_state()
    runs = []
    for seed in (1, 1, 2):
        p = nn.Parameter(torch.zeros(10))
        opt = Langevin([p], seed=seed)
        _noise_only_displacements(opt, p, 2)
        runs.append(p.detach().clone())
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


# -- through `gradlab train`: the declarations answer before any data loads -----------------------

@pytest.mark.parametrize("args,expect", [
    (["--opt", "adam", "--set", "hessian_power=0.5"],
     "'hessian_power' is an option of optimizer adahessian, not of optimizer adam"),
    (["--opt", "sgd", "--momentum", "0.9"], "'momentum' is an option of optimizer kfac, optimizer momentum, optimizer nesterov"),
    (["--opt", "nesterov", "--momentum", "0"], "invalid momentum: 0.0 (must be a number in (0, 1))"),
    (["--opt", "adahessian", "--set", "hessian_update_every=1.5"], "invalid hessian_update_every: 1.5"),
    (["--opt", "swats", "--set", "switch_eps=fast"], "invalid switch_eps: 'fast'"),
    (["--schedule", "linear"], "invalid schedule: 'linear'"),
])
def test_train_answers_optimizer_mistakes_in_one_line_before_loading_data(args, expect, tmp_path, capsys,
                                                                          monkeypatch):
    from clihelp import cli

    import gradlab.data

    def no_data(*a, **k):
        raise AssertionError("data loaded before the options were checked")

    monkeypatch.setattr(gradlab.data, "load_dataset", no_data)
    runs = tmp_path / "runs"
    r = cli(capsys, "train", "--runs-dir", runs, "--quiet", *args)
    lines = r.err.strip().splitlines()
    assert r.code == 2 and len(lines) == 1 and expect in lines[0], (args, r.err)
    assert not runs.exists() or not any(runs.iterdir())
