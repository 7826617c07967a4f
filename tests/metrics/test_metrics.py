"""The metric registry (prelort.metrics): the built-in metrics, their checks and formats, and a new metric
that is one file (tests/metrics/nll.py) registered from the test suite, followed end to end on the tiny
model: computed in evaluation, written to metrics.jsonl, shown by ``prelort report``, accepted by
``prelort check``."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from prelort import metrics
from prelort.apps.cli import app
from prelort.check import check_run_dir
from prelort.config import load
from prelort.metrics import EvalResults, Metric
from prelort.runner import run

HERE = Path(__file__).resolve().parent
TINY = HERE.parents[1] / "examples" / "tiny.yaml"
FAST = [
    "train.local_steps=1",
    "train.batch_size=2",
    "data.max_length=32",
    "data.num_test=4",
    "data.num_train=64",
    "eval.max_examples=2",
    "eval.max_new_tokens=1",
    "eval.truncation_curve=false",
    "rounds=1",
]


@pytest.fixture
def nll(load_plugin):
    """The extra metric, registered while the test runs (loading its file registers it), then removed again."""
    module = load_plugin(HERE / "nll.py")
    yield module.NLL
    metrics.unregister("nll")


def _results(mode: str) -> EvalResults:
    records = [{"instruction": "q", "output": "Paris"}, {"instruction": "q", "output": "the cat sat on the mat"}]
    examples = [
        {"id": "a", "category": "", "correct": 1, "loglik": -2.0, "n_tokens": 2, "prediction": "paris."},
        {"id": "b", "category": "", "correct": 0, "loglik": -6.0, "n_tokens": 6, "prediction": "the cat on the mat"},
    ]
    if mode == "teacher_forced":
        examples = [{**ex, "prediction": None} for ex in examples]
    return EvalResults(mode=mode, records=records, examples=examples)


def test_the_built_in_metrics_in_the_order_of_records_and_tables():
    assert metrics.names() == ("accuracy", "rougeL", "perplexity")
    assert [m.header for m in metrics.available()] == ["accuracy", "ROUGE-L", "perplexity"]
    assert [m.log_axis for m in metrics.available()] == [False, False, True]
    assert [m.higher_is_better for m in metrics.available()] == [True, True, False]


def test_each_built_in_metric_is_computed_from_the_per_example_results():
    generated = metrics.compute(_results("generate"))
    assert list(generated) == ["accuracy", "rougeL", "perplexity"]
    assert generated["accuracy"] == 0.5
    assert generated["rougeL"] == pytest.approx((1.0 + 10 / 11) / 2)
    assert generated["perplexity"] == pytest.approx(math.exp(8 / 8))  # pooled over tokens, not per example
    forced = metrics.compute(_results("teacher_forced"))
    assert forced["rougeL"] is None and forced["accuracy"] == 0.5
    with pytest.raises(ValueError, match="no response token to score"):
        metrics.get("perplexity").compute(
            EvalResults("teacher_forced", [{"output": "x"}], [{"correct": 0, "loglik": 0.0, "n_tokens": 0}])
        )


def test_check_and_format_say_what_prelort_check_and_the_tables_have_always_said():
    accuracy, rouge, ppl = metrics.available()
    assert accuracy.check(None) is None and accuracy.check(0) is None and accuracy.check(1.0) is None
    assert accuracy.check(1.5) == "accuracy=1.5 not in [0, 1]"
    assert rouge.check(True) == "rougeL=True not in [0, 1]"
    assert rouge.check(float("nan")) == "rougeL=nan not in [0, 1]"
    assert ppl.check(1.0) is None and ppl.check(0.5) == "perplexity=0.5"
    assert ppl.check(float("inf")) == "perplexity=inf" and ppl.check("3") == "perplexity='3'"
    assert accuracy.format(0.25) == "0.250" and ppl.format(61234.5678) == "61234.57"
    assert rouge.format(None) == "n/a" and rouge.format(math.nan) == "n/a"


def test_the_registry_refuses_a_second_metric_of_a_name_and_a_record_field_as_a_name():
    again = Metric(
        name="accuracy",
        compute=lambda r: 0.0,
        header="a",
        title="a",
        short="a",
        digits=3,
        bounds=(0.0, 1.0),
        higher_is_better=True,
    )
    with pytest.raises(ValueError, match="metric 'accuracy' registered twice"):
        metrics.register(again)
    with pytest.raises(ValueError, match="metric name 'n' is a field of every evaluation record"):
        metrics.register(Metric(**{**again.__dict__, "name": "n"}))
    with pytest.raises(KeyError, match="metric 'nll' is not registered"):
        metrics.unregister("nll")
    with pytest.raises(KeyError, match="unknown metric 'bleu'; registered: accuracy, rougeL, perplexity"):
        metrics.get("bleu")
    assert metrics.names() == ("accuracy", "rougeL", "perplexity")


def test_a_new_metric_flows_from_evaluation_to_the_report_and_the_check(nll, tmp_path):
    assert metrics.names() == ("accuracy", "rougeL", "perplexity", "nll")
    out = run(load(TINY, FAST), tmp_path / "run", verbose=False)

    # evaluation computed it; metrics.jsonl carries it after the built-in metrics, null in training records
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] != "train"]
    assert {r["kind"] for r in evals} == {"base", "tier"}
    for rec in evals:
        keys = list(rec)
        assert keys[keys.index("perplexity") + 1] == "nll" and keys[keys.index("nll") + 1] == "n"
        assert rec["nll"] == pytest.approx(math.log(rec["perplexity"]))
    train = next(r for r in records if r["kind"] == "train")
    assert "nll" in train and train["nll"] is None

    # prelort check accepts the run (every evaluation record has the field, in range) ...
    assert check_run_dir(out) == []
    res = CliRunner().invoke(app, ["check", str(out)])
    assert res.exit_code == 0, res.output
    # ... and refuses a value outside the metric's bounds, in the metric's own words
    lines = (out / "metrics.jsonl").read_text().splitlines()
    at = next(i for i, r in enumerate(records) if r["kind"] == "tier")
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in out.iterdir():
        (bad / f.name).symlink_to(f)
    (bad / "metrics.jsonl").unlink()
    (bad / "metrics.jsonl").write_text(
        "\n".join(lines[:at] + [json.dumps({**records[at], "nll": -1.0})] + lines[at + 1 :]) + "\n"
    )
    assert f"metrics.jsonl line {at + 1}: nll=-1.0" in check_run_dir(bad)

    # prelort report shows it: the final-round table, summary.csv, the comparison table, csv and plots
    res = CliRunner().invoke(app, ["report", str(out), "--out", str(tmp_path / "cmp")])
    assert res.exit_code == 0, res.output
    assert "| tier | round | accuracy | ROUGE-L | perplexity | NLL/token | n |" in res.output
    assert "| method | tier | round | seeds | accuracy | ROUGE-L | perplexity | NLL/token |" in res.output
    tier = next(r for r in evals if r["kind"] == "tier")
    assert f"| {tier['rank']} | 1 |" in res.output and f"{tier['nll']:.3f}" in res.output
    with (out / "summary.csv").open() as fh:
        summary = list(csv.DictReader(fh))
    assert list(summary[0])[5:] == ["accuracy", "rougeL", "perplexity", "nll", "n"]
    assert {float(row["nll"]) for row in summary} == {r["nll"] for r in evals}
    with (tmp_path / "cmp" / "comparison.csv").open() as fh:
        header = next(csv.reader(fh))
    assert header[-2:] == ["nll_mean", "nll_std"]
    assert (tmp_path / "cmp" / "plots" / "comparison_nll.png").stat().st_size > 0
    assert (out / "run.log").read_text().count(" nll=") >= 2  # the base line and the round's tiers


def test_an_unregistered_metric_leaves_records_and_tables_as_they_were(tmp_path):
    """After the test above unregistered it, nothing of the extra metric is left (the run's own files aside)."""
    assert metrics.names() == ("accuracy", "rougeL", "perplexity")
    from prelort import report

    assert "nll_mean" not in report.comparison_columns() and "nll" not in report.summary_columns()
