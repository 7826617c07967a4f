"""bench/quality_study.py: phases, resumption after a kill, --max-runs, results JSON, verdict and README tables.

Most tests replace the federation by a fake executor that writes what a run directory holds (config.yaml,
metrics.jsonl train records, eval/round-N.jsonl per-example records) in a few milliseconds; the last one
runs the real pipeline on tiny-llama.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from bench_scripts import load_bench

ROOT = Path(__file__).resolve().parents[2]


qs = load_bench("quality_study")
tables = load_bench("make_tables")

N_EXAMPLES = 80
PASSES = {"all": 3, "sandwich": 2}


def arm_of(cfg) -> str:
    return f"prelort-{cfg.prelort.nested}" if cfg.method == "prelort" else cfg.method


def accuracy_of(arm: str, tier: int) -> float:
    return {"prelort-sample": 0.85, "prelort-all": 0.8}.get(arm, 0.3)


class FakeFederation:
    """Writes a finished run directory; ``kill_at``: raise KeyboardInterrupt part-way through that call."""

    def __init__(self, kill_at: int | None = None):
        self.calls: list[Path] = []
        self.kill_at = kill_at

    def __call__(self, cfg, run_dir: Path) -> None:
        self.calls.append(run_dir)
        run_dir.mkdir(parents=True)
        (run_dir / "config.yaml").write_text(cfg.to_yaml())
        if self.kill_at is not None and len(self.calls) == self.kill_at:
            (run_dir / "eval").mkdir()
            (run_dir / "eval" / "round-1.jsonl").write_text('{"round": 1, "rank": 2, "kind": "tier", "id": 0,')
            raise KeyboardInterrupt
        arm, ranks = arm_of(cfg), sorted(set(cfg.clients.ranks))
        steps = cfg.clients.per_round * cfg.train.local_steps
        top = max(ranks)
        with (run_dir / "metrics.jsonl").open("w") as f:
            for r in range(1, cfg.rounds + 1):
                f.write(
                    json.dumps(
                        {
                            "round": r,
                            "kind": "train",
                            "rank": None,
                            "passes": steps * PASSES.get(cfg.prelort.nested if cfg.method == "prelort" else "", 1),
                            "optimizer_steps": steps,
                            "dim_steps": [steps if i < 2 else 1 for i in range(top)],
                            "dim_clients": [1] * top,
                        }
                    )
                    + "\n"
                )
        (run_dir / "eval").mkdir()
        if cfg.eval.base:  # the untrained model, round 0: right on every 10th example
            (run_dir / "eval" / "round-0.jsonl").write_text(
                "".join(
                    json.dumps(
                        {
                            "round": 0,
                            "rank": "base",
                            "kind": "base",
                            "id": f"q{i:03d}",
                            "category": f"g{i % 4}",
                            "correct": int(i % 10 == 0),
                            "loglik": -5.0,
                            "n_tokens": 2,
                            "prediction": None,
                        }
                    )
                    + "\n"
                    for i in range(N_EXAMPLES)
                )
            )
        for r in range(1, cfg.rounds + 1):
            if r % cfg.eval.every and r != cfg.rounds:
                continue
            lines = []
            kinds = [("tier", t) for t in ranks] + (
                [("curve", t) for t in (1, 2, 4, 8, 16) if t <= top] if r == cfg.rounds else []
            )
            for kind, t in kinds:
                for i in range(N_EXAMPLES):
                    rng = random.Random(f"{cfg.seed}-{arm}-{kind}-{t}-{i}-{r}")
                    ok = int(rng.random() < accuracy_of(arm, t))
                    lines.append(
                        json.dumps(
                            {
                                "round": r,
                                "rank": t,
                                "kind": kind,
                                "id": f"q{i:03d}",
                                "category": f"g{i % 4}",
                                "correct": ok,
                                "loglik": -rng.random() * 3,
                                "n_tokens": 2,
                                "prediction": "x",
                            }
                        )
                    )
            (run_dir / "eval" / f"round-{r}.jsonl").write_text("\n".join(lines) + "\n")


def study_args(tmp_path: Path, *extra: str) -> list[str]:
    return [
        "--config",
        str(ROOT / "examples" / "tiny.yaml"),
        "--runs-dir",
        str(tmp_path / "runs"),
        "--json",
        str(tmp_path / "study.json"),
        "--bootstrap",
        "400",
        "--set",
        "clients.num=8",
        "--set",
        "clients.per_round=4",
        "--set",
        "clients.ranks=[2,4,8,16]",
        "--set",
        "rounds=4",
        "--set",
        "train.local_steps=3",
        *extra,
    ]


ARMS = "prelort-sample,prelort-all,prelort-off,zeropad,flora"


def test_whole_study_with_a_fake_federation(tmp_path, capsys):
    fake = FakeFederation()
    payload = qs.main(study_args(tmp_path, "--arms", ARMS, "--seeds", "0,1,2", "--lrs", "1e-3,3e-3"), execute=fake)
    total = 5 * (2 + 3)
    assert len(fake.calls) == total and payload["progress"] == {
        "done": total,
        "total": total,
        "text": f"{total} of {total} runs done",
        "pre_registered_done": total,
        "pre_registered_total": total,
    }
    data = json.loads((tmp_path / "study.json").read_text())
    assert data["settings"]["verdict_arm"] == "prelort-sample" and data["settings"]["selection_seed"] == 1000
    # every run directory's config: stratified sampling, its arm, its seed, its lr; per-round evaluation for `all`
    import yaml

    cfg = yaml.safe_load((tmp_path / "runs" / "report" / "prelort-all" / "seed-2" / "config.yaml").read_text())
    assert cfg["clients"]["sampling"] == "stratified" and cfg["prelort"]["nested"] == "all" and cfg["seed"] == 2
    assert cfg["eval"]["every"] == 1 and cfg["eval"]["base"] is False
    # the lr selection reads the last round only: the multi-pass arms' selection runs are evaluated then only
    sel_all = yaml.safe_load((tmp_path / "runs" / "select" / "prelort-all" / "lr-0.001" / "config.yaml").read_text())
    assert sel_all["eval"]["every"] == 4
    # the base model (the same for every arm of a seed) is evaluated in the verdict arm's runs only
    assert (
        yaml.safe_load((tmp_path / "runs" / "report" / "prelort-sample" / "seed-2" / "config.yaml").read_text())[
            "eval"
        ]["base"]
        is True
    )
    off = yaml.safe_load((tmp_path / "runs" / "select" / "prelort-off" / "lr-0.001" / "config.yaml").read_text())
    assert off["method"] == "prelort" and off["prelort"]["nested"] == "off" and off["seed"] == 1000
    assert (
        yaml.safe_load((tmp_path / "runs" / "report" / "zeropad" / "seed-0" / "config.yaml").read_text())["eval"][
            "every"
        ]
        == 4
    )
    # per-example records, compactly, in a fixed order
    run = data["runs"]["report/zeropad/seed-1"]
    assert run["examples"]["ids"] == [f"q{i:03d}" for i in range(N_EXAMPLES)]
    assert set(run["tiers"]) == {"2", "4", "8", "16"} and set(run["curve"]) == {"1", "2", "4", "8", "16"}
    assert len(run["tiers"]["8"]["correct"]) == N_EXAMPLES and set(run["tiers"]["8"]["correct"]) <= {"0", "1"}
    assert len(run["tiers"]["8"]["loglik"]) == N_EXAMPLES
    assert run["cost"] == {"passes": 4 * 12, "optimizer_steps": 4 * 12}
    assert data["runs"]["report/prelort-all/seed-1"]["cost"]["passes"] == 3 * 4 * 12
    assert sorted(data["runs"]["report/prelort-all/seed-1"]["per_round"]) == ["1", "2", "3"]
    # lr selection: one grid entry per lr, the winner by mean accuracy
    sel = data["arms"]["zeropad"]
    assert [g["lr"] for g in sel["grid"]] == [1e-3, 3e-3] and sel["lr"] in (1e-3, 3e-3)
    assert sel["lr"] == max(sel["grid"], key=lambda g: (g["mean_accuracy"], g["mean_loglik"]))["lr"]
    # statistics: 4 tiers x 2 baselines; PreLort (0.85) far above the baselines (0.3): confirmed
    a = data["analysis"]
    assert a["seeds_compared"] == [0, 1, 2] and len(a["comparisons"]) == 8
    assert a["verdict"]["verdict"] == "confirmed" and a["verdict"]["partial"] is False
    for c in a["comparisons"]:
        assert 0.4 < c["diff"] < 0.7 and c["ci_holm"][0] <= c["ci95"][0] and c["significant"]
        assert c["mdd_strictest"] > c["mdd"] > 0
    # prelort-all spends 3x the passes: at equal passes it is compared at round 1 (12 x 3 <= 48 < 24 x 3)
    assert a["equal_steps"]["prelort-all"]["passes_ratio"] == 3.0
    assert a["equal_passes"]["prelort-all"]["rounds"] == {"0": 1, "1": 1, "2": 1}
    assert a["arms"]["zeropad"]["dim_steps_mean"][:3] == [48, 48, 4]
    assert (tmp_path / "study" / "paired_differences.png").stat().st_size > 1000
    # the untrained model, evaluated in the verdict arm's runs, is the accuracy table's reference row
    assert a["base_model"]["seeds"] == [0, 1, 2] and a["base_model"]["accuracy"] == 0.1
    assert a["base_model"]["ci95"][0] <= 0.1 <= a["base_model"]["ci95"][1]
    results = tmp_path / "results"
    results.mkdir()
    (results / "quality_study.json").write_text((tmp_path / "study.json").read_text())
    cell = f"0.100 {tables._ci_text(a['base_model']['ci95'], False)}"
    assert f"| untrained model (reference) | {cell} | {cell} | {cell} | {cell} | 3 | 0 | 0 | - |" in tables.render(
        results, tmp_path
    )
    assert "[25 of 25 runs done] report/flora/seed-2" in capsys.readouterr().out


def test_a_killed_study_resumes_without_redoing_finished_runs(tmp_path):
    args = study_args(tmp_path, "--arms", "prelort-sample,zeropad", "--seeds", "0,1", "--lrs", "1e-3")
    killed = FakeFederation(kill_at=4)
    with pytest.raises(KeyboardInterrupt):
        qs.main(args, execute=killed)
    finished = killed.calls[:3]
    interrupted = killed.calls[3]
    assert all((d / qs.DONE).is_file() for d in finished) and not (interrupted / qs.DONE).exists()
    assert json.loads((tmp_path / "study.json").read_text())["progress"]["text"] == "3 of 6 runs done"
    again = FakeFederation()
    payload = qs.main(args, execute=again)
    assert not set(again.calls) & set(finished)  # no finished run redone
    assert again.calls[0] == interrupted and len(again.calls) == 3  # the killed one started over
    assert (interrupted / "eval" / "round-4.jsonl").is_file()
    assert payload["progress"]["text"] == "6 of 6 runs done"
    third = FakeFederation()
    qs.main(args, execute=third)
    assert third.calls == []


def test_a_fresh_clone_resumes_from_the_results_json_without_the_run_directories(tmp_path):
    import shutil

    args = study_args(tmp_path, "--arms", "prelort-sample,zeropad", "--seeds", "0,1", "--lrs", "1e-3")
    first = qs.main(args + ["--max-runs", "4"], execute=FakeFederation())
    shutil.rmtree(tmp_path / "runs")  # the run directories are not committed: a clone has the JSON only
    none = FakeFederation()  # reusing a recorded run is a skip: it does not count against --max-runs
    assert qs.main(args + ["--max-runs", "0"], execute=none)["progress"]["text"] == "4 of 6 runs done"
    assert none.calls == []
    again = FakeFederation()
    payload = qs.main(args, execute=again)
    # the 4 recorded runs are taken from the JSON, the 2 missing ones run
    assert [c.relative_to(tmp_path / "runs").as_posix() for c in again.calls] == [
        "report/prelort-sample/seed-1",
        "report/zeropad/seed-1",
    ]
    assert payload["progress"]["text"] == "6 of 6 runs done"
    for key, rec in first["runs"].items():
        assert (
            payload["runs"][key]["tiers"] == rec["tiers"]
            and payload["runs"][key]["wall_seconds"] == rec["wall_seconds"]
        )
    assert payload["cpu_seconds"] == round(sum(r["wall_seconds"] for r in payload["runs"].values()), 1)
    # another config (here: another round count) rebuilds other configs: nothing recorded is reused
    shutil.rmtree(tmp_path / "runs")
    other = FakeFederation()
    qs.main(args + ["--set", "rounds=3"], execute=other)
    assert len(other.calls) == 6


def test_a_results_json_of_something_else_is_refused(tmp_path):
    (tmp_path / "study.json").write_text('{"benchmark": "other"}')
    with pytest.raises(SystemExit, match="not a results JSON of this study"):
        qs.main(study_args(tmp_path, "--arms", "zeropad", "--seeds", "0", "--lrs", "1e-3"), execute=FakeFederation())


def test_max_runs_stops_and_the_readme_says_partial(tmp_path):
    args = study_args(tmp_path, "--arms", "prelort-sample,zeropad", "--seeds", "0,1", "--lrs", "1e-3")
    payload = qs.main(args + ["--max-runs", "4"], execute=FakeFederation())
    assert payload["progress"]["text"] == "4 of 6 runs done"
    assert payload["analysis"]["seeds_compared"] == [0] and payload["analysis"]["verdict"]["partial"] is True
    results = tmp_path / "results"
    results.mkdir()
    (results / "quality_study.json").write_text((tmp_path / "study.json").read_text())
    text = tables.render(results, tmp_path)
    assert "### Quality study" in text and "**PARTIAL: 4 of 6 runs done.**" in text
    assert "Interim reading of the decision rule on the seeds finished so far, not the study's verdict: **" in text
    assert "**Verdict: " not in text and "| 16 | zeropad ★ |" in text
    payload = qs.main(args, execute=FakeFederation())
    (results / "quality_study.json").write_text((tmp_path / "study.json").read_text())
    text = tables.render(results, tmp_path)
    assert "PARTIAL" not in text and "**Verdict: CONFIRMED**" in text
    assert "![paired differences per tier](study/paired_differences.png)" in text


def test_bad_options_are_refused(tmp_path):
    with pytest.raises(SystemExit, match="--selection-seed 1 is also a reported seed"):
        qs.main(study_args(tmp_path, "--seeds", "0,1", "--selection-seed", "1"), execute=FakeFederation())
    with pytest.raises(SystemExit, match="unknown arm"):
        qs.main(study_args(tmp_path, "--arms", "prelort-fast"), execute=FakeFederation())
    with pytest.raises(SystemExit, match="does not exist"):
        qs.main(["--config", str(tmp_path / "none.yaml")], execute=FakeFederation())


def test_a_run_without_per_example_records_is_named(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("")
    with pytest.raises(SystemExit, match="no per-example evaluation records"):
        qs.collect_run(run)


def _has_per_example_eval() -> bool:
    from prelort.config import EvalConfig

    return "mode" in EvalConfig.model_fields


@pytest.mark.skipif(not _has_per_example_eval(), reason="needs per-example evaluation records (issue 12 part A)")
def test_tiny_pipeline_end_to_end(tmp_path):
    """The real pipeline at tiny scale: tiny-llama, 2 arms, 2 seeds, 1 lr, 2 rounds, a few examples."""
    args = [
        "--config",
        str(ROOT / "examples" / "tiny.yaml"),
        "--runs-dir",
        str(tmp_path / "runs"),
        "--json",
        str(tmp_path / "study.json"),
        "--arms",
        "prelort-sample,zeropad",
        "--seeds",
        "0,1",
        "--lrs",
        "1e-3",
        "--bootstrap",
        "200",
        "--set",
        "rounds=2",
        "--set",
        "train.local_steps=1",
        "--set",
        "data.num_train=32",
        "--set",
        "data.num_test=8",
        "--set",
        "eval.max_examples=8",
        "--set",
        "eval.base=false",
        "--set",
        "clients.per_round=2",
    ]
    payload = qs.main(args)
    assert payload["progress"]["text"] == "6 of 6 runs done"
    a = payload["analysis"]
    assert a["seeds_compared"] == [0, 1] and len(a["comparisons"]) == 4  # tiers 1, 2, 4, 8 x zeropad
    assert a["verdict"]["verdict"] in ("confirmed", "refuted", "inconclusive")
    run = payload["runs"]["report/zeropad/seed-1"]
    assert run["cost"]["optimizer_steps"] == 2 * 2 and len(run["tiers"]["8"]["correct"]) == 8  # rounds x clients
    results = tmp_path / "results"
    results.mkdir()
    (results / "quality_study.json").write_text((tmp_path / "study.json").read_text())
    assert "### Quality study" in tables.render(results, tmp_path)


def test_the_extra_arm_runs_only_when_asked_and_stays_out_of_the_verdict(tmp_path):
    assert "prelort-sample_width" not in qs.parse_args(study_args(tmp_path)).arms
    args = study_args(
        tmp_path, "--arms", "prelort-sample,prelort-sample_width,zeropad", "--seeds", "0", "--lrs", "1e-3"
    )
    payload = qs.main(args, execute=FakeFederation())
    import yaml

    cfg = yaml.safe_load((tmp_path / "runs" / "report" / "prelort-sample_width" / "seed-0" / "config.yaml").read_text())
    assert cfg["prelort"]["nested"] == "sample_width"
    assert payload["settings"]["extra_arms"] == ["prelort-sample_width"]
    assert {c["baseline"] for c in payload["analysis"]["comparisons"]} == {"zeropad"}
    assert "prelort-sample_width" in payload["analysis"]["equal_steps"]
    # outside the verdict, it is compared with the tier's best baseline (the verdict's), paired on the same seeds
    explore = payload["analysis"]["exploratory"]["prelort-sample_width"]
    assert set(explore) == set(payload["analysis"]["best_baseline"])
    tier_8 = explore["8"]
    assert tier_8["baseline"] == payload["analysis"]["best_baseline"]["8"] == "zeropad" and tier_8["seeds"] == [0]
    extra = payload["runs"]["report/prelort-sample_width/seed-0"]["tiers"]["8"]["correct"]
    base = payload["runs"]["report/zeropad/seed-0"]["tiers"]["8"]["correct"]
    want = (extra.count("1") - base.count("1")) / len(base)
    assert tier_8["diff"] == pytest.approx(want, abs=1e-5) and tier_8["ci95"][0] <= tier_8["diff"] <= tier_8["ci95"][1]
    results = tmp_path / "results"
    results.mkdir()
    (results / "quality_study.json").write_text((tmp_path / "study.json").read_text())
    rendered = tables.render(results, tmp_path)
    assert "| prelort-sample_width (extra, not pre-registered) |" in rendered
    assert f"| prelort-sample_width | 8 | zeropad | {tier_8['diff']:+.3f} |" in rendered


def test_before_any_reported_seed_the_readme_says_no_verdict_yet(tmp_path):
    args = study_args(tmp_path, "--arms", "prelort-sample,zeropad", "--seeds", "0", "--lrs", "1e-3,3e-3")
    payload = qs.main(args + ["--max-runs", "3"], execute=FakeFederation())
    assert payload["progress"]["text"] == "3 of 6 runs done" and payload["analysis"]["verdict"] is None
    assert "lr" not in payload["arms"]["zeropad"]  # its grid is not finished: no reported run yet
    # ... but the lr it has finished is in the grid already, with its accuracy per tier
    [partial] = payload["arms"]["zeropad"]["grid"]
    run = payload["runs"]["select/zeropad/lr-0.001"]
    assert partial["run"] == "select/zeropad/lr-0.001" and partial["lr"] == 1e-3
    assert set(run["accuracy"]) == {"2", "4", "8", "16"}
    assert run["accuracy"]["8"] == pytest.approx(run["tiers"]["8"]["correct"].count("1") / N_EXAMPLES)
    assert partial["mean_accuracy"] == pytest.approx(sum(run["accuracy"].values()) / 4)
    results = tmp_path / "results"
    results.mkdir()
    (results / "quality_study.json").write_text((tmp_path / "study.json").read_text())
    text = tables.render(results, tmp_path)
    assert (
        "**No verdict yet**: no reported seed has finished PreLort and every baseline yet. "
        "**PARTIAL: 3 of 6 runs done.**"
    ) in text
    # the selection runs done so far, each with its tiers and mean; the finished grid's choice is marked
    grid = {g["lr"]: g["mean_accuracy"] for g in payload["arms"]["prelort-sample"]["grid"]}
    chosen = payload["arms"]["prelort-sample"]["lr"]
    sample_rows = [line for line in text.splitlines() if line.startswith("| prelort-sample | 0.00")]
    assert len(sample_rows) == 2 and [r.split(" | ")[1] for r in sample_rows] == ["0.001", "0.003"]
    for row in sample_rows:
        cells = row.strip("|").split(" | ")
        assert float(cells[6]) == pytest.approx(grid[float(cells[1])], abs=5e-4)
        accuracy = payload["runs"][f"select/prelort-sample/lr-{cells[1]}"]["accuracy"]
        assert [float(c) for c in cells[2:6]] == [pytest.approx(accuracy[t], abs=5e-4) for t in ("2", "4", "8", "16")]
        assert cells[-1].strip().startswith("chosen (grid edge)") == (float(cells[1]) == chosen)
    assert [line for line in text.splitlines() if line.startswith("| zeropad | 0.001 |")][0].endswith(
        "| grid unfinished |"
    )


def test_an_unfinished_extra_arm_leaves_the_verdict_complete(tmp_path):
    # the extra arm last: the three selection runs come first, then each arm's reported seed in --arms order
    args = study_args(
        tmp_path, "--arms", "prelort-sample,zeropad,prelort-sample_width", "--seeds", "0", "--lrs", "1e-3"
    )
    payload = qs.main(args + ["--max-runs", "4"], execute=FakeFederation())
    assert payload["progress"]["text"] == "4 of 6 runs done (pre-registered arms: 3 of 4)"
    assert payload["analysis"]["complete"] is False
    payload = qs.main(args + ["--max-runs", "1"], execute=FakeFederation())
    assert payload["progress"]["text"] == "5 of 6 runs done (pre-registered arms: 4 of 4)"
    assert payload["analysis"]["complete"] is True and payload["analysis"]["verdict"]["partial"] is False
    results = tmp_path / "results"
    results.mkdir()
    (results / "quality_study.json").write_text((tmp_path / "study.json").read_text())
    rendered = tables.render(results, tmp_path)
    assert "**Verdict: " in rendered and "PARTIAL" not in rendered
    assert "Extra arms still running: 5 of 6 runs done (pre-registered arms: 4 of 4)." in rendered


def test_adding_an_arm_to_a_finished_study_keeps_every_run_in_each_save(tmp_path):
    args = study_args(tmp_path, "--arms", "prelort-sample,zeropad", "--seeds", "0", "--lrs", "1e-3")
    assert qs.main(args, execute=FakeFederation())["progress"]["text"] == "4 of 4 runs done"
    fake, saved_before = FakeFederation(), []

    def execute(cfg, run_dir):  # what a kill before this run would leave in the JSON
        saved_before.append(sorted(json.loads((tmp_path / "study.json").read_text())["runs"]))
        fake(cfg, run_dir)

    extra = study_args(
        tmp_path, "--arms", "prelort-sample,zeropad,prelort-sample_width", "--seeds", "0", "--lrs", "1e-3"
    )
    payload = qs.main(extra, execute=execute)
    assert len(fake.calls) == 2  # the extra arm's selection and reported runs; the 4 finished runs are reused
    finished = [
        "report/prelort-sample/seed-0",
        "report/zeropad/seed-0",
        "select/prelort-sample/lr-0.001",
        "select/zeropad/lr-0.001",
    ]
    assert saved_before == [finished, sorted([*finished, "select/prelort-sample_width/lr-0.001"])]
    assert payload["progress"]["text"] == "6 of 6 runs done (pre-registered arms: 4 of 4)"
    assert payload["analysis"]["verdict"]["partial"] is False
