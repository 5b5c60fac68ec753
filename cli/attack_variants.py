"""``gradlab attack NAME --source RUN`` (transfer) and ``--manifold pca:K`` (on-manifold): the
flags, their checks (before any run folder exists) and the manifold run's outputs.

The algorithms live in :mod:`gradlab.attacks.transfer` and :mod:`gradlab.attacks.manifold`;
:mod:`gradlab_cli.attack` calls :func:`prepare` after loading the target run and, for a manifold
run, :func:`write_manifold` instead of its own outputs.
"""

from __future__ import annotations

from functools import partial

from gradlab.core.options import Option, Options

VARIANTS = Options(
    Option("source", str, None, "transfer attack: craft the examples on this run's model (a run folder, a run id "
           "or 'last') and evaluate them on --run's; the table reports both models' accuracy",
           paper="Papernot et al. 2016"),
    Option("manifold", str, None, "on-manifold attack (fgsm, pgd, apgd): pca:K confines every step to the tangent "
           "space estimated by local PCA of the K nearest training examples; reports on- and off-manifold "
           "robust accuracy", paper="Stutz et al. 2019"),
    Option("tangent_dim", int, None, "--manifold: tangent dimension d (unset: the explained-variance rule)", low=1),
    Option("tangent_variance", float, 0.9, "--manifold: d is the fewest principal directions holding this "
           "fraction of the neighbours' variance", low=0, high=1, low_open=True),
)


class Variant:
    """What a transfer or manifold run needs beyond the plain attack: its sweep and its title."""

    def __init__(self, kind: str, sweep, title: str, extra: dict):
        self.kind, self.sweep, self.title, self.extra = kind, sweep, title, extra


def prepare(cfg: dict, attack: str, loaded, trust_code: bool, device):
    """The variant a config asks for (``None``: a plain attack), every mistake a GradlabError."""
    from gradlab.core.errors import GradlabError

    if cfg["source"] is not None and cfg["manifold"] is not None:
        raise GradlabError("--source and --manifold cannot be combined: run the transfer and the on-manifold attack separately")
    if cfg["source"] is not None:
        return _transfer(cfg, attack, loaded, trust_code, device)
    if cfg["manifold"] is not None:
        return _manifold(cfg, attack, loaded)
    if cfg["tangent_dim"] is not None:
        raise GradlabError("--tangent-dim needs --manifold pca:K")
    return None


def _transfer(cfg, attack, loaded, trust_code, device):
    from gradlab.attacks.transfer import check_compatible, transfer_sweep
    from gradlab.core.errors import GradlabError
    from gradlab.runs.records import find_run
    from gradlab.training.load import load_run

    path = find_run(cfg["runs_dir"], cfg["source"], require_checkpoint=True)
    source = load_run(str(path), cfg["runs_dir"], device=device, trust_code=trust_code)
    why = check_compatible(source.data.spec, loaded.data.spec)
    if why is not None:
        raise GradlabError(f"--source {cfg['source']}: run {path.name}'s model {why}")
    cfg["source"] = str(path)
    return Variant("transfer", partial(_transfer_call, transfer_sweep, source.model), f"crafted on {path.name}",
                   {"transfer_source": path.name})


def _transfer_call(fn, source_model, model, *args, **kwargs):
    return fn(source_model, model, *args, **kwargs)


def _manifold(cfg, attack, loaded):
    from gradlab.attacks.manifold import SUPPORTED, LocalPCA, parse_manifold
    from gradlab.core.errors import GradlabError

    k = parse_manifold(cfg["manifold"])
    if attack not in SUPPORTED:
        raise GradlabError(f"--manifold works with the attacks {', '.join(SUPPORTED)}, not {attack!r}")
    if cfg["save_adv"]:
        raise GradlabError("--save-adv is not available with --manifold (three attacks per eps)")
    estimator = LocalPCA(loaded.data.x_train, k, cfg["tangent_dim"], cfg["tangent_variance"])
    rule = f"d = {cfg['tangent_dim']}" if cfg["tangent_dim"] else f"d: {cfg['tangent_variance']:g} of the variance"
    return Variant("manifold", partial(_manifold_call, estimator), f"manifold pca:{k}, {rule}", {"manifold": f"pca:{k}"})


def _manifold_call(estimator, model, x, y, attack, eps_list, batch_size, *, keep_adv=False, progress=None, **opts):
    from gradlab.attacks.manifold import manifold_sweep

    return manifold_sweep(model, x, y, attack, eps_list, estimator, batch_size, progress=progress, **opts)


def write_manifold(run_dir, table, attack: str, cfg: dict) -> None:
    """attack.csv, TensorBoard scalars (step = eps x 10^4) and the on/off-manifold accuracy plot."""
    from gradlab.attacks.plots import accuracy_vs_eps

    run_dir.write_csv("attack.csv", table)
    for row in table.itertuples(index=False):
        run_dir.log_metrics(int(round(row.eps * 10_000)), None, "attack", {
            "clean_acc": row.clean_acc, "robust_acc": row.robust_acc, "robust_on": row.robust_on,
            "robust_off": row.robust_off, "tangent_dim": row.tangent_dim, "leak": row.leak})
    run_dir.log_text("attack/steps", "TensorBoard step = eps x 10000 (pixel units)")
    curves = []
    for col, label in (("robust_acc", "unconstrained"), ("robust_on", "on-manifold"), ("robust_off", "off-manifold")):
        part = table[["eps", "clean_acc"]].copy()
        part["robust_acc"], part["attack"] = table[col], f"{attack} {label}"
        curves.append(part)
    import pandas as pd

    run_dir.save_figure(accuracy_vs_eps(pd.concat(curves, ignore_index=True),
                                        title=f"{attack} ({cfg['norm']}, {cfg['manifold']})"), "accuracy_vs_eps")


__all__ = ["VARIANTS", "Variant", "prepare", "write_manifold"]
