"""Smoke tests of the quality benchmark (bench/quality.py) and the README table generator (bench/make_tables.py).

The quality benchmark runs end to end on the tiny random Llama with the smallest budget: the JSON must
carry the fields the README tables rely on, with values that agree with the run directories.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from bench_scripts import load_bench

TINY_ARGS = [
    "--quick",
    "--models",
    "tiny-llama",
    "--methods",
    "prelort,flora",
    "--seeds",
    "0",
    "--rounds",
    "1",
    "--lrs",
    "1e-3,3e-2",
    "--set",
    "data.num_train=32",
    "--set",
    "data.num_test=8",
    "--set",
    "data.max_length=48",
    "--set",
    "eval.max_examples=4",
    "--set",
    "eval.max_new_tokens=2",
]


@pytest.fixture(scope="module")
def tiny_quality(tmp_path_factory):
    quality = load_bench("quality")
    out = tmp_path_factory.mktemp("quality")
    args = TINY_ARGS + ["--runs-dir", str(out / "runs"), "--json", str(out / "quality.json")]
    payload = quality.main(args)
    return quality, out, args, payload


def test_quality_json_fields_and_values(tiny_quality):
    quality, out, args, payload = tiny_quality
    data = json.loads((out / "quality.json").read_text())
    assert data == json.loads(json.dumps(payload))
    assert data["benchmark"] == "quality" and data["quick"] is True
    assert data["command"].startswith("python -m bench.quality --quick --models tiny-llama")
    assert {"platform", "cpu_count", "torch"} <= set(data["environment"])
    assert data["settings"]["seeds"] == [0] and data["settings"]["lr_grid"] == [1e-3, 3e-2]
    assert data["wall_seconds"] > 0
    model = data["models"]["tiny-llama"]
    assert model["rounds"] == 1
    assert model["config"]["clients"]["ranks"] == [2, 4, 8, 16]
    assert model["config"]["data"]["partition"]["kind"] == "dirichlet"
    assert model["config"]["eval"]["max_examples"] == 4  # the --set override reached every run
    for method in ("prelort", "flora"):
        sel = model["lr_selection"][method]
        scores = {g["lr"]: g["score_mean_log_ppl"] for g in sel["grid"]}
        assert set(scores) == {1e-3, 3e-2} and all(math.isfinite(s) for s in scores.values())
        assert sel["chosen_lr"] == min(scores, key=scores.get)
        assert sel["at_grid_edge"] is True  # a two-value grid: either choice is an edge
        for g in sel["grid"]:  # the score is the mean log perplexity over the tiers
            assert g["score_mean_log_ppl"] == pytest.approx(
                sum(math.log(p) for p in g["perplexity_per_tier"].values()) / 4
            )
        m = model["methods"][method]
        assert m["lr"] == sel["chosen_lr"]
        assert list(m["tiers"]) == ["2", "4", "8", "16"]
        assert list(m["curve"]) == ["1", "2", "4", "8", "16"]
        for point in list(m["tiers"].values()) + list(m["curve"].values()):
            assert 0 <= point["accuracy"]["mean"] <= 1 and 0 <= point["rougeL"]["mean"] <= 1
            assert point["perplexity"]["mean"] > 1
            assert point["accuracy"]["std"] is None and len(point["accuracy"]["values"]) == 1  # one seed
    # FLoRA sends every tier the same merged model: one evaluation serves the 4 tiers and the curve's t = 1
    # (the curve's other points are the tier records of the same round, reused by the run itself).
    runs = {r["method"]: r for r in model["runs"]}
    assert runs["flora"]["evaluations"] == 1 and runs["flora"]["evaluations_shared"] == 4
    flora_ppl = {p["perplexity"]["mean"] for p in model["methods"]["flora"]["tiers"].values()}
    assert len(flora_ppl) == 1
    assert runs["prelort"]["evaluations"] + runs["prelort"]["evaluations_shared"] == 5
    assert model["base"]["per_seed"]["0"]["n"] == 4
    assert any(p.endswith("comparison_truncation.png") for p in model["plots"])
    assert all(Path(p).is_file() or (quality.ROOT / p).is_file() for p in model["plots"])


def test_quality_numbers_match_the_run_directories(tiny_quality):
    quality, out, args, payload = tiny_quality
    from prelort.report import read_run

    model = payload["models"]["tiny-llama"]
    run = read_run(out / "runs" / "tiny-llama" / "prelort" / "seed-0")
    assert run.config["train"]["lr"] == model["methods"]["prelort"]["lr"]
    for rec in run.final_tiers():
        assert model["methods"]["prelort"]["tiers"][str(rec.rank)]["accuracy"]["values"] == [rec.accuracy]
        assert model["methods"]["prelort"]["tiers"][str(rec.rank)]["perplexity"]["mean"] == rec.perplexity
    # the base model is evaluated once per seed, by the seed's first method
    assert run.base is not None
    assert read_run(out / "runs" / "tiny-llama" / "flora" / "seed-0").base is None
    assert model["base"]["perplexity"]["mean"] == run.base.perplexity


def test_quality_skips_finished_runs(tiny_quality):
    quality, out, args, payload = tiny_quality
    metrics = out / "runs" / "tiny-llama" / "flora" / "seed-0" / "metrics.jsonl"
    before = metrics.stat().st_mtime_ns
    again = quality.main(args)
    assert metrics.stat().st_mtime_ns == before
    assert again["models"]["tiny-llama"]["methods"] == payload["models"]["tiny-llama"]["methods"]
    assert again["models"]["tiny-llama"]["runs"] == payload["models"]["tiny-llama"]["runs"]


def test_quality_rejects_bad_flags(tmp_path):
    quality = load_bench("quality")
    with pytest.raises(SystemExit, match="unknown method"):
        quality.main(["--quick", "--methods", "fedprox", "--estimate-only"])
    with pytest.raises(SystemExit, match="selection must not see"):
        quality.main(["--quick", "--seeds", "0,1", "--select-seed", "1", "--estimate-only"])
    with pytest.raises(SystemExit, match="--lrs"):
        quality.main(["--quick", "--lrs", "0.001,abc", "--estimate-only"])


def test_estimate_counts_distinct_evaluations():
    quality = load_bench("quality")
    ranks = [2, 4, 8, 16]
    assert quality.distinct_evaluations("prelort", ranks) == 5  # t = 1, 2, 4, 8, 16
    assert quality.distinct_evaluations("fedit", ranks) == 2  # the global adapter has rank 2: t = 1, 2
    assert quality.distinct_evaluations("flora", ranks) == 1
    est = quality.main(["--estimate-only"])["estimates"]["smollm2-135m-instruct"]
    assert 60 * 60 <= est["total"] <= 90 * 60  # the default full run is sized for 60-90 minutes


def test_broadcast_digest_ignores_only_exactly_unused_dimensions():
    quality = load_bench("quality")
    from prelort.methods import Broadcast

    g = torch.Generator().manual_seed(0)
    a4, b4 = torch.randn(4, 6, generator=g), torch.randn(5, 4, generator=g)
    delta = {"m.delta": torch.randn(5, 6, generator=g)}

    def bc(a, b, base=None):
        return Broadcast(adapter={"m.lora_A": a, "m.lora_B": b}, base_delta=base)

    # fresh LoRAs (B = 0) of any rank on the same base delta compute the same function
    fresh2 = bc(torch.randn(2, 6, generator=g), torch.zeros(5, 2), delta)
    fresh8 = bc(torch.randn(8, 6, generator=g), torch.zeros(5, 8), delta)
    assert quality.broadcast_digest(fresh2) == quality.broadcast_digest(fresh8)
    # a trailing dimension with B = 0 changes nothing; a non-zero one does
    padded = bc(torch.cat([a4, torch.randn(1, 6, generator=g)]), torch.cat([b4, torch.zeros(5, 1)], dim=1))
    assert quality.broadcast_digest(padded) == quality.broadcast_digest(bc(a4, b4))
    assert quality.broadcast_digest(bc(a4[:2], b4[:, :2])) != quality.broadcast_digest(bc(a4, b4))
    b4_changed = b4.clone()
    b4_changed[0, 0] += 1e-6
    assert quality.broadcast_digest(bc(a4, b4_changed)) != quality.broadcast_digest(bc(a4, b4))
    assert quality.broadcast_digest(fresh2) != quality.broadcast_digest(bc(torch.zeros(2, 6), torch.zeros(5, 2)))


# ------------------------------------------------------------------------------------------ make_tables


def _stat(mean, std):
    return {"mean": mean, "std": std, "values": []}


def _write_results(results: Path, prelort_acc: float = 0.5) -> None:
    results.mkdir(parents=True, exist_ok=True)
    point = lambda acc: {"accuracy": _stat(acc, 0.1), "rougeL": _stat(0.75, 0.05), "perplexity": _stat(3.456, 0.2)}  # noqa: E731
    quality = {
        "benchmark": "quality",
        "command": "python bench/quality.py --seeds 0,1",
        "settings": {"seeds": [0, 1], "lr_grid": [0.001, 0.003]},
        "protocol": {"lr_selection": "lowest held-out perplexity"},
        "environment": {
            "cpu": "Test CPU",
            "cpu_count": 2,
            "torch": "2.13.0+cpu",
            "platform": "Linux-test",
            "torch_threads": 2,
        },
        "models": {
            "smollm2-135m-instruct": {
                "rounds": 4,
                "rounds_note": "",
                "config": {
                    "clients": {"num": 8, "per_round": 4, "ranks": [2, 4]},
                    "train": {"local_steps": 4, "batch_size": 8},
                    "data": {"partition": {"kind": "dirichlet", "alpha": 0.5}},
                    "eval": {"max_examples": 64},
                },
                "base": {"accuracy": _stat(0.0, None), "rougeL": _stat(0.05, None), "perplexity": _stat(14.3, None)},
                "methods": {
                    "fedit": {"lr": 0.003, "tiers": {"2": point(0.25), "4": point(0.25)}, "curve": {"1": point(0.2)}},
                    "prelort": {
                        "lr": 0.001,
                        "tiers": {"2": point(prelort_acc), "4": point(0.625)},
                        "curve": {"1": point(0.125), "2": point(prelort_acc), "4": point(0.625)},
                    },
                },
                "lr_selection": {
                    "fedit": {"chosen_lr": 0.003, "at_grid_edge": True},
                    "prelort": {"chosen_lr": 0.001, "at_grid_edge": False},
                },
                "plots": [],
                "wall_seconds": 600,
            }
        },
    }
    (results / "quality.json").write_text(json.dumps(quality))
    train_step = {
        "model": "smollm2-135m-instruct",
        "device": "cpu",
        "cpu": "x86_64",
        "torch_threads": 2,
        "batch_size": 8,
        "seq_len": 128,
        "client_rank": 16,
        "truncations": [2, 4, 8, 16],
        "rounds": 3,
        "passes_per_step": {"off": 1, "sample": 1},
        "seconds_per_step": {"off": 4.0, "sample": 4.2},
        "ratio_to_off": {"off": 1.0, "sample": 1.05},
        "cpu_seconds_per_step": {"off": 7.5, "sample": 7.7},
        "cpu_ratio_to_off": {"off": 1.0, "sample": 1.0267},
    }
    (results / "train_step.json").write_text(json.dumps(train_step))


def test_make_tables_writes_then_detects_staleness(tmp_path):
    tables = load_bench("make_tables")
    results = tmp_path / "results"
    _write_results(results)
    readme = tmp_path / "README.md"
    readme.write_text("# project\n\nIntro.\n")
    assert tables.main(["--results", str(results), "--readme", str(readme), "--check"]) == 1
    assert readme.read_text() == "# project\n\nIntro.\n"  # --check writes nothing
    assert tables.main(["--results", str(results), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("# project\n\nIntro.\n\n## Results\n\n<!-- results:begin -->\n")
    assert text.rstrip().endswith("<!-- results:end -->")
    # rows in the method order of the paper, mean ± std, the base row, the curve, command and machine
    assert text.index("| prelort | 0.001 | 2 | 0.500 ± 0.100 | 0.750 ± 0.050 | 3.46 ± 0.20 |") < text.index("| fedit |")
    assert "| base (zero-shot) | - | - | 0.000 | 0.050 | 14.30 |" in text
    assert "| fedit | 0.003 † | 2 |" in text and "† the selected learning rate is at the edge of the grid." in text
    assert "| prelort | 0.125 ± 0.100 | 0.500 ± 0.100 | 0.625 ± 0.100 |" in text
    # a command recorded before bench/ became a package is shown as it runs today
    assert "Command: `python -m bench.quality --seeds 0,1`" in text
    assert "Machine: Test CPU (2 cores), 2 torch thread(s), torch 2.13.0+cpu, Linux-test" in text
    assert "| sample | 1 | 4.20 s | 1.05 | 7.70 s | 1.03 |" in text
    assert (
        "Not run yet: `python -m bench.quality_pilot --json results/quality_pilot.json`, "
        "`python -m bench.quality_study --json results/quality_study.json`, "
        "`python -m bench.quality_gate --json results/quality_study_2.json`, "
        "`python -m bench.aggregation --json results/aggregation.json`, "
        "`python -m bench.communication --json results/communication.json`, "
        "`python -m bench.quantization --json results/quantization.json`, "
        "`python -m bench.quantization --demo-only --json results/quantization_demo.json`, "
        "`python -m bench.poisoning --json results/poisoning.json`." in text
    )
    # the recommendation page beside the README, generated from the same results (none of the studies here)
    assert (
        (tmp_path / "docs" / "choosing-a-method.md")
        .read_text()
        .endswith("No study has run yet: there is no evidence to choose by.\n")
    )
    assert tables.main(["--results", str(results), "--readme", str(readme), "--check"]) == 0
    # new numbers: the section is stale; regenerating replaces it in place (text around it kept)
    readme.write_text(text + "\nFooter.\n")
    _write_results(results, prelort_acc=0.75)
    assert tables.main(["--results", str(results), "--readme", str(readme), "--check"]) == 1
    assert tables.main(["--results", str(results), "--readme", str(readme)]) == 0
    new = readme.read_text()
    assert "| prelort | 0.001 | 2 | 0.750 ± 0.100 |" in new and "0.500 ± 0.100" not in new
    assert new.count("<!-- results:begin -->") == 1 and new.endswith("\nFooter.\n")


def test_make_tables_rejects_broken_markers_and_bad_json(tmp_path):
    tables = load_bench("make_tables")
    results = tmp_path / "results"
    _write_results(results)
    readme = tmp_path / "README.md"
    readme.write_text("# p\n<!-- results:end -->\ntext\n<!-- results:begin -->\n")
    with pytest.raises(SystemExit, match="exactly one"):
        tables.main(["--results", str(results), "--readme", str(readme)])
    readme.write_text("# p\n")
    (results / "quality.json").write_text("{not json")
    with pytest.raises(SystemExit, match="quality.json: not readable JSON"):
        tables.main(["--results", str(results), "--readme", str(readme)])


def test_quality_merge_with_transferred_lrs(tiny_quality, tmp_path):
    """A second model added to an existing JSON, reusing the first model's selected lrs (no selection runs)."""
    quality, out, args, payload = tiny_quality
    data = json.loads((out / "quality.json").read_text())
    data["models"] = {"donor": data["models"]["tiny-llama"]}
    data["models"]["donor"]["methods"]["prelort"]["lr"] = 0.02  # a value the selection grid never held
    target = tmp_path / "quality.json"
    target.write_text(json.dumps(data))
    runs = tmp_path / "runs"
    merged = quality.main(
        [a for a in TINY_ARGS]
        + ["--seeds", "1", "--merge", "--lr-from", "donor", "--runs-dir", str(runs), "--json", str(target)]
    )
    written = json.loads(target.read_text())
    assert set(written["models"]) == {"donor", "tiny-llama"} and written == json.loads(json.dumps(merged))
    assert written["command"] == data["command"]  # the file's own provenance is kept
    model = written["models"]["tiny-llama"]
    assert model["lr_transferred_from"] == "donor" and model["seeds"] == [1]
    assert model["command"].endswith("--merge --lr-from donor --runs-dir " + str(runs) + " --json " + str(target))
    assert model["methods"]["prelort"]["lr"] == 0.02
    assert model["methods"]["flora"]["lr"] == data["models"]["donor"]["methods"]["flora"]["lr"]
    assert not (runs / "tiny-llama" / "lr-select").exists()
    from prelort.report import read_run

    assert read_run(runs / "tiny-llama" / "prelort" / "seed-1").config["train"]["lr"] == 0.02
    tables = load_bench("make_tables")
    text = tables.quality_section(written, tmp_path, tmp_path)
    assert "No learning-rate selection for this model: each method uses the lr selected for donor." in text
    assert "Seeds [1] (one seed: no std)." in text
    with pytest.raises(SystemExit, match="records no lr for prelort"):
        quality.main(TINY_ARGS + ["--lr-from", "nonexistent", "--json", str(target), "--estimate-only"])


def test_make_tables_reports_the_pilot_gate_row_by_row(tmp_path):
    tables = load_bench("make_tables")
    results = tmp_path / "results"
    _write_results(results)
    entry = lambda e, steps, r16, r2, passes: {  # noqa: E731
        "task": {"entities": e, "attributes": 3, "phrasings": 3, "targets": "all", "max_length": 64},
        "budget": {"rounds": 10, "local_steps": steps // 10, "batch_size": 8, "optimizer_steps": steps},
        "seed": 2000,
        "runs": {},
        "best_by_rank": {
            "16": {"accuracy": r16, "lr": 0.001, "n": e * 3},
            **({"2": {"accuracy": r2, "lr": 0.003, "n": e * 3}} if r2 is not None else {}),
        },
        **(
            {"gap_16_minus_2": r16 - r2, "passes": passes}
            if r2 is not None
            else {"gap_16_minus_2": None, "passes": False, "skipped": {"r2-lr0.001": "..."}}
        ),
    }
    pilot = {
        "gate": {
            "rule": "best-lr accuracy(rank 16) - best-lr accuracy(rank 2) >= 0.1 on >= 300 queries",
            "holds": False,
        },
        "configurations": {"a": entry(100, 240, 0.57, 0.567, False), "b": entry(200, 240, 0.05, None, False)},
        "note": "No size tried holds.",
    }
    (results / "quality_pilot.json").write_text(json.dumps(pilot))
    text = tables.render(results, tmp_path)
    assert "**does not hold** (in any configuration tried so far)" in text
    assert "| 300 (100 x 3), all | 240 x 8 | 2000 | 0.570 (0.001) | 0.567 (0.003) | +0.003 | 300 | fail |" in text
    assert "| 600 (200 x 3), all | 240 x 8 | 2000 | 0.050 (0.001) | skipped | - | 600 | fail |" in text
    assert "No size tried holds." in text and "Not run yet: `python -m bench.quality_study" in text
