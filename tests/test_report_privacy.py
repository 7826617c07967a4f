"""`prelort report` on a privacy.dp run: the final epsilon under the table, and plots/privacy_epsilon.png."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from typer.testing import CliRunner

from prelort import report
from prelort.apps.cli import app


def dp_run(root: Path, epsilons: list[float | None], target: float | None = 9.0) -> Path:
    run = root / "run"
    run.mkdir()
    (run / "config.yaml").write_text(
        yaml.safe_dump(
            {"method": "prelort", "seed": 0, "rounds": len(epsilons), "privacy": {"dp": True, "target_epsilon": target}}
        )
    )
    recs = []
    for r, eps in enumerate(epsilons, start=1):
        recs.append(
            {
                "round": r,
                "kind": "train",
                "train_loss": 1.0,
                "accepted": 4,
                "rejected": 0,
                "seconds": 1.0,
                "method": "prelort",
                "dp_epsilon": eps,
                "dp_delta": 1e-5,
                "dp_noise_multiplier": 1.04,
            }
        )
        recs.append(
            {
                "round": r,
                "rank": 2,
                "kind": "tier",
                "accuracy": 0.5,
                "rougeL": 0.5,
                "perplexity": 3.0,
                "n": 8,
                "method": "prelort",
                "seed": 0,
            }
        )
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in recs))
    return run


def test_report_shows_the_final_epsilon_and_plots_it_per_round(tmp_path):
    run = dp_run(tmp_path, [4.18, 6.28, 8.0])
    result = CliRunner().invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    assert "client-level DP: epsilon = 8 at delta = 1e-05 after round 3" in result.output
    png = run / "plots" / "privacy_epsilon.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    assert [t.dp_epsilon for t in report.read_run(run).trains] == [4.18, 6.28, 8.0]


def test_a_run_without_dp_has_no_privacy_line_and_no_epsilon_plot(tmp_path):
    run = dp_run(tmp_path, [4.0])
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    for x in lines:
        x.pop("dp_epsilon", None), x.pop("dp_delta", None)
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    written = report.write_run_report(run)
    assert "client-level DP" not in written["final_table"]
    assert not (run / "plots" / "privacy_epsilon.png").exists()


def test_no_noise_reads_as_infinite_epsilon(tmp_path):
    written = report.write_run_report(dp_run(tmp_path, [None, None], target=None))
    assert "client-level DP: epsilon = inf (no noise) at delta = 1e-05 after round 2" in written["final_table"]
    assert not (tmp_path / "run" / "plots" / "privacy_epsilon.png").exists()
