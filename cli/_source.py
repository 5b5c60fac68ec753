"""Where a probe's model comes from: a trained ``--run`` or a fresh model built from the model
flags, and the options and helpers every probe command shares for that."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from typing_extensions import Annotated

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
    from gradlab.core.errors import GradlabError

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
    from gradlab.core.device import resolve_device
    from gradlab.core.errors import GradlabError
    from gradlab.models import build_model, model_options
    from gradlab.runs.records import find_run
    from gradlab.training.load import load_run

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
        defaults = model_options(name).defaults()
        desc.update({k: loaded.config.get(k, defaults[k]) for k in _used_keys(name)})
        return loaded.model, loaded.data, dev, desc
    data = load_dataset(cfg["dataset"] or "digits", seed=cfg["seed"], data_dir=cfg["data_dir"])
    opts = {k: cfg[k] for k in MODEL_KEYS if cfg[k] is not None}
    torch.manual_seed(cfg["seed"])  # the initialisation is reproducible from --seed
    model = build_model(cfg["model"] or "mlp", data.spec, **opts).to(dev)
    desc = {"source_run": "", "model": cfg["model"] or "mlp", "dataset": data.name}
    used = _used_keys(desc["model"])
    desc.update({k: v for k, v in model_options(desc["model"]).resolve(opts).items() if k in used})
    return model, data, dev, desc


def _used_keys(model_name) -> list:
    """The model flags that ``model_name`` uses (all of MODEL_KEYS for a user model)."""
    from gradlab.models import model_option_names

    used = model_option_names(model_name)
    return [k for k in MODEL_KEYS if k in used]


def split_tensors(data, split: str):
    x, y = (data.x_train, data.y_train) if split == "train" else (data.x_test, data.y_test)
    if x.shape[0] == 0:
        from gradlab.core.errors import GradlabError

        raise GradlabError(f"the {split} split of {data.name} is empty")
    return x, y


def sample_indices(n_total: int, count: int, seed: int):
    """``count`` indices of a seeded permutation, cycling through it when ``count > n_total``."""
    import torch

    perm = torch.randperm(n_total, generator=torch.Generator().manual_seed(seed))
    return perm[torch.arange(count) % n_total]
