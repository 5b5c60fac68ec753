"""``gradlab probe gradnorm``: per-layer gradient and backward-signal norms, with a verdict.

Also holds what ``probe jacobian`` shares with it: the model-source options (a fresh model from
the model flags, or a trained ``--run``) and the example sampling.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from typing_extensions import Annotated

from gradlab_cli._common import (
    ConfigOpt,
    DeviceOpt,
    NameOpt,
    QuietOpt,
    RunRefOpt,
    RunsDirOpt,
    SeedOpt,
    console,
    finish_and_print,
    render_table,
    resolve_options,
    start_run,
)

MODEL = "Fresh model at initialisation (instead of --run)"
PROBE = "Probe"
MODEL_KEYS = ("depth", "width", "act", "init", "sigma_w", "sigma_b", "residual", "norm")
SOURCE_DEFAULTS = {"run": None, "model": None, "dataset": None, "data_dir": None,
                   **{k: None for k in MODEL_KEYS}, "split": "train", "layers": None}

ModelOpt = Annotated[Optional[str], typer.Option(help="Model (see `gradlab list models`). (default: mlp)", rich_help_panel=MODEL)]
DatasetOpt = Annotated[Optional[str], typer.Option(help="Dataset (see `gradlab list datasets`). (default: digits)", rich_help_panel=MODEL)]
DataDirOpt = Annotated[Optional[Path], typer.Option(help="Folder with dataset files (else $GRADLAB_DATA).", rich_help_panel=MODEL)]
DepthOpt = Annotated[Optional[int], typer.Option(help="MLP hidden layers. (default: 2)", rich_help_panel=MODEL)]
WidthOpt = Annotated[Optional[int], typer.Option(help="MLP hidden width. (default: 128)", rich_help_panel=MODEL)]
ActOpt = Annotated[Optional[str], typer.Option(help="Activation: relu, tanh, linear, gelu, sigmoid. (default: relu)", rich_help_panel=MODEL)]
InitOpt = Annotated[Optional[str], typer.Option(help="Init: default, xavier, kaiming, orthogonal, gaussian. (default: default)", rich_help_panel=MODEL)]
SigmaWOpt = Annotated[Optional[float], typer.Option(help="Weight scale for init gaussian (W ~ N(0, sigma_w^2/fan_in)) or orthogonal (gain). (default: 1)", rich_help_panel=MODEL)]
SigmaBOpt = Annotated[Optional[float], typer.Option(help="Bias std for init gaussian|orthogonal. (default: 0)", rich_help_panel=MODEL)]
ResidualOpt = Annotated[Optional[bool], typer.Option("--residual/--no-residual", help="Skip connections h + f(h) in the MLP.", rich_help_panel=MODEL)]
NormOpt = Annotated[Optional[str], typer.Option(help="Normalisation layers: auto, none, batch, layer. (default: auto)", rich_help_panel=MODEL)]
SplitOpt = Annotated[Optional[str], typer.Option(help="Draw examples from the train or test split. (default: train)", rich_help_panel=PROBE)]
LayersOpt = Annotated[Optional[str], typer.Option(help="Comma-separated layer names to probe, e.g. blocks.0,blocks.3,head. (default: all)", rich_help_panel=PROBE)]


def parse_layers(value) -> Optional[list]:
    """``"blocks.0, head"`` (or a YAML list) -> names; None keeps every layer."""
    from gradlab.errors import GradlabError

    if value is None:
        return None
    names = value if isinstance(value, list) else str(value).split(",")
    names = [str(n).strip() for n in names if str(n).strip()]
    if not names:
        raise GradlabError(f"invalid layers {value!r}: give comma-separated layer names, e.g. blocks.0,head")
    return names


def load_source(cfg: dict):
    """``(model, data, device, description)`` from ``--run`` or from the model flags (fresh model)."""
    import torch

    from gradlab.data import load_dataset
    from gradlab.device import resolve_device
    from gradlab.errors import GradlabError
    from gradlab.models import MODEL_DEFAULTS, build_model
    from gradlab.models.options import resolve_options as resolve_model_options
    from gradlab.rundir import find_run, load_run

    if cfg["split"] not in ("train", "test"):
        raise GradlabError(f"invalid split {cfg['split']!r}; choose from: train, test")
    dev = resolve_device(cfg["device"])
    if cfg["run"] is not None:
        fresh = [k for k in ("model", "dataset", "data_dir", *MODEL_KEYS) if cfg[k] is not None]
        if fresh:
            raise GradlabError(f"--{fresh[0].replace('_', '-')} describes a fresh model; it cannot be combined with --run {cfg['run']}")
        source = find_run(cfg["runs_dir"], cfg["run"], require_checkpoint=True)
        loaded = load_run(str(source), cfg["runs_dir"], device=dev)
        name = loaded.config.get("model")
        desc = {"source_run": source.name, "model": name, "dataset": loaded.config.get("dataset")}
        desc.update({k: loaded.config.get(k, MODEL_DEFAULTS[k]) for k in _used_keys(name)})
        return loaded.model, loaded.data, dev, desc
    data = load_dataset(cfg["dataset"] or "digits", seed=cfg["seed"], data_dir=cfg["data_dir"])
    opts = {k: cfg[k] for k in MODEL_KEYS if cfg[k] is not None}
    torch.manual_seed(cfg["seed"])  # the initialisation is reproducible from --seed
    model = build_model(cfg["model"] or "mlp", data.spec, **opts).to(dev)
    desc = {"source_run": "", "model": cfg["model"] or "mlp", "dataset": data.name}
    used = _used_keys(desc["model"])
    desc.update({k: v for k, v in resolve_model_options(opts).items() if k in used})
    return model, data, dev, desc


def _used_keys(model_name) -> list:
    """The model flags that ``model_name`` uses (all of MODEL_KEYS for a user model)."""
    from gradlab.models import MODELS
    from gradlab.models.registry import used_options

    if isinstance(model_name, str) and model_name in MODELS:
        used = used_options(MODELS.entry(model_name).options)
        return [k for k in MODEL_KEYS if k in used]
    return list(MODEL_KEYS)


def split_tensors(data, split: str):
    x, y = (data.x_train, data.y_train) if split == "train" else (data.x_test, data.y_test)
    if x.shape[0] == 0:
        from gradlab.errors import GradlabError

        raise GradlabError(f"the {split} split of {data.name} is empty")
    return x, y


def sample_indices(n_total: int, count: int, seed: int):
    """``count`` indices of a seeded permutation, cycling through it when ``count > n_total``."""
    import torch

    perm = torch.randperm(n_total, generator=torch.Generator().manual_seed(seed))
    return perm[torch.arange(count) % n_total]


def command(
    model: ModelOpt = None,
    dataset: DatasetOpt = None,
    data_dir: DataDirOpt = None,
    depth: DepthOpt = None,
    width: WidthOpt = None,
    act: ActOpt = None,
    init: InitOpt = None,
    sigma_w: SigmaWOpt = None,
    sigma_b: SigmaBOpt = None,
    residual: ResidualOpt = None,
    norm: NormOpt = None,
    batches: Annotated[Optional[int], typer.Option(help="Batches to average over (>= 1); the spread across them is grad_norm_std. (default: 4)", rich_help_panel=PROBE)] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Examples per batch. (default: 128)", rich_help_panel=PROBE)] = None,
    split: SplitOpt = None,
    layers: LayersOpt = None,
    threshold: Annotated[Optional[float], typer.Option(help="Verdict threshold t: the signal norm's fitted growth factor per layer (towards the input) below 1/(1+t) is 'vanishing', above 1+t 'exploding', else 'stable'. (default: 0.1)", rich_help_panel=PROBE)] = None,
    train_mode: Annotated[Optional[bool], typer.Option("--train-mode/--eval-mode", help="Run the model in training mode (BatchNorm batch statistics, dropout on: what the optimiser sees) or eval mode; the model is restored either way. (default: train mode)", rich_help_panel=PROBE)] = None,
    run: RunRefOpt = None,
    runs_dir: RunsDirOpt = None,
    name: NameOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    config: ConfigOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Per-layer gradient norm, weight norm, their ratio and the backward signal norm ||dL/dh|| (per example).

    Verdict: a least-squares fit of log(signal norm) against depth gives the factor by which the backward signal is multiplied per layer on its way to the input; below 1/(1+t) it is 'vanishing', above 1+t 'exploding', else 'stable' (t = --threshold, default 0.1, i.e. 10% per layer).

    Writes gradnorm.csv, TensorBoard scalars (x axis = depth) and histograms, and plots/gradnorm.png.
    """
    from gradlab.errors import GradlabError

    flags = dict(
        model=model, dataset=dataset, data_dir=data_dir, depth=depth, width=width, act=act, init=init,
        sigma_w=sigma_w, sigma_b=sigma_b, residual=residual, norm=norm, batches=batches, batch_size=batch_size,
        split=split, layers=layers, threshold=threshold, train_mode=train_mode, run=run, runs_dir=runs_dir,
        name=name, seed=seed, device=device,
    )
    defaults = {**SOURCE_DEFAULTS, "batches": 4, "batch_size": 128, "threshold": 0.1, "train_mode": True}
    cfg = resolve_options(defaults, config, flags)
    for key in ("batches", "batch_size"):
        if isinstance(cfg[key], bool) or not isinstance(cfg[key], int) or cfg[key] < 1:
            raise GradlabError(f"invalid {key.replace('_', '-')}: {cfg[key]!r} (must be an integer >= 1)")
    if not isinstance(cfg["threshold"], (int, float)) or cfg["threshold"] <= 0:
        raise GradlabError(f"invalid threshold: {cfg['threshold']!r} (must be > 0)")
    layer_names = parse_layers(cfg["layers"])

    import torch.nn.functional as F

    from gradlab.probes.gradnorm import gradnorm_probe, probe_layers, select_layers
    from gradlab.probes.spectra_plots import gradnorm_figure

    net, data, dev, desc = load_source(cfg)
    select_layers(probe_layers(net), layer_names)  # unknown layer: fail before a folder exists
    x_all, y_all = split_tensors(data, cfg["split"])
    bs = min(cfg["batch_size"], x_all.shape[0])
    idx = sample_indices(x_all.shape[0], cfg["batches"] * bs, cfg["seed"]).view(cfg["batches"], bs)
    batch_list = [(x_all[i].to(dev), y_all[i].to(dev)) for i in idx]

    run_dir = start_run("probe-gradnorm", {**cfg, **desc})
    with run_dir:
        rep = gradnorm_probe(net, F.cross_entropy, batch_list, layers=layer_names,
                             threshold=float(cfg["threshold"]), train_mode=bool(cfg["train_mode"]))
        df = rep.to_frame()
        run_dir.write_csv("gradnorm.csv", df)
        tb = run_dir.tb
        for lg in rep.layers:  # scalars against depth: TensorBoard's step axis is the layer index
            for key in ("grad_norm", "weight_norm", "ratio", "signal_norm"):
                tb.add_scalar(f"gradnorm/{key}", getattr(lg, key), lg.layer)
            tb.add_histogram(f"signal_norm_per_example/{lg.name}", lg.signal_norm_per_example, 0)
        run_dir.log_metrics(0, None, "gradnorm", {"signal_rate": rep.rate, "loss": rep.loss})
        run_dir.save_figure(gradnorm_figure(rep), "gradnorm")
        line = verdict_line(rep)
        run_dir.log_text("gradnorm/verdict", line)
        if not quiet:
            where = desc["source_run"] or f"fresh {desc['model']} on {desc['dataset']} (seed {cfg['seed']})"
            render_table(df, title=f"gradient norms: {where}, {rep.n_batches} batches x {bs} ({cfg['split']} split)")
        console.print(line, highlight=False)
        finish_and_print(run_dir, "completed", {**rep.metrics(), **desc})


def verdict_line(rep) -> str:
    t = rep.threshold
    if rep.verdict == "undetermined":
        return "verdict: undetermined (a growth rate needs at least two layers)"
    return (f"verdict: {rep.verdict}: backward signal norm x{rep.rate:.3g} per layer towards the input "
            f"(log-linear fit over {len(rep.layers)} layers; threshold t={t:g}: vanishing below "
            f"{1 / (1 + t):.3g}, exploding above {1 + t:.3g})")
