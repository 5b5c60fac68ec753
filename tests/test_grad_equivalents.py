"""A training run's cost in gradient-equivalents (gradlab.curvature.cost), counted by mechanism
(forward/backward passes through the model, curvature products), against counts known
independently: each optimizer's own counters (torch L-BFGS' func_evals, Newton's hvp_count,
CG's iterations) or the method's definition (SGD 1, SAM 2 per step)."""

import pandas as pd
import pytest


def _trainer(opt, **over):
    from gradlab.training.loop import Trainer
    from gradlab.training.options import train_defaults, validate_train_config

    cfg = {**train_defaults(), "seed": 0, "device": "cpu", "max_train": 96, "epochs": 1, "batch_size": 32,
           "width": 8, "depth": 1, "opt": opt, **over}
    return Trainer(validate_train_config(cfg))


def _steps(trainer, k):
    """``k`` optimizer steps on the first batches; the cost after each."""
    batches = trainer.sampler.epoch_batches(0)
    costs = []
    for idx, n in batches[:k]:
        trainer.train_step(trainer.x_train[idx], trainer.y_train[idx], n)
        costs.append(trainer.cost.total)
    return costs


def test_sgd_is_one_per_step_and_sam_two():
    assert _steps(_trainer("sgd"), 3) == pytest.approx([1, 2, 3])
    assert _steps(_trainer("sam"), 3) == pytest.approx([2, 4, 6])
    assert _steps(_trainer("asam"), 2) == pytest.approx([2, 4])


def test_lbfgs_is_its_closure_evaluations():
    t = _trainer("lbfgs", max_iter=3)
    cost = _steps(t, 2)[-1]
    evals = t.optimizer.state[t.optimizer._params[0]]["func_evals"]  # torch's own count
    assert evals > 2 and cost == pytest.approx(evals)


@pytest.mark.parametrize("opt,over", [("newton", {"exact_max_params": 0, "cg_max_iter": 7}),
                                      ("saddle-free-newton", {"krylov_dim": 5})])
@pytest.mark.parametrize("rule,forward", [("fixed", 0.0), ("adaptive", 1 / 3)])
def test_newton_type_is_one_plus_its_hessian_products(opt, over, rule, forward):
    # the adaptive damping rule adds one forward pass per step (the loss after the step)
    t = _trainer(opt, damping_rule=rule, **over)
    cost = _steps(t, 2)[-1]
    assert t.optimizer.hvp_count > 2 and cost == pytest.approx(2 * (1 + forward) + t.optimizer.hvp_count)


def test_natural_gd_is_gradient_plus_cg_products_plus_one_forward():
    t = _trainer("natural-gd", cg_decay=0.0, cg_iters=6)  # no warm start: one product per CG iteration
    cost = _steps(t, 1)[-1]
    assert cost == pytest.approx(1 + t.optimizer.last["cg_iters"] + 1 / 3)


def test_kfac_adds_one_backward_pass_on_factor_steps():
    # factor steps 1 and 3: the sampled-label backward pass to the layer outputs (2/3) each
    assert _steps(_trainer("kfac", factor_every=2), 3) == pytest.approx([5 / 3, 8 / 3, 13 / 3])


def test_adahessian_counts_its_hutchinson_products():
    t = _trainer("adahessian")
    cost = _steps(t, 2)[-1]
    assert t.optimizer.hvp_count >= 1 and cost == pytest.approx(2 + t.optimizer.hvp_count)


def test_the_metrics_column_and_tensorboard(tmp_path):
    from gradlab.runs.folder import RunDir
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    t = _trainer("sam", epochs=2)  # 3 steps per epoch
    cfg = {**t.cfg, "runs_dir": str(tmp_path)}
    run = RunDir.create(tmp_path, "train", None, cfg, argv=["gradlab", "train"])
    result = t.fit(run)
    run.finish(result.status, result.metrics)
    m = pd.read_csv(run.path / "metrics.csv")
    assert list(m.columns)[-2:] == ["wall_time", "grad_equivalents"]
    assert (m["grad_equivalents"] == 2 * m["step"]).all()  # every row, test rows at epoch ends too
    assert set(m.loc[m["split"] == "test", "grad_equivalents"]) == {6, 12}
    assert result.metrics["grad_equivalents"] == pytest.approx(12)
    ea = EventAccumulator(str(run.path))
    ea.Reload()
    tb = {e.step: e.value for e in ea.Scalars("cost/grad_equivalents")}
    assert tb == {s: 2 * s for s in m["step"].unique()}


def test_evaluation_and_probes_are_not_training_cost():
    from gradlab.training.callbacks.metrics import evaluate

    t = _trainer("sgd")
    _steps(t, 1)
    evaluate(t.model, t.x_test, t.y_test)
    loss = t.loss_fn(t.model(t.x_train[:8]), t.y_train[:8])
    loss.backward()
    assert t.cost.total == pytest.approx(1)


def test_a_metrics_file_of_an_older_run_gets_the_column_empty(tmp_path):
    from gradlab.runs.logging import LEGACY_METRIC_COLUMNS, METRIC_COLUMNS, MetricsCSV
    from gradlab.runs.records import check_metrics

    path = tmp_path / "metrics.csv"
    path.write_text(",".join(LEGACY_METRIC_COLUMNS) + "\n1,0,train-step,loss,2.5,1700000000.000\n")
    check_metrics(tmp_path)  # an older run's file is not damage
    w = MetricsCSV(path)
    w.write(2, 0, "train-step", {"loss": 2.0}, 1700000001.0, cost=2.0)
    w.close()
    m = pd.read_csv(path)
    assert list(m.columns) == METRIC_COLUMNS and m["step"].tolist() == [1, 2]
    assert pd.isna(m["grad_equivalents"][0]) and m["grad_equivalents"][1] == 2.0
    check_metrics(tmp_path)
