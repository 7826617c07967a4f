"""``tracking: [tensorboard, mlflow]`` (issue 29): every metrics.jsonl record is mirrored at step = round, a resumed
run logs no step twice, and a tracker that is not installed is one warning, never a failed run."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

from prelort import runner
from prelort.rundir import RunDir
from prelort.tracking import scalars

# three rounds, both trackers (the rest: the tiny_config fixture, conftest.py)
TRACKED = ["rounds=3", "tracking=[tensorboard, mlflow]"]


def tb_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar TensorBoard shows for the run: ``{tag: [(step, value), ...]}`` in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(RunDir(run_dir).tb_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_scalar_names_follow_the_record_kind_and_tier():
    assert scalars({"round": 2, "rank": 4, "kind": "tier", "accuracy": 0.5, "rougeL": None, "seed": 0}) == {
        "tier_4/accuracy": 0.5
    }
    assert scalars({"round": 0, "rank": "base", "kind": "base", "perplexity": 9.0}) == {"base/perplexity": 9.0}
    train = {"round": 1, "rank": None, "kind": "train", "train_loss": 2.5, "rejected": 1, "dp_epsilon": 3.0}
    assert scalars(train) == {"train/train_loss": 2.5, "train/rejected": 1.0, "train/dp_epsilon": 3.0}
    # a kind prelort does not know: the same rule; nested mappings dotted; text, lists, bools, nan skipped
    fed = {"round": 3, "kind": "federated_eval", "loss": 1.0, "by": {"a": 2}, "clients": [1, 2], "ok": True}
    fed["nan"] = float("nan")
    assert scalars(fed) == {"federated_eval/loss": 1.0, "federated_eval/by.a": 2.0}


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, tiny_config) -> Path:
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    d = tmp_path_factory.mktemp("tracked") / "run"
    runner.run(tiny_config(*TRACKED), d, verbose=False)
    return d


def test_tensorboard_holds_every_record_at_step_round(tracked, check_run):
    check_run(tracked)
    tb = tb_scalars(tracked)
    records = RunDir(tracked).metrics.records()
    expected: dict[str, list[tuple[int, float]]] = {}
    for rec in records:
        for name, value in scalars(rec).items():
            expected.setdefault(name, []).append((rec["round"], value))
    assert [step for step, _ in tb["tier_4/accuracy"]] == [1, 2, 3]
    assert [step for step, _ in tb["train/train_loss"]] == [1, 2, 3]
    assert [step for step, _ in tb["base/accuracy"]] == [0]
    assert set(tb) == set(expected)
    for name, points in expected.items():
        assert [s for s, _ in tb[name]] == [s for s, _ in points], name
        assert [v for _, v in tb[name]] == pytest.approx([v for _, v in points], rel=1e-6), name


def test_mlflow_finds_the_run_with_its_parameters_and_metrics(tracked):
    import mlflow
    from mlflow.tracking import MlflowClient

    store = f"sqlite:///{RunDir(tracked).mlflow_db}"
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(store)
    try:
        runs = mlflow.search_runs(
            experiment_names=["prelort"],
            filter_string=f"tags.`prelort.run_dir` = '{tracked.resolve()}'",
            output_format="list",
        )
    finally:
        mlflow.set_tracking_uri(previous)
    assert len(runs) == 1
    client = MlflowClient(tracking_uri=store)
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["method"] == "prelort" and run.data.params["rounds"] == "3"
    assert run.data.params["clients.ranks"] == "[2, 4]"
    history = client.get_metric_history(run.info.run_id, "tier_4/accuracy")
    assert sorted(m.step for m in history) == [1, 2, 3]
    final = [r for r in RunDir(tracked).metrics.records() if r["kind"] == "tier" and r["rank"] == 2][-1]
    latest = scalars(final)  # MLflow's metrics: the value at the last step
    assert latest and {k: run.data.metrics[k] for k in latest} == pytest.approx(latest)


def test_an_interrupted_and_resumed_run_logs_each_step_once(tmp_path, monkeypatch, tracked, tiny_config):
    from mlflow.tracking import MlflowClient

    d = tmp_path / "run"
    real = runner.Session.evaluate_tier_examples
    calls = [0]

    def interrupt_at_round_2_tier_4(self, t):  # after round 2's tier-2 record: tier 4 missing
        calls[0] += 1
        if calls[0] == 4:
            raise KeyboardInterrupt
        return real(self, t)

    monkeypatch.setattr(runner.Session, "evaluate_tier_examples", interrupt_at_round_2_tier_4)
    with pytest.raises(runner.RunInterrupted):
        runner.run(tiny_config(*TRACKED), d, verbose=False)
    monkeypatch.undo()
    client = MlflowClient(tracking_uri=f"sqlite:///{RunDir(d).mlflow_db}")
    (interrupted,) = client.search_runs([client.get_experiment_by_name("prelort").experiment_id])
    assert interrupted.info.status == "KILLED"

    runner.run(tiny_config(*TRACKED), d, resume=True, verbose=False)
    resumed, reference = tb_scalars(d), tb_scalars(tracked)
    assert set(resumed) == set(reference)
    for name, points in reference.items():
        assert [s for s, _ in resumed[name]] == [s for s, _ in points], name  # no step twice, none missing
        if name != "train/seconds":  # wall-clock time: the one field that differs between runs
            assert [v for _, v in resumed[name]] == pytest.approx([v for _, v in points], rel=1e-6), name
    (run,) = client.search_runs([client.get_experiment_by_name("prelort").experiment_id])  # the same MLflow run
    assert run.info.run_id == interrupted.info.run_id and run.info.status == "FINISHED"
    for name in ("tier_4/accuracy", "tier_2/accuracy", "train/train_loss"):
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, name)) == [1, 2, 3], name


def test_without_the_trackers_installed_the_run_finishes_with_one_warning(
    tmp_path, monkeypatch, caplog, check_run, tiny_config
):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # `import` of either raises ImportError
    monkeypatch.setitem(sys.modules, "mlflow", None)
    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)
    monkeypatch.setitem(sys.modules, "mlflow.entities", None)
    d = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="prelort"):
        logging.getLogger("prelort").addHandler(caplog.handler)
        try:
            runner.run(tiny_config(*TRACKED, "rounds=1"), d, verbose=False)
        finally:
            logging.getLogger("prelort").removeHandler(caplog.handler)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "tensorboard and mlflow not installed" in warnings[0] and "prelort[tracking]" in warnings[0]
    check_run(d)
    assert not RunDir(d).tb_dir.exists() and not RunDir(d).mlflow_db.exists()


def test_a_failing_tracker_is_one_warning_and_the_run_goes_on(tmp_path, monkeypatch, caplog, check_run, tiny_config):
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    def broken(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(SummaryWriter, "add_scalar", broken)
    d = tmp_path / "run"
    logging.getLogger("prelort").addHandler(caplog.handler)
    try:
        runner.run(tiny_config("rounds=1", "tracking=[tensorboard]"), d, verbose=False)
    finally:
        logging.getLogger("prelort").removeHandler(caplog.handler)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == ["tracking: tensorboard failed (OSError: disk full); the run goes on without it"]
    check_run(d)
