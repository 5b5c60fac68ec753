"""Model zoo: shapes, the GradlabNet contract, plain/ResNet twins, initialisations, options, user models."""

from __future__ import annotations

import math
import textwrap

import pytest
import torch
from torch import nn

from gradlab.data.base import DataSpec
from gradlab.core.errors import GradlabError
from gradlab.models import MODELS, ZOO_OPTIONS, GradlabNet, Normalize, build_model, model_options_in
from gradlab.models.mlp import DenseBlock
from gradlab.models.resnet import BasicBlock

SPECS = {
    "digits": DataSpec("digits", (1, 8, 8), 10, [0.3], [0.37]),
    "mnist": DataSpec("mnist", (1, 28, 28), 10, [0.13], [0.31]),
    "cifar": DataSpec("cifar10", (3, 32, 32), 10, [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]),
    "mnist1d": DataSpec("mnist1d", (1, 40), 10, [0.5], [0.11]),
}


def test_registry_lists_the_zoo():
    assert MODELS.names() == [
        "logreg", "mlp", "cnn", "resnet20", "plain20", "resnet32", "plain32", "resnet56", "plain56"
    ]
    for entry in MODELS:
        assert entry.description and entry.option_flags.startswith("--")
        assert len(entry.options) and all(o.help for o in entry.options), entry.name
        assert all(ZOO_OPTIONS[o.name] is o for o in entry.options), entry.name  # one meaning per name
    assert set(ZOO_OPTIONS.names()) >= {"depth", "width", "act", "init", "sigma_w", "sigma_b", "residual", "norm", "dropout"}
    assert MODELS.entry("cnn").options.names() == ["act", "init", "sigma_w", "sigma_b", "norm", "dropout"]


# Every model on every input kind (the deeper ResNets skip 32x32 CIFAR to keep the suite fast).
CASES = [
    (name, data)
    for name in MODELS.names()
    for data in sorted(SPECS)
    if not (data == "cifar" and name[-2:] in ("32", "56"))
]


@pytest.mark.parametrize("name, data", CASES)
def test_every_model_builds_and_follows_the_gradlabnet_contract(name, data):
    spec = SPECS[data]
    torch.manual_seed(0)
    model = build_model(name, spec).eval()
    assert isinstance(model, GradlabNet)
    x = torch.rand(3, *spec.input_shape)
    out = model(x)
    assert out.shape == (3, spec.num_classes) and torch.isfinite(out).all()
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) > 0
    # The fixed input normalisation: no parameters, the data's constants as buffers.
    assert isinstance(model.normalize, Normalize) and not list(model.normalize.parameters())
    assert torch.allclose(model.normalize.mean.flatten(), torch.tensor(spec.mean))
    # Blocks chain: each block maps its recorded input to the next one, and forward_from agrees.
    acts = model.block_inputs(x)
    assert len(acts) == len(model.blocks) + 1
    assert torch.allclose(acts[0], (x - model.normalize.mean) / model.normalize.std)
    for i, block in enumerate(model.blocks):
        assert torch.allclose(block(acts[i]), acts[i + 1])
        assert torch.allclose(model.forward_from(acts[i], i), out, atol=1e-6)
    assert torch.allclose(model.head(acts[-1]), out)


def test_every_parameter_gets_a_gradient():
    for name in ("mlp", "cnn", "resnet20", "plain20"):
        model = build_model(name, SPECS["digits"])
        model(torch.rand(4, 1, 8, 8)).sum().backward()
        assert all(p.grad is not None for p in model.parameters()), name


def test_block_structure():
    mlp = build_model("mlp", SPECS["digits"], depth=3, width=16)
    assert len(mlp.blocks) == 3 and all(isinstance(b, DenseBlock) for b in mlp.blocks)
    assert isinstance(mlp.head, nn.Linear) and mlp.head.in_features == 16
    logreg = build_model("logreg", SPECS["digits"])
    assert len(logreg.blocks) == 0 and sum(p.numel() for p in logreg.parameters()) == 64 * 10 + 10
    cnn = build_model("cnn", SPECS["mnist"])
    assert len(cnn.blocks) == 4 and cnn.blocks[2].f[0].in_features == 16 * 5 * 5  # classic LeNet-5 map
    for depth, n in ((20, 3), (32, 5), (56, 9)):
        net = build_model(f"resnet{depth}", SPECS["cifar"])
        assert len(net.blocks) == 1 + 3 * n + 1  # stem, basic blocks, pooling
        convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
        assert len(convs) + 1 == depth  # 6n + 2 weight layers (convs + the linear head)
    assert sum(p.numel() for p in build_model("resnet20", SPECS["cifar"]).parameters()) == 269_722  # ~0.27M


@pytest.mark.parametrize("depth", [20, 32])
def test_plain_twin_has_the_same_parameters_and_differs_only_by_the_skip(depth):
    spec = SPECS["digits"]
    torch.manual_seed(0)
    resnet = build_model(f"resnet{depth}", spec).eval()
    plain = build_model(f"plain{depth}", spec).eval()
    shapes = lambda m: {k: v.shape for k, v in m.state_dict().items()}  # noqa: E731
    assert shapes(resnet) == shapes(plain)
    plain.load_state_dict(resnet.state_dict())
    x = torch.rand(5, *spec.input_shape)
    assert not torch.allclose(resnet(x), plain(x))
    for block in resnet.blocks:  # switch the skips off: the ResNet becomes its plain twin exactly
        if isinstance(block, BasicBlock):
            block.skip = False
    assert torch.equal(resnet(x), plain(x))


def test_shortcut_options():
    spec = SPECS["cifar"]
    a = build_model("resnet20", spec, shortcut="A")
    b = build_model("resnet20", spec, shortcut="B")
    n_a, n_b = (sum(p.numel() for p in m.parameters()) for m in (a, b))
    # B adds two strided 1x1 projections (16->32, 32->64) each followed by batch norm.
    assert n_b - n_a == (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)
    assert b(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    # Option A's shortcut pads zeros: the new channels of the shortcut carry nothing.
    block = a.blocks[1 + 3]  # first block of stage 2
    h = torch.rand(2, 16, 32, 32)
    sc = block.shortcut(h)
    assert sc.shape == (2, 32, 16, 16) and torch.equal(sc[:, :16], h[:, :, ::2, ::2]) and not sc[:, 16:].any()


def _linear_and_convs(model):
    return [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]


def test_gaussian_init_has_the_mean_field_statistics():
    torch.manual_seed(0)
    spec = DataSpec("x", (256,), 10, [0.5], [0.2])
    model = build_model("mlp", spec, depth=2, width=512, init="gaussian", sigma_w=1.5, sigma_b=0.3)
    for layer in _linear_and_convs(model):
        fan_in = layer.weight.shape[1]
        assert layer.weight.std().item() == pytest.approx(1.5 / math.sqrt(fan_in), rel=0.03)
        assert abs(layer.weight.mean().item()) < 0.05 * 1.5 / math.sqrt(fan_in)  # centred
    big_bias = model.blocks[0].f[0].bias  # 512 entries
    assert big_bias.std().item() == pytest.approx(0.3, rel=0.15)
    cnn = build_model("cnn", SPECS["cifar"], init="gaussian", sigma_w=2.0)
    conv2 = cnn.blocks[1][0]  # 6 -> 16 channels, 5x5: fan_in = 150
    assert conv2.weight.std().item() == pytest.approx(2.0 / math.sqrt(150), rel=0.06)
    assert not conv2.bias.any()  # sigma_b = 0 -> zero biases


@pytest.mark.parametrize("sigma_w", [1.0, 2.0])
def test_orthogonal_init_is_orthogonal(sigma_w):
    model = build_model("mlp", SPECS["digits"], depth=2, width=32, init="orthogonal", sigma_w=sigma_w)
    for layer in _linear_and_convs(model):
        w = layer.weight.double()
        gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w  # the short side is orthonormal
        assert torch.allclose(gram, sigma_w**2 * torch.eye(gram.shape[0], dtype=torch.float64), atol=1e-5)
    cnn = build_model("cnn", SPECS["mnist"], init="orthogonal")
    w = cnn.blocks[1][0].weight.reshape(16, -1).double()  # (16, 150): orthonormal rows
    assert torch.allclose(w @ w.T, torch.eye(16, dtype=torch.float64), atol=1e-5)


def test_xavier_and_kaiming_scales():
    torch.manual_seed(1)
    spec = DataSpec("x", (400,), 10, [0.5], [0.2])
    xav = build_model("mlp", spec, depth=1, width=600, init="xavier").blocks[0].f[0]
    bound = math.sqrt(6 / (400 + 600))
    assert xav.weight.abs().max().item() <= bound
    assert xav.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.02)
    assert not xav.bias.any()
    for act, gain in (("relu", math.sqrt(2)), ("tanh", 5 / 3), ("linear", 1.0)):
        kai = build_model("mlp", spec, depth=1, width=600, init="kaiming", act=act).blocks[0].f[0]
        assert kai.weight.std().item() == pytest.approx(gain / math.sqrt(400), rel=0.02)
    default = build_model("mlp", spec, depth=1, width=600).blocks[0].f[0]  # PyTorch's U(+-1/sqrt(fan_in))
    assert default.weight.abs().max().item() <= 1 / math.sqrt(400) and default.bias.any()


def test_activations_residual_norm_and_dropout():
    spec = SPECS["digits"]
    expected = {"relu": nn.ReLU, "tanh": nn.Tanh, "linear": nn.Identity, "gelu": nn.GELU, "sigmoid": nn.Sigmoid}
    for act, cls in expected.items():
        model = build_model("mlp", spec, act=act, depth=1)
        assert isinstance(model.blocks[0].f[2], cls)
        assert isinstance(build_model("resnet20", spec, act=act).blocks[1].act1, cls)
    res = build_model("mlp", spec, depth=3, width=64, residual=True).eval()
    # 64 inputs = width: every block is residual, h + f(h).
    assert [b.residual for b in res.blocks] == [True, True, True]
    res = build_model("mlp", spec, depth=3, width=32, residual=True).eval()
    assert [b.residual for b in res.blocks] == [False, True, True]
    h = torch.randn(4, 32)
    assert torch.allclose(res.blocks[1](h), h + res.blocks[1].f(h))
    assert isinstance(build_model("mlp", spec, norm="batch").blocks[0].f[1], nn.BatchNorm1d)
    assert isinstance(build_model("mlp", spec, norm="layer").blocks[0].f[1], nn.LayerNorm)
    assert isinstance(build_model("mlp", spec).blocks[0].f[1], nn.Identity)  # auto = none for MLPs
    assert isinstance(build_model("resnet20", spec).blocks[0][1], nn.BatchNorm2d)  # auto = batch
    assert isinstance(build_model("resnet20", spec, norm="none").blocks[0][1], nn.Identity)
    assert isinstance(build_model("cnn", spec, norm="layer").blocks[0][1], nn.GroupNorm)
    drop = build_model("mlp", spec, dropout=0.5)
    assert isinstance(drop.blocks[0].f[3], nn.Dropout) and drop.blocks[0].f[3].p == 0.5


@pytest.mark.parametrize(
    "name, opts, needle",
    [
        ("mlp", {"depth": 0}, "depth"),
        ("mlp", {"width": 0}, "width"),
        ("mlp", {"depth": 2.5}, "depth"),
        ("mlp", {"act": "swish"}, "relu, tanh, linear, gelu, sigmoid"),
        ("mlp", {"init": "he"}, "orthogonal"),
        ("mlp", {"norm": "group"}, "batch"),
        ("mlp", {"dropout": 1.0}, "dropout"),
        ("mlp", {"dropout": -0.1}, "dropout"),
        ("mlp", {"sigma_w": 0.0, "init": "gaussian"}, "sigma_w"),
        ("mlp", {"sigma_b": -1.0, "init": "gaussian"}, "sigma_b"),
        ("mlp", {"sigma_w": 2.0}, "init gaussian"),  # would be silently ignored with init=default
        ("mlp", {"residual": "yes"}, "residual"),
        ("mlp", {"depht": 3}, "unknown option 'depht' of model mlp; did you mean 'depth'"),
        ("mlp", {"depth": "3"}, "is text, not a number"),
        ("resnet21", {}, "resnet20"),
        ("resnet20", {"depth": 5}, r"'depth' is an option of model mlp, not of model resnet20 \(its options: act, init"),
        ("resnet20", {"depth": 2}, "'depth' is an option of model mlp"),  # the mlp's default still is not resnet20's
        ("resnet20", {"shortcut": "C"}, "A, B"),
        ("logreg", {"width": 64}, "'width' is an option of model mlp, not of model logreg"),
        ("cnn", {"shortcut": "B"}, r"is an option of model plain20, .*resnet56, not of model cnn"),
    ],
)
def test_bad_options_raise_a_clear_error(name, opts, needle):
    with pytest.raises(GradlabError, match=needle):
        build_model(name, SPECS["digits"], **opts)


def test_a_flat_config_gives_each_model_its_own_options():
    # a train run's config.yaml holds every zoo option; a cnn takes its own, and a foreign option
    # away from its default is kept so that build_model names its owner instead of dropping it
    cfg = {**ZOO_OPTIONS.defaults(), "model": "cnn", "epochs": 3, "act": "tanh"}
    picked = model_options_in("cnn", cfg)
    assert picked == {**MODELS.entry("cnn").options.defaults(), "act": "tanh"}
    assert isinstance(build_model("cnn", SPECS["digits"], **picked).blocks[0][2], nn.Tanh)
    cfg["depth"] = 4
    with pytest.raises(GradlabError, match="'depth' is an option of model mlp, not of model cnn"):
        build_model("cnn", SPECS["digits"], **model_options_in("cnn", cfg))
    assert set(model_options_in("pkg.mod:factory", cfg)) == set(ZOO_OPTIONS.names())


def test_conv_models_refuse_flat_inputs():
    spec = DataSpec("synthetic", (2,), 2, [0.5], [0.2])
    assert build_model("mlp", spec)(torch.rand(3, 2)).shape == (3, 2)
    for name in ("cnn", "resnet20"):
        with pytest.raises(GradlabError, match="mlp or logreg"):
            build_model(name, spec)


def test_build_model_accepts_a_bundle(digits):
    assert build_model("logreg", digits)(digits.x_test[:2]).shape == (2, 10)


def _write_module(tmp_path, monkeypatch, name, body):
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))
    monkeypatch.syspath_prepend(str(tmp_path))


def test_user_model_from_module_factory(tmp_path, monkeypatch, digits_spec):
    _write_module(
        tmp_path,
        monkeypatch,
        "gl_user_models",
        """
        import math
        from torch import nn

        def small(spec, width=8):
            d = math.prod(spec.input_shape)
            return nn.Sequential(nn.Flatten(), nn.Linear(d, width), nn.ReLU(), nn.Linear(width, spec.num_classes))

        def everything(spec, **opts):
            everything.seen = opts
            return nn.Sequential(nn.Flatten(), nn.Linear(64, spec.num_classes))

        def no_args():
            return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))

        def not_a_module(spec):
            return 42

        def broken(spec):
            raise RuntimeError("boom")
        """,
    )
    model = build_model("gl_user_models:small", digits_spec, width=16)
    assert model[1].out_features == 16 and model(torch.rand(2, 1, 8, 8)).shape == (2, 10)
    build_model("gl_user_models:everything", digits_spec, depth=4)
    import gl_user_models

    assert gl_user_models.everything.seen["depth"] == 4 and set(gl_user_models.everything.seen) == set(ZOO_OPTIONS.names())
    assert build_model("gl_user_models:no_args", digits_spec)(torch.rand(1, 1, 8, 8)).shape == (1, 10)
    with pytest.raises(GradlabError, match="not accepted"):
        build_model("gl_user_models:small", digits_spec, depth=3)
    with pytest.raises(GradlabError, match="int, not a torch.nn.Module"):
        build_model("gl_user_models:not_a_module", digits_spec)
    with pytest.raises(GradlabError, match="boom"):
        build_model("gl_user_models:broken", digits_spec)
    with pytest.raises(GradlabError, match="no attribute 'missing'"):
        build_model("gl_user_models:missing", digits_spec)
    with pytest.raises(GradlabError, match="cannot import module 'gl_no_such_module'"):
        build_model("gl_no_such_module:make", digits_spec)
    with pytest.raises(GradlabError, match="package.module:factory"):
        build_model("gl_user_models:", digits_spec)
