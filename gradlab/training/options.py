"""The options of ``gradlab train`` itself, declared once.

Model, dataset and optimizer options belong to those plug-ins (their registries); what is here
is the training run: what to train, for how long, how often to log, checkpoint and probe, and
adversarial training. :data:`TRAIN_OPTIONS` is the declaration the CLI flags, ``--set``, YAML
files and the Python API are checked against.
"""

from __future__ import annotations

from gradlab.core.errors import GradlabError, check
from gradlab.core.losses import DEFAULT_LOSS, LOSSES
from gradlab.core.options import Option, Options
from gradlab.core.precision import precision_option

TRAIN_OPTIONS = Options(
    Option("model", str, "mlp", "model name (see `gradlab list models`) or package.module:factory"),
    Option("dataset", str, "digits", "dataset (see `gradlab list datasets`)"),
    Option("data_dir", str, None, "folder with dataset files (else $GRADLAB_DATA, else downloads into "
                                  "~/.cache/gradlab)"),
    Option("opt", str, "adam", "optimizer (see `gradlab list optimizers`)"),
    # a train option, not an optimizer's: it wraps any optimizer and needs the run's length
    Option("schedule", str, "constant", "learning-rate schedule over the run's steps",
           choices=("constant", "cosine", "step"), paper="cosine: Loshchilov & Hutter 2017; step: He et al. 2016"),
    Option("loss", str, DEFAULT_LOSS, "training loss: cross-entropy, or mse (squared error to the one-hot "
                                      "target, summed over classes, mean over examples); probes and attacks "
                                      "on the run use it by default", choices=LOSSES),
    Option("epochs", int, 15, "passes over the training set", low=1),
    Option("batch_size", int, 64, "global batch size (split across torchrun processes)", low=1, label="batch size"),
    Option("max_seconds", float, None, "wall-time budget: stop once training has run this many seconds (over "
                                       "resumes), closing the epoch in progress with a test evaluation and a "
                                       "checkpoint; the run ends completed (default: no budget)",
           low=0, low_open=True, label="max-seconds"),
    Option("log_every", int, 50, "per-layer gradient histograms every N steps", low=1, label="log-every"),
    Option("log_every_steps", int, 10, "per-step loss, learning rate and gradient norm (metrics.csv and "
                                       "TensorBoard) every N steps; 1 logs every step", low=1, label="log-every-steps"),
    Option("checkpoint_seconds", float, 30.0, "write checkpoints/last.pt every this many seconds (also inside "
                                              "an epoch) and at the first epoch's end (always at the end, on "
                                              "Ctrl-C/SIGTERM and on divergence; 0: every epoch)", low=0,
           label="checkpoint-seconds"),
    Option("max_loss", float, None, "stop as diverged when a step's loss exceeds this (default: 1000 x the "
                                    "first epoch's mean loss; NaN/inf loss or gradient norm always stops)",
           low=0, low_open=True, label="max-loss"),
    Option("keep_checkpoints", int, 0, "keep N weight snapshots along training (for landscape PCA)", low=0, label="keep-checkpoints"),
    Option("hessian_every", int, 0, "log the Hessian's lambda_max and trace every N steps (0: off); "
                                    "the same as --probe hessian:every=N", low=0, label="hessian-every"),
    Option("probe_every", int, 0, "log per-layer gradient and signal norms every N steps (0: off); "
                                  "the same as --probe gradnorm:every=N", low=0, label="probe-every"),
    Option("probe", str, None, "probes during training, comma-separated NAME:every=N[:KEY=VALUE...], "
                               "e.g. hessian:every=100,gradnorm:every=50"),
    precision_option("arithmetic of the forward and backward passes: fp32, bf16 (autocast), or "
                     "fp16 (autocast with a gradient scaler for first-order optimizers)"),
    Option("adv", str, None, "adversarial training with this attack: fgsm, pgd, or any registered attack that "
                             "declares itself trainable"),
    Option("adv_eps", float, 0.1, "adversarial training budget (L-inf, pixel units)", low=0, low_open=True,
           high=1, label="adv-eps"),
    Option("adv_ratio", float, 0.5, "weight of the adversarial loss (0.5: Goodfellow et al.; 1: Madry et al.)",
           low=0, low_open=True, high=1, paper="Goodfellow et al. 2015; Madry et al. 2018", label="adv-ratio"),
    Option("adv_warmup", float, 0.0, "epochs over which the adversarial budget ramps linearly from 0 to "
                                     "--adv-eps, step by step (0: the full budget from the first step)",
           low=0, label="adv-warmup"),
)

BASE_DEFAULTS = TRAIN_OPTIONS.defaults()

def train_defaults() -> dict:
    """Every key ``gradlab train`` accepts, with its default (model, data and optimizer options too)."""
    from gradlab.data import DATASET_OPTIONS
    from gradlab.models import ZOO_OPTIONS
    from gradlab.optim import OPTIMIZERS

    # every optimizer's option names; None: the chosen optimizer's own default
    optim = {name: None for name in OPTIMIZERS.declarations()}
    return {**BASE_DEFAULTS, **ZOO_OPTIONS.defaults(), **DATASET_OPTIONS.defaults(), **optim}


def check_train_option(name: str, value):
    """``value`` checked and converted by its declaration in :data:`TRAIN_OPTIONS`."""
    return TRAIN_OPTIONS[name].check(value)


def validate_train_config(cfg: dict) -> dict:
    """Check what can be checked before a run folder exists (types, ranges, names, the probe
    spec); fill in the optimizer's own learning rate so config.yaml records the value used."""
    from gradlab.data import DATASETS
    from gradlab.optim import OPTIMIZERS, default_lr, resolve_options
    from gradlab.training.callbacks.probes import probe_callbacks

    for name in TRAIN_OPTIONS.names():
        if name in cfg:
            cfg[name] = check_train_option(name, cfg[name])
    if cfg.get("lr") is not None:
        check(cfg["lr"] > 0, f"invalid lr: {cfg['lr']} (must be > 0)")
    DATASETS.entry(cfg["dataset"])
    OPTIMIZERS.entry(cfg["opt"])
    # before any data loads: a bad optimizer value, or another optimizer's key, in one line
    resolve_options(cfg["opt"], **{k: cfg[k] for k in OPTIMIZERS.declarations() if k in cfg})
    if cfg["adv"] is not None:
        from gradlab.attacks import ATTACKS

        able = [e.name for e in ATTACKS if getattr(e.obj, "trainable", False)]
        if cfg["adv"] not in able:
            raise GradlabError(f"invalid adv: {cfg['adv']!r} (must be one of: {', '.join(able)}): only attacks "
                               f"declared trainable craft a batch every training step")
    probe_callbacks(cfg)  # a bad --probe spec fails here, before any data loads
    if cfg.get("lr") is None:
        cfg["lr"] = default_lr(cfg["opt"])
    return cfg


__all__ = ["TRAIN_OPTIONS", "BASE_DEFAULTS", "train_defaults", "validate_train_config", "check_train_option"]
