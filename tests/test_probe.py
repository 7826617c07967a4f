"""`prelort probe`: the rank list and budget parsing, the largest rank under a budget, the table and the JSON
of real training steps on tiny-llama (each rank in its own process; the command itself runs in the test's), its
one-line errors; SmolLM2 (slow)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from tests.cli_runner import checkout_env, prelort, prelort_here

from prelort.probe import (
    ProbeError,
    ProbeReport,
    RankMeasurement,
    format_table,
    largest_rank_under,
    parse_memory,
    parse_ranks,
)


def test_rank_lists():
    assert parse_ranks("2,4,8,16") == [2, 4, 8, 16]
    assert parse_ranks(" 8, 2 ,8") == [2, 8]  # sorted, repeats dropped
    for bad in ("", ",", "2,,4", "0", "-2", "2.5", "four", "4097"):
        with pytest.raises(ProbeError, match="--ranks"):
            parse_ranks(bad)


def test_memory_budgets():
    assert parse_memory("4GB") == 4 * 10**9
    assert parse_memory("4 gib") == 4 * 2**30
    assert parse_memory("1.5GB") == 1_500_000_000
    assert parse_memory("512MB") == 512 * 10**6
    assert parse_memory("123") == 123
    for bad in ("", "GB", "4XB", "4 G B", "-1GB", "0GB", "four GB"):
        with pytest.raises(ProbeError, match="--memory-budget"):
            parse_memory(bad)


def _report(budget: int | None, *ranks: RankMeasurement) -> ProbeReport:
    return ProbeReport("m", "cpu", "rss", 8, 128, 3, None, budget, list(ranks))


def test_the_largest_rank_under_the_budget():
    gb = 10**9
    ms = [
        RankMeasurement(2, peak_memory_bytes=1 * gb, seconds_per_step=1.0, trainable_parameters=10),
        RankMeasurement(4, peak_memory_bytes=2 * gb, seconds_per_step=1.0, trainable_parameters=20),
        RankMeasurement(8, error="killed by signal 9 (out of memory?)"),  # a failed rank never fits
        RankMeasurement(16, peak_memory_bytes=3 * gb, seconds_per_step=1.0, trainable_parameters=40),
    ]
    assert largest_rank_under(ms, 2 * gb) == 4  # at the budget fits
    assert largest_rank_under(ms, 2 * gb - 1) == 2
    assert largest_rank_under(ms, 10 * gb) == 16
    assert largest_rank_under(ms, gb // 2) is None
    assert _report(None, *ms).largest_rank_under_budget is None  # no budget: no answer
    table = format_table(_report(2 * gb, *ms))
    assert "largest rank under 2.00 GB: 4 (declare it on the site: rank=4)" in table
    assert "    8  failed: killed by signal 9" in table
    assert "no rank fits under 500 MB" in format_table(_report(gb // 2, *ms))


def test_a_child_started_from_a_large_process_reports_its_own_peak():
    """ru_maxrss carries the parent's peak across fork and exec: a probe run from a notebook holding a model
    (or from this test runner) would report the parent's memory as every rank's."""
    big = b"\x01" * 10**9  # this process now peaks above 1 GB
    code = "from prelort.probe import _peak_rss_bytes; print(_peak_rss_bytes())"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=checkout_env())
    assert res.returncode == 0, res.stderr
    assert 0 < int(res.stdout) < 300 * 10**6 < len(big)


def test_probe_measures_each_rank_on_tiny_llama():
    res = prelort_here(
        "probe", "--model", "tiny-llama", "--ranks", "4,2", "--batch-size", "2", "--max-length", "16",
        "--steps", "2", "--memory-budget", "100GB", "--json",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert {k: report[k] for k in ("model", "device", "memory", "batch_size", "max_length", "steps")} == {
        "model": "tiny-llama",
        "device": "cpu",
        "memory": "rss",
        "batch_size": 2,
        "max_length": 16,
        "steps": 2,
    }
    assert report["memory_budget_bytes"] == 100 * 10**9 and report["largest_rank_under_budget"] == 4
    assert [r["rank"] for r in report["ranks"]] == [2, 4]
    for r in report["ranks"]:
        assert r["error"] is None and r["seconds_per_step"] > 0
        # the process held torch and the model before training, and training only added to it
        assert 50 * 10**6 < r["memory_after_load_bytes"] <= r["peak_memory_bytes"] < 100 * 10**9
    # LoRA on q/k/v/o of every layer: A (r x d_in) + B (d_out x r) per module, linear in r
    two, four = (r["trainable_parameters"] for r in report["ranks"])
    assert four == 2 * two > 0


def test_probe_prints_the_table_and_says_when_no_rank_fits():
    res = prelort_here(
        "probe", "--model", "tiny-llama", "--ranks", "2", "--batch-size", "1", "--max-length", "8", "--steps", "1",
        "--memory-budget", "1MB",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].startswith("tiny-llama on cpu: batch 1 x 8 tokens, 1 timed step(s) per rank")
    assert lines[1].split() == ["rank", "peak", "RSS", "after", "load", "s/step", "LoRA", "params"]
    assert lines[2].split()[0] == "2" and lines[2].split()[2] in ("MB", "GB")
    assert lines[3] == "no rank fits under 1 MB: lower --batch-size or --max-length, or try smaller ranks"
    assert re.search(r"^rank 2: peak \d+ MB, \d+\.\d\d s/step$", res.stderr, re.M), res.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--ranks", "2,x"], "error: --ranks '2,x': 'x' is not a rank"),
        (["--memory-budget", "4 bananas"], "error: --memory-budget '4 bananas' is not an amount of memory"),
        (["--batch-size", "0"], "error: --batch-size must be at least 1, got 0"),
        (["--global-rank", "4", "--ranks", "2,8"], "error: --global-rank 4 is below the largest probed rank 8"),
        (["--device", "tpu"], "error: --device: 'tpu' is not a torch device"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message):
    res = prelort_here("probe", "--model", "tiny-llama", *args)
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.startswith(message) and len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_an_unknown_model_is_one_line_and_exit_2():
    res = prelort_here("probe", "--model", "tiny-lama", env={"HF_HUB_OFFLINE": "1"})
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "'tiny-lama' is not an alias" in res.stderr and "did you mean 'tiny-llama'?" in res.stderr


@pytest.mark.slow
def test_probe_on_smollm2():
    res = prelort(
        "probe", "--model", "smollm2-135m-instruct", "--ranks", "2,16", "--batch-size", "8", "--max-length", "128",
        "--steps", "1", "--memory-budget", "64GB",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].startswith("smollm2-135m-instruct on cpu: batch 8 x 128 tokens")
    rows = {int(line.split()[0]): line.split() for line in lines[2:4]}
    assert sorted(rows) == [2, 16]
    # SmolLM2-135M in float32: over half a gigabyte resident; LoRA params: 30 layers x (q, k, v, o)
    for row in rows.values():
        assert row[2] == "GB" or float(row[1]) > 500
        assert float(row[5]) > 0
    assert lines[4] == "largest rank under 64.00 GB: 16 (declare it on the site: rank=16)"
