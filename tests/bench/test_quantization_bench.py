"""Smoke tests of bench/quantization.py (memory and step time of a quantised base) and of its README table."""

from __future__ import annotations

import argparse
import json

import pytest
from bench_scripts import load_bench

pytest.importorskip("bitsandbytes")


@pytest.mark.parametrize("quantization", ["nf4"])
def test_one_configuration_reports_memory_and_time(quantization):
    bench = load_bench("quantization")
    args = argparse.Namespace(
        model="tiny-llama",
        quantization=quantization,
        rank=2,
        checkpointing=True,
        batch_size=2,
        seq_len=16,
        steps=1,
        repeats=1,
        threads=0,
    )
    row = bench.measure_one(args)
    assert (row["quantization"], row["rank"], row["gradient_checkpointing"]) == (quantization, 2, True)
    assert row["seconds_per_step"] > 0 and row["cpu_seconds_per_step"] > 0
    assert 0 < row["rss_after_load_bytes"] <= row["peak_rss_bytes"]
    if row["peak_rss_training_bytes"] is not None:  # None where /proc/self/clear_refs cannot be written
        assert 0 < row["peak_rss_training_bytes"] <= row["peak_rss_bytes"]


@pytest.mark.parametrize("way", ["streamed", "after"])
def test_one_load_reports_its_peak_and_what_it_keeps(way, tmp_path):
    bench = load_bench("quantization")
    from prelort.config import ModelConfig
    from prelort.models import load_model

    base, tokenizer = load_model(ModelConfig(name="tiny-llama", device="cpu"), "none")
    base.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    args = argparse.Namespace(model=str(tmp_path), quantization="nf4", load_way=way, threads=0)
    row = bench.measure_load(args)
    assert (row["quantization"], row["way"]) == ("nf4", way)
    assert row["quantised_while_loading"] is (way == "streamed")
    assert 0 < row["anon_before_load_bytes"] <= row["peak_anon_bytes"]
    assert row["anon_after_load_bytes"] <= row["peak_anon_bytes"]
    assert row["load_seconds"] > 0 and row["parameter_bytes"] > 0


def test_the_readme_table_shows_every_row_the_slowdown_and_the_quality_cost(tmp_path):
    tables = load_bench("make_tables")

    def row(q: str, gc: bool, rank: int, seconds: float) -> dict:
        return {
            "quantization": q,
            "gradient_checkpointing": gc,
            "rank": rank,
            "seconds_per_step": seconds,
            "cpu_seconds_per_step": seconds * 2,
            "peak_rss_bytes": 2 * 2**30,
            "peak_rss_training_bytes": 2**30,
            "rss_after_load_bytes": 2**29,
        }

    def load(dtype: str, q: str, way: str, peak_mib: int) -> dict:
        return {
            "checkpoint_dtype": dtype,
            "quantization": q,
            "way": way,
            "load_seconds": 2.0,
            "anon_before_load_bytes": 300 * 2**20,
            "peak_anon_bytes": (300 + peak_mib) * 2**20,
            "anon_after_load_bytes": 400 * 2**20,
            "peak_rss_bytes": 2**30,
        }

    steps = [
        row(q, gc, r, {"none": 4.0, "int8": 6.0, "nf4": 10.0}[q])
        for q in ("none", "int8", "nf4")
        for gc in (0, 1)
        for r in (2, 16)
    ]
    tier = {"accuracy": 0.25, "perplexity": 3.5, "n": 48}
    data = {
        "command": "python -m bench.quantization --json results/quantization.json",
        "model": "smollm2-135m-instruct",
        "batch_size": 4,
        "seq_len": 64,
        "target_modules": ["q_proj", "v_proj"],
        "steps": steps,
        "load": [load("bfloat16", "none", "float32", 560), load("bfloat16", "nf4", "streamed", 296)],
        "demo": {
            "config": "examples/demo.yaml",
            "overrides": ["rounds=2"],
            "runs": {
                "none": {"seconds": 100.0, "peak_rss_bytes": 2**31, "round": 2, "tiers": {"2": tier, "16": tier}},
                "nf4": {
                    "seconds": 300.0,
                    "peak_rss_bytes": 2**30,
                    "round": 2,
                    "tiers": {"2": {**tier, "accuracy": 0.2}, "16": tier},
                },
            },
        },
    }
    results = tmp_path / "results"
    results.mkdir()
    (results / "quantization.json").write_text(json.dumps(data))
    text = tables.render(results, tmp_path)
    assert "| bfloat16 | nf4 | while loading | 2.00 s | 296.0 MiB | 100.0 MiB | 1.0 GiB |" in text
    assert "| bfloat16 | float32 | - | 2.00 s | 560.0 MiB |" in text
    assert "| nf4 | yes | 16 | 10.00 s | 20.00 s | 2.50 | 1.0 GiB | 2.0 GiB | 512.0 MiB |" in text
    assert "| float32 | no | 2 | 4.00 s | 8.00 s | 1.00 |" in text
    assert "**int8 training is slower than float32 here**: 1.5x" in text
    assert "**nf4 training is slower than float32 here**: 2.5x" in text
    assert "| 2 | 0.250 | 0.200 | 3.50 | 3.50 | 48 |" in text
    assert "budget overrides: `rounds=2`" in text
    assert "Command: `python -m bench.quantization --json results/quantization.json`" in text
    assert "_Partial" not in text
    (results / "quantization.json").write_text(json.dumps({**data, "steps": steps[:5], "complete": False}))
    assert "_Partial: the run stopped after 5 of the 12 configurations" in tables.render(results, tmp_path)
    # the demo part written on its own (--demo-only) has a section of its own
    (results / "quantization.json").unlink()
    (results / "quantization_demo.json").write_text(
        json.dumps({**data, "steps": [], "command": "python -m bench.quantization --demo-only"})
    )
    text = tables.render(results, tmp_path)
    assert "### Quality cost of a quantised base (int8, nf4) on the demo config" in text
    assert "| 16 | 0.250 | 0.250 | 3.50 | 3.50 | 48 |" in text
    assert "`python -m bench.quantization --json results/quantization.json`," in text  # listed as not run yet


def test_a_load_only_merge_keeps_the_step_rows_with_the_settings_they_were_measured_at(tmp_path, monkeypatch):
    bench = load_bench("quantization")
    step = {"quantization": "none", "gradient_checkpointing": False, "rank": 2, "seconds_per_step": 1.0}
    earlier = {"command": "python -m bench.quantization --batch-size 4 --seq-len 64", "batch_size": 4, "seq_len": 64}
    earlier |= {"steps": [step], "steps_per_measurement": 1, "repeats": 1, "target_modules": ["q_proj"]}
    out = tmp_path / "quantization.json"
    out.write_text(json.dumps(earlier))
    load_row = {"checkpoint_dtype": "float32", "quantization": "nf4", "way": "streamed", "peak_anon_bytes": 1}
    monkeypatch.setattr(bench, "run_load", lambda args: [load_row])
    monkeypatch.setattr(bench, "run_conversion", lambda args: [])
    result = bench.main(["--load-only", "--merge", "--json", str(out)])
    written = json.loads(out.read_text())
    assert written == json.loads(json.dumps(result))
    assert written["steps"] == [step] and written["load"] == [load_row]
    assert (written["batch_size"], written["seq_len"], written["target_modules"]) == (4, 64, ["q_proj"])
    assert written["earlier_commands"] == [earlier["command"]] and written["complete"] is True
