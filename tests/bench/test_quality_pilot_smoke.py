"""Smoke test of the pilot gate script (bench/quality_pilot.py) on the tiny random Llama: the JSON records
every configuration and run, the gate summary, and a rerun reads finished runs instead of training again."""

from __future__ import annotations

import json

from bench_scripts import load_bench


def test_pilot_records_runs_skips_and_resumes(tmp_path):
    pilot = load_bench("quality_pilot")
    out = tmp_path / "pilot.json"
    args = [
        "--model",
        "tiny-llama",
        "--entities",
        "4",
        "--attributes",
        "2",
        "--phrasings",
        "1",
        "--targets",
        "attn",
        "--lrs",
        "1e-3",
        "--ranks",
        "16,2",
        "--rounds",
        "1",
        "--steps",
        "1",
        "--batch",
        "2",
        "--max-length",
        "48",
        "--runs-dir",
        str(tmp_path / "runs"),
        "--json",
        str(out),
        "--note",
        "smoke",
    ]
    assert pilot.main(args) == 0
    data = json.loads(out.read_text())
    ((key, entry),) = data["configurations"].items()
    assert entry["facts"] == 8 and entry["training_records"] == 8 and entry["exposures_per_fact"] == 0.25
    assert entry["budget"]["optimizer_steps"] == 1 and entry["runs"]["r16-lr0.001"]["n"] == 8
    # a random tiny model cannot reach 0.10 at rank 16, so the rank-2 run is skipped with its reason
    assert entry["runs"]["r16-lr0.001"]["accuracy"] < pilot.GATE
    assert "r2-lr0.001" in entry["skipped"] and entry["passes"] is False
    assert data["gate"] == {"rule": data["gate"]["rule"], "configurations_tried": 1, "passing": [], "holds": False}
    assert data["note"] == "smoke"
    # rerun: the finished run is read back, not trained again
    marker = tmp_path / "runs" / key / "r16-lr0.001" / "metrics.jsonl"
    before = marker.stat().st_mtime_ns
    entry["runs"].clear()
    out.write_text(json.dumps(data))
    assert pilot.main(args) == 0
    assert marker.stat().st_mtime_ns == before
    assert json.loads(out.read_text())["configurations"][key]["runs"]["r16-lr0.001"]["n"] == 8
