"""``gradlab attack`` on a run trained from a streamed dataset (``stream=true``): the whole test
split (or ``--n-examples`` of it) is read batch by batch and attacked batch by batch
(:func:`gradlab.attacks.streamed.streamed_robustness`), so no more than a few batches are ever in
memory. It writes ``attack.csv``, the TensorBoard scalars, the accuracy plot and the summary; the
image grid, ``--save-adv`` and the transfer/on-manifold variants need the examples in memory and
are refused or skipped (one line)."""

from __future__ import annotations

import sys


def attack_streamed(source, loaded, dev, info, attack, eps_list, cfg, opts, quiet) -> None:
    import math

    from gradlab.attacks.streamed import streamed_robustness
    from gradlab.core.budgets import check_eps, check_target_class
    from gradlab.core.errors import GradlabError
    from gradlab.core.losses import run_loss
    from gradlab_cli._common import console, finish_and_print, render_table, start_run

    data = loaded.data
    for key in ("source", "manifold", "tangent_dim"):
        if cfg.get(key) is not None:
            raise GradlabError(f"--{key.replace('_', '-')} needs the test set in memory; run {source.name} streams "
                               f"{data.name} (stream=true)")
    if cfg["save_adv"]:
        raise GradlabError(f"--save-adv keeps every adversarial image; run {source.name} streams {data.name} "
                           f"(stream=true): attack without it or with --n-examples on an in-memory run")
    n_total = data.size("test")
    n = n_total if cfg["n_examples"] is None else min(cfg["n_examples"], n_total)
    if n == 0:
        raise GradlabError(f"run {source.name} has an empty test split: nothing to attack")
    for e in eps_list:
        check_eps(e, cfg["norm"], math.prod(data.input_shape))
    check_target_class(cfg["target_class"], data.spec.num_classes)
    cfg["run"], cfg["loss"] = str(source), run_loss(loaded.config)
    loader = data.loader("test", cfg["batch_size"], dist=info, limit=n)
    run_dir = start_run("attack", {**cfg, "eps": eps_list}, enabled=info.is_main)
    with run_dir:
        args = (loaded.model, loader, attack, eps_list)
        kw = dict(dist=info, criterion=cfg["loss"], **opts)
        if quiet or not sys.stdout.isatty():
            table = streamed_robustness(*args, **kw)
        else:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

            with Progress(BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console,
                          transient=True) as bar:
                task = bar.add_task(attack, total=-(-n // info.world_size))
                table = streamed_robustness(*args, progress=lambda done: bar.update(task, completed=done), **kw)
        run_dir.write_csv("attack.csv", table)
        if run_dir.enabled:
            from gradlab.attacks.plots import accuracy_vs_eps

            for row in table.itertuples(index=False):
                run_dir.log_metrics(int(round(row.eps * 10_000)), None, "attack", {
                    "clean_acc": row.clean_acc, "robust_acc": row.robust_acc, "success_rate": row.success_rate})
            run_dir.save_figure(accuracy_vs_eps(table, title=f"{attack} ({cfg['norm']}, streamed)"), "accuracy_vs_eps")
        if not quiet:
            render_table(table[["eps", "clean_acc", "robust_acc", "success_rate", "mean_linf", "mean_l2", "n"]],
                         title=f"{attack} on {source.name} ({n} of {n_total} test examples streamed, norm {cfg['norm']})")
        worst = table.iloc[table["eps"].values.argmax()]
        finish_and_print(run_dir, "completed", {
            "attack": attack, "source_run": source.name, "norm": cfg["norm"], "n": int(n), "streamed": True,
            "clean_acc": float(worst["clean_acc"]), "max_eps": float(worst["eps"]),
            "robust_acc": float(worst["robust_acc"]), "success_rate": float(worst["success_rate"]), "model_mode": "eval"})
