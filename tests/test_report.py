"""Tests of prelort.report and `prelort report` on hand-written run directories."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from prelort import metrics, report
from prelort.apps.cli import app

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RANKS = [1, 2, 4]


def make_run(root: Path, name: str, method: str, seed: int, records: list[dict], raw_tail: str = "") -> Path:
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(
        yaml.safe_dump({"method": method, "seed": seed, "rounds": 2, "clients": {"ranks": RANKS}})
    )
    lines = [json.dumps(r) for r in records]
    (run / "metrics.jsonl").write_text("".join(line + "\n" for line in lines) + raw_tail)
    return run


def ev(
    round_: int,
    rank,
    kind: str,
    acc: float,
    rouge: float,
    ppl: float,
    method: str = "prelort",
    seed: int = 0,
    n: int = 20,
) -> dict:
    return {
        "round": round_,
        "rank": rank,
        "kind": kind,
        "accuracy": acc,
        "rougeL": rouge,
        "perplexity": ppl,
        "n": n,
        "method": method,
        "seed": seed,
    }


def train(round_: int, loss: float, rejected: int = 0, method: str = "prelort") -> dict:
    return {
        "round": round_,
        "kind": "train",
        "train_loss": loss,
        "accepted": 4 - rejected,
        "rejected": rejected,
        "seconds": 1.5,
        "method": method,
    }


def full_records(method: str = "prelort", seed: int = 0, shift: float = 0.0) -> list[dict]:
    """Base, two rounds of tiers (ranks 1, 2, 4) and a truncation curve after round 2."""
    recs = [ev(0, "base", "base", 0.10, 0.20, 30.0, method, seed)]
    for rnd in (1, 2):
        recs.append(train(rnd, 2.0 / rnd, method=method))
        for rank in RANKS:
            recs.append(
                ev(
                    rnd,
                    rank,
                    "tier",
                    0.1 * rnd + 0.05 * rank + shift,
                    0.3 + 0.01 * rank + shift,
                    20.0 - rnd - rank - shift,
                    method,
                    seed,
                )
            )
    for t in RANKS:
        recs.append(ev(2, t, "curve", 0.2 + 0.05 * t + shift, 0.3 + 0.01 * t, 18.0 - t, method, seed))
    return recs


def assert_png(path: Path) -> None:
    import matplotlib.image

    assert path.is_file(), path
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 1000
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_summary_csv_equals_records_with_last_line_winning(tmp_path):
    records = full_records()
    # a resumed run re-evaluates round 2 rank 4 and re-writes its training record: the later lines win
    records.append(ev(2, 4, "tier", 0.99, 0.88, 1.5))
    records.append(train(2, 0.123))
    run = make_run(tmp_path, "run", "prelort", 0, records)

    result = report.write_run_report(run)

    rows = read_csv(run / "summary.csv")
    assert list(rows[0].keys()) == list(report.summary_columns())
    assert len(rows) == 1 + 2 * len(RANKS) + len(RANKS)  # base + tiers + curve, duplicate dropped
    assert result["n_eval_records"] == len(rows)
    assert result["n_train_records"] == 2
    assert result["final_round"] == 2
    # sorted by round, then kind (base, tier, curve), then rank
    keys = [(int(r["round"]), r["kind"], r["rank"]) for r in rows]
    assert keys[0] == (0, "base", "base")
    assert keys[1:4] == [(1, "tier", "1"), (1, "tier", "2"), (1, "tier", "4")]
    assert keys[4:7] == [(2, "tier", "1"), (2, "tier", "2"), (2, "tier", "4")]
    assert keys[7:] == [(2, "curve", "1"), (2, "curve", "2"), (2, "curve", "4")]
    # every value equals the (deduplicated) record exactly
    expected = {}
    for rec in records:
        if rec["kind"] != "train":
            expected[(rec["round"], str(rec["rank"]), rec["kind"])] = rec
    for row in rows:
        rec = expected[(int(row["round"]), row["rank"], row["kind"])]
        assert row["method"] == "prelort" and row["seed"] == "0" and row["n"] == "20"
        for metric in metrics.names():
            assert float(row[metric]) == rec[metric]
    r24 = next(r for r in rows if (r["round"], r["rank"], r["kind"]) == ("2", "4", "tier"))
    assert (float(r24["accuracy"]), float(r24["rougeL"]), float(r24["perplexity"])) == (0.99, 0.88, 1.5)
    assert report.read_run(run).trains[-1].train_loss == 0.123

    plots = {p.name for p in result["plots"]}
    assert plots == {"metrics_by_round.png", "truncation_curve.png", "train_loss.png"}
    for name in plots:
        assert_png(run / "plots" / name)
    assert "| 4 | 2 | 0.990 | 0.880 | 1.50 | 20 |" in result["final_table"]


def test_partial_run_base_and_one_round(tmp_path):
    records = [ev(0, "base", "base", 0.1, 0.2, 30.0), train(1, 1.7)] + [ev(1, r, "tier", 0.2, 0.3, 12.0) for r in RANKS]
    run = make_run(tmp_path, "run", "fedit", 3, records)
    result = report.write_run_report(run)
    assert len(read_csv(run / "summary.csv")) == 4
    # no curve records: the truncation curve comes from the final round's tiers
    assert {p.name for p in result["plots"]} == {"metrics_by_round.png", "truncation_curve.png", "train_loss.png"}
    for p in result["plots"]:
        assert_png(p)
    run_metrics = report.read_run(run)
    curve, source = run_metrics.truncation()
    assert [c.rank for c in curve] == RANKS and "round 1" in source
    assert run_metrics.method == "fedit" and run_metrics.seed == 3


def test_empty_metrics_does_not_crash(tmp_path):
    run = make_run(tmp_path, "run", "prelort", 0, [])
    result = report.write_run_report(run)
    assert (run / "summary.csv").read_text().strip() == ",".join(report.summary_columns())
    assert result["plots"] == [] and result["final_round"] is None
    assert any("no evaluation records" in m for m in result["messages"])


def test_train_only_run_draws_train_loss(tmp_path):
    run = make_run(tmp_path, "run", "prelort", 0, [train(1, 2.0), train(2, 1.5, rejected=1)])
    result = report.write_run_report(run)
    assert [p.name for p in result["plots"]] == ["train_loss.png"]
    assert_png(run / "plots" / "train_loss.png")
    assert len(read_csv(run / "summary.csv")) == 0


def test_incomplete_last_line_is_skipped_but_bad_line_is_an_error(tmp_path):
    run = make_run(
        tmp_path, "cut", "prelort", 0, [ev(0, "base", "base", 0.1, 0.2, 30.0)], raw_tail='{"round": 1, "rank": 2, "ki'
    )
    result = report.write_run_report(run)
    assert result["n_eval_records"] == 1
    assert any("incomplete last line" in m for m in result["messages"])

    bad = make_run(tmp_path, "bad", "prelort", 0, [], raw_tail='not json\n{"round": 0, "rank": "base"}\n')
    with pytest.raises(report.ReportError, match=r"metrics.jsonl line 1: not JSON"):
        report.read_run(bad)
    wrong = make_run(tmp_path, "wrong", "prelort", 0, [{"round": 1, "rank": 2, "kind": "tier", "accuracy": "high"}])
    with pytest.raises(report.ReportError, match=r"line 1: accuracy must be a number"):
        report.read_run(wrong)


def test_compare_runs_mean_and_std_over_seeds(tmp_path):
    runs = [
        make_run(tmp_path, "prelort-s0", "prelort", 0, full_records("prelort", 0, shift=0.0)),
        make_run(tmp_path, "prelort-s1", "prelort", 1, full_records("prelort", 1, shift=0.1)),
        make_run(tmp_path, "fedit-s0", "fedit", 0, full_records("fedit", 0, shift=-0.05)),
    ]
    out = tmp_path / "cmp"
    table = report.compare_runs(runs, out)

    rows = read_csv(out / "comparison.csv")
    assert list(rows[0].keys()) == list(report.comparison_columns())
    assert [(r["method"], r["rank"]) for r in rows] == [("base", "base")] + [
        (m, str(t)) for m in ("prelort", "fedit") for t in RANKS
    ]
    # prelort rank 4 at round 2: accuracy 0.1*2 + 0.05*4 = 0.4 (seed 0) and 0.5 (seed 1)
    p4 = next(r for r in rows if r["method"] == "prelort" and r["rank"] == "4")
    assert p4["n_runs"] == "2" and p4["seeds"] == "0;1" and p4["rounds"] == "2"
    assert float(p4["accuracy_mean"]) == pytest.approx(0.45)
    assert float(p4["accuracy_std"]) == pytest.approx(math.sqrt(2 * 0.05**2))  # sample std, ddof = 1
    assert float(p4["perplexity_mean"]) == pytest.approx(((20 - 2 - 4) + (20 - 2 - 4 - 0.1)) / 2)
    assert float(p4["perplexity_std"]) == pytest.approx(0.1 / math.sqrt(2))
    # a single run: the mean is its value and the std is empty
    f1 = next(r for r in rows if r["method"] == "fedit" and r["rank"] == "1")
    assert float(f1["accuracy_mean"]) == pytest.approx(0.2 + 0.05 - 0.05)
    assert f1["accuracy_std"] == "" and f1["n_runs"] == "1"
    # the base model is the same for every method: averaged per seed, then over seeds 0 and 1
    base = rows[0]
    assert base["seeds"] == "0;1" and float(base["accuracy_mean"]) == pytest.approx(0.1)
    assert float(base["accuracy_std"]) == pytest.approx(0.0)

    assert "| prelort | 4 | 2 | 0,1 | 0.450 ± 0.071 |" in table
    assert "| fedit | 1 | 2 | 0 | 0.200 |" in table
    assert table.splitlines()[0].startswith("| method | tier |")
    assert table in (out / "comparison.md").read_text()
    for metric in metrics.names():
        assert_png(out / "plots" / f"comparison_{metric}.png")
    assert_png(out / "plots" / "comparison_truncation.png")


def test_compare_uses_each_runs_final_round(tmp_path):
    finished = make_run(tmp_path, "a", "zeropad", 0, full_records("zeropad", 0))
    # the second seed only reached round 1 (the run is still going)
    partial = make_run(tmp_path, "b", "zeropad", 1, [r for r in full_records("zeropad", 1) if r["round"] <= 1])
    report.compare_runs([finished, partial], tmp_path / "cmp")
    rows = read_csv(tmp_path / "cmp" / "comparison.csv")
    z2 = next(r for r in rows if r["method"] == "zeropad" and r["rank"] == "2")
    assert z2["rounds"] == "1;2"
    assert float(z2["accuracy_mean"]) == pytest.approx(((0.2 + 0.1) + (0.1 + 0.1)) / 2)


def test_cli_single_run(tmp_path):
    run = make_run(tmp_path, "run", "prelort", 0, full_records())
    result = CliRunner().invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    assert "summary.csv" in result.output and "truncation_curve.png" in result.output
    assert "| base (zero-shot) | 0 | 0.100 | 0.200 | 30.00 | 20 |" in result.output
    assert "| 4 | 2 | 0.400 |" in result.output
    assert (run / "summary.csv").is_file()
    assert not (tmp_path / "comparison").exists()


def test_cli_several_runs_writes_comparison(tmp_path, monkeypatch):
    a = make_run(tmp_path, "a", "prelort", 0, full_records("prelort", 0))
    b = make_run(tmp_path, "b", "hetlora", 0, full_records("hetlora", 0, shift=0.02))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["report", str(a), str(b)])
    assert result.exit_code == 0, result.output
    assert "| method | tier | round | seeds | accuracy | ROUGE-L | perplexity |" in result.output
    assert "| hetlora | 1 | 2 | 0 | 0.270 |" in result.output
    assert (tmp_path / "comparison" / "comparison.csv").is_file()
    assert (a / "summary.csv").is_file() and (b / "summary.csv").is_file()

    out = tmp_path / "elsewhere"
    result = CliRunner().invoke(app, ["report", str(a), str(b), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "comparison.md").is_file() and (out / "plots" / "comparison_accuracy.png").is_file()


def test_cli_rejects_directory_without_metrics(tmp_path):
    good = make_run(tmp_path, "good", "prelort", 0, full_records())
    empty_dir = tmp_path / "not-a-run"
    empty_dir.mkdir()
    result = CliRunner().invoke(app, ["report", str(good), str(empty_dir)])
    assert result.exit_code == 2
    assert "not-a-run has no metrics.jsonl" in result.output
    assert not (good / "summary.csv").exists()  # nothing written before the check

    result = CliRunner().invoke(app, ["report", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "does not exist" in result.output


def test_cli_malformed_metrics_exit_2(tmp_path):
    run = make_run(tmp_path, "run", "prelort", 0, [], raw_tail="[1, 2]\n")
    result = CliRunner().invoke(app, ["report", str(run)])
    assert result.exit_code == 2
    assert "line 1: expected a JSON object" in result.output


def test_cli_empty_metrics(tmp_path):
    run = make_run(tmp_path, "run", "prelort", 0, [])
    result = CliRunner().invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    assert "no evaluation records yet" in result.output


def test_teacher_forced_records_with_per_category_accuracy(tmp_path):
    """eval.mode teacher_forced: rougeL is null; the per-category accuracies become a table per tier."""
    cats = {"color": 0.5, "pet": 0.25}
    records = [
        {**ev(0, "base", "base", 0.0, None, 40.0), "category_accuracy": {"color": 0.0, "pet": 0.0}},
        train(1, 1.2),
        *({**ev(1, t, "tier", 0.375, None, 3.0), "category_accuracy": cats} for t in RANKS),
    ]
    run = make_run(tmp_path, "tf", "prelort", 0, records)
    result = report.write_run_report(run)
    table = result["final_table"]
    assert "| 4 | 1 | 0.375 | n/a | 3.00 | 20 |" in table
    assert "| tier | round | color | pet |" in table
    assert "| 2 | 1 | 0.500 | 0.250 |" in table and "| base (zero-shot) | 0 | 0.000 | 0.000 |" in table
    bad = make_run(tmp_path, "bad", "prelort", 0, [{**ev(1, 1, "tier", 0.5, None, 2.0), "category_accuracy": [1]}])
    with pytest.raises(report.ReportError, match="category_accuracy"):
        report.read_run(bad)
