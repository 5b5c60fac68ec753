"""Where a probe's model comes from, and how its examples are drawn.

The model is either a trained run (``run``: a run folder, a run id, or ``last``) or a fresh
model at initialisation built from the model options (seeded by the run's ``seed``). The
options every probe shares for that are declared once here (:data:`SOURCE_OPTIONS`), with the
per-probe ones that share a meaning (:data:`LAYER_OPTIONS`, :func:`batch_options`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

from gradlab.core.errors import GradlabError
from gradlab.core.modelstate import BATCH_NORMS, model_state
from gradlab.core.options import Option, Options
from gradlab.models.options import ACTIVATIONS, INITS, NORMS

#: Model options a fresh model takes (None: the model's own default; not allowed with ``run``).
MODEL_KEYS = ("depth", "width", "act", "init", "sigma_w", "sigma_b", "residual", "residual_scale", "norm")

RUN_OPTION = Option("run", str, None, "Source run: a run folder, a run id under --runs-dir, or 'last' (the newest trained run)")
SPLIT_OPTION = Option("split", str, "train", "Draw examples from the train or test split", choices=("train", "test"))

#: A trained run or a fresh model, and the split to draw from: what most probes take.
SOURCE_OPTIONS = Options(
    RUN_OPTION,
    Option("model", str, None, "Fresh model (see `gradlab list models`; instead of --run) (default: mlp)"),
    Option("dataset", str, None, "Dataset of a fresh model (see `gradlab list datasets`) (default: digits)"),
    Option("data_dir", str, None, "Folder with dataset files (else $GRADLAB_DATA)"),
    Option("depth", int, None, "MLP hidden layers (default: 2)", low=1),
    Option("width", int, None, "MLP hidden width (default: 128)", low=1),
    Option("act", str, None, "Activation (default: relu)", choices=ACTIVATIONS),
    Option("init", str, None, "Initialisation (default: default)", choices=INITS),
    Option("sigma_w", float, None, "Weight scale for init gaussian (W ~ N(0, sigma_w^2/fan_in)) or orthogonal (gain) (default: 1)",
           low=0, low_open=True, paper="Poole et al. 2016"),
    Option("sigma_b", float, None, "Bias std for init gaussian|orthogonal (default: 0)", low=0),
    Option("residual", bool, None, "Skip connections h + f(h) in the MLP"),
    Option("residual_scale", float, None, "MLP residual blocks h + eps*f(h) (implies --residual)", low=0),
    Option("norm", str, None, "Normalisation layers (default: auto)", choices=NORMS),
    SPLIT_OPTION,
)

#: A trained run only (``last`` when not given), and the split.
TRAINED_SOURCE_OPTIONS = Options(RUN_OPTION, SPLIT_OPTION)

LAYER_OPTIONS = Options(
    Option("layers", str, None, "Comma-separated layer names to probe, e.g. blocks.0,blocks.3,head (default: all)"),
)


def batch_options(batches: Optional[int], batch_size: int, batches_help: str = "Batches to average over",
                  low: int = 1) -> Options:
    """``batches`` and ``batch_size`` with a probe's own defaults (``batches=None``: all; a
    probe that reads 0 as "all" passes ``low=0``)."""
    return Options(
        Option("batches", int, batches, batches_help, low=low),
        Option("batch_size", int, batch_size, "Examples per batch", low=1),
    )


@dataclass
class ModelSource:
    """A loaded model and where it came from.

    ``description`` (``source_run``, ``model``, ``dataset`` and the model options it uses) goes
    into ``config.yaml`` and ``summary.csv``; ``run_path``/``run_config`` are None/empty for a
    fresh model; ``extras`` holds what a probe's own loader adds (e.g. a simplex).
    """

    model: Any
    data: Any
    device: Any
    description: dict
    split_name: str = "train"
    seed: int = 0
    runs_dir: str = "runs"
    run_path: Optional[Path] = None
    run_config: dict = field(default_factory=dict)
    extras: dict = field(default_factory=dict)
    trust_code: bool = False  # --trust-code: other runs it loads (landscape --to) may import user models

    @property
    def fresh(self) -> bool:
        return self.run_path is None

    @property
    def where(self) -> str:
        """``20260101-...-train`` or ``fresh mlp on digits (seed 0)``, for table titles."""
        d = self.description
        return d["source_run"] or f"fresh {d['model']} on {d['dataset']} (seed {self.seed})"

    def split(self, name: Optional[str] = None):
        """``(x, y)`` of the chosen split (CPU tensors); GradlabError when it is empty."""
        return split_tensors(self.data, name or self.split_name)


def load_source(cfg: Mapping[str, Any], *, device) -> ModelSource:
    """The model of ``cfg["run"]``, or a fresh one from the model options in ``cfg``.

    ``cfg`` holds ``run``, ``split``, ``seed``, ``runs_dir`` and, when the probe takes a fresh
    model, ``model``, ``dataset``, ``data_dir`` and :data:`MODEL_KEYS` (None = not given).
    Without ``model`` in ``cfg`` the probe needs a trained run and ``run`` defaults to ``last``.
    """
    import torch

    from gradlab.data import load_dataset
    from gradlab.models import build_model, model_options
    from gradlab.runs import find_run
    from gradlab.training.load import load_run

    split = cfg.get("split", "train")
    seed = cfg.get("seed", 0)
    runs_dir = cfg.get("runs_dir", "runs")
    takes_fresh = "model" in cfg
    if cfg.get("run") is not None or not takes_fresh:
        fresh = [k for k in ("model", "dataset", "data_dir", *MODEL_KEYS) if cfg.get(k) is not None]
        if fresh:
            raise GradlabError(f"--{fresh[0].replace('_', '-')} describes a fresh model; it cannot be combined with --run {cfg['run']}")
        path = find_run(runs_dir, cfg.get("run") or "last", require_checkpoint=True)
        loaded = load_run(str(path), runs_dir, device=device, trust_code=bool(cfg.get("trust_code")))
        name = loaded.config.get("model")
        desc = {"source_run": path.name, "model": name, "dataset": loaded.config.get("dataset")}
        defaults = model_options(name).defaults()
        desc.update({k: loaded.config.get(k, defaults[k]) for k in _used_keys(name)})
        return ModelSource(loaded.model, loaded.data, device, desc, split, seed, runs_dir, loaded.path, dict(loaded.config),
                           trust_code=bool(cfg.get("trust_code")))
    data = load_dataset(cfg.get("dataset") or "digits", seed=seed, data_dir=cfg.get("data_dir"))
    opts = {k: cfg[k] for k in MODEL_KEYS if cfg.get(k) is not None}
    torch.manual_seed(seed)  # the initialisation is reproducible from the seed
    model_name = cfg.get("model") or "mlp"
    model = build_model(model_name, data.spec, **opts).to(device)
    desc = {"source_run": "", "model": model_name, "dataset": data.name}
    used = _used_keys(model_name)
    desc.update({k: v for k, v in model_options(model_name).resolve(opts).items() if k in used})
    return ModelSource(model, data, device, desc, split, seed, runs_dir)


def _used_keys(model_name) -> list:
    """The model options of :data:`MODEL_KEYS` that ``model_name`` takes (a user model: the zoo's)."""
    from gradlab.models import model_option_names

    used = model_option_names(model_name)
    return [k for k in MODEL_KEYS if k in used]


def parse_layers(value) -> Optional[list]:
    """``"blocks.0, head"`` (or a list) -> names; None keeps every layer."""
    if value is None:
        return None
    names = value if isinstance(value, (list, tuple)) else str(value).split(",")
    names = [str(n).strip() for n in names if str(n).strip()]
    if not names:
        raise GradlabError(f"invalid layers {value!r}: give comma-separated layer names, e.g. blocks.0,head")
    return names


def split_tensors(data, split: str):
    """``(x, y)`` of ``split`` ("train" or "test") of a Dataset."""
    if split not in ("train", "test"):
        raise GradlabError(f"invalid split: {split!r} (must be one of: train, test)")
    x, y = (data.x_train, data.y_train) if split == "train" else (data.x_test, data.y_test)
    if x.shape[0] == 0:
        raise GradlabError(f"the {split} split of {data.name} is empty")
    return x, y


def sample_indices(n_total: int, count: int, seed: int):
    """``count`` indices of a seeded permutation, cycling through it when ``count > n_total``."""
    import torch

    perm = torch.randperm(n_total, generator=torch.Generator().manual_seed(seed))
    return perm[torch.arange(count) % n_total]


def sampled_batches(x, y, batches: int, batch_size: int, seed: int, device) -> list:
    """``batches`` batches of ``min(batch_size, N)`` examples of one seeded permutation of the
    ``N`` examples (cycled when more are asked for than exist), on ``device``."""
    bs = min(batch_size, x.shape[0])
    idx = sample_indices(x.shape[0], batches * bs, seed).view(batches, bs)
    return [(x[i].to(device), y[i].to(device)) for i in idx]


def recalibrate_batchnorm(model, inputs) -> bool:
    """Give ``model``'s BatchNorm layers the running statistics of ``inputs`` (B, *input_shape).

    At initialisation the running statistics are (0, 1), so eval mode (which per-example maps
    need) would make BatchNorm the identity; :func:`torch.optim.swa_utils.update_bn` resets them
    and takes one cumulative average over ``inputs`` in train mode (Izmailov et al. 2018 do the
    same for averaged weights). Every module's train/eval flag is restored. Returns whether the
    model had BatchNorm layers that track statistics.
    """
    from torch.optim.swa_utils import update_bn

    if not any(isinstance(m, BATCH_NORMS) and m.track_running_stats for m in model.modules()):
        return False
    with model_state(model):  # update_bn restores only the top module's flag
        update_bn([inputs], model)
    return True
