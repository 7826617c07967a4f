"""bench/quality_gate.py (study 2, stage A): lr grids with edge extension, the gate, the ladder, resumption.

A fake federation writes what a finished run directory holds (config.yaml, train records, per-example
evaluation records at the arm's only tier) with an accuracy set by the arm, the lr and the ladder step.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
from bench_scripts import load_bench

ROOT = Path(__file__).resolve().parents[2]
qg = load_bench("quality_gate")
common = load_bench("_common")
N_EXAMPLES = 300


def arm_of(cfg) -> str:
    return "ceiling" if cfg.clients.ranks == [16] else "floor"


class FakeFederation:
    """``peaks``: arm -> (best lr, accuracy there); accuracy falls by 0.1 per factor 2 away from the best lr."""

    def __init__(self, peaks: dict[str, tuple[float, float]]):
        self.peaks = peaks
        self.calls: list[str] = []

    def __call__(self, cfg, run_dir: Path) -> None:
        arm = arm_of(cfg)
        self.calls.append(f"{arm}/{cfg.train.lr:g}/{cfg.seed}")
        best, top = self.peaks[arm]
        p = max(0.0, top - 0.1 * abs(math.log2(cfg.train.lr / best)))
        run_dir.mkdir(parents=True)
        (run_dir / "config.yaml").write_text(cfg.to_yaml())
        rank = cfg.clients.ranks[0]
        with (run_dir / "metrics.jsonl").open("w") as f:
            for r in range(1, cfg.rounds + 1):
                f.write(json.dumps({"round": r, "kind": "train", "passes": 24, "optimizer_steps": 24}) + "\n")
        rng = random.Random(f"{cfg.seed}-{arm}-{cfg.train.lr}")
        (run_dir / "eval").mkdir()
        lines = [
            json.dumps(
                {
                    "round": cfg.rounds,
                    "rank": rank,
                    "kind": "tier",
                    "id": i,
                    "category": "color",
                    "correct": int(rng.random() < p),
                    "loglik": -1.0 - (1 - p),
                    "n_tokens": 2,
                    "prediction": None,
                }
            )
            for i in range(N_EXAMPLES)
        ]
        (run_dir / "eval" / f"round-{cfg.rounds}.jsonl").write_text("\n".join(lines) + "\n")


def gate_args(tmp_path: Path, *extra: str) -> list[str]:
    return ["--runs-dir", str(tmp_path / "runs"), "--json", str(tmp_path / "s2.json"), *extra]


def test_the_arms_differ_only_in_rank_and_keep_one_scale():
    base = qg.config_mod.parse_yaml((ROOT / "examples" / "quality_study.yaml").read_text())
    ceiling = qg.make_config(base, "ceiling", 2001, 5e-3, "L0", [])
    floor = qg.make_config(base, "floor", 2001, 5e-3, "L0", [])
    assert (ceiling.method, floor.method) == ("fedit", "fedit")
    assert ceiling.lora.alpha / max(ceiling.clients.ranks) == floor.lora.alpha / max(floor.clients.ranks) == 1
    a, b = ceiling.to_dict(), floor.to_dict()
    for d in (a, b):
        d.pop("lora"), d["clients"].pop("ranks")
    assert a == b
    assert ceiling.eval.every == ceiling.rounds and not ceiling.eval.base and not ceiling.eval.truncation_curve
    l3 = qg.make_config(base, "floor", 2001, 5e-3, "L3", [])
    assert (l3.train.warmup_steps, l3.rounds, l3.data.partition.classes_per_client) == (2, 20, 2)


def test_constant_guess_is_each_attributes_most_common_value():
    cfg = qg.make_config(
        qg.config_mod.parse_yaml((ROOT / "examples" / "quality_study.yaml").read_text()), "floor", 2001, 1e-3, "L0", []
    )
    guess = qg.constant_guess(cfg)
    # 12 values per attribute, 100 entities: the mode holds well above 1/12 of them, far below all
    assert 1 / 12 < guess < 0.3
    assert qg.constant_guess(cfg) == guess


def test_a_passing_gate_with_a_grid_extended_at_its_edge(tmp_path, capsys):
    fake = FakeFederation({"ceiling": (2.5e-3, 0.6), "floor": (2e-2, 0.35)})
    payload = qg.main(gate_args(tmp_path, "--seeds", "2001,2002"), execute=fake)
    stage = payload["stage_a"]
    l0 = stage["steps"]["L0"]
    assert l0["arms"]["ceiling"]["best_lr"] == 2.5e-3 and l0["arms"]["ceiling"]["extensions"] == 0
    # the floor's best was the grid's top (1e-2); 2e-2 was best and at the top again; 4e-2 made it interior
    floor = l0["arms"]["floor"]
    assert floor["grid_lrs"][-2:] == [2e-2, 4e-2] and floor["extensions"] == 2 and floor["best_lr"] == 2e-2
    assert not floor["at_grid_edge"]
    g = l0["gate"]
    assert g["passed"] and g["checks"] == {
        "mean_gap_at_least_0.10": True,
        "positive_on_every_seed": True,
        "ceiling_0.15_above_constant_guess": True,
    }
    assert set(g["gap_per_seed"]) == {"2001", "2002"} and g["mean_gap"] == pytest.approx(0.25, abs=0.08)
    assert "L1" not in stage["steps"]  # a pass ends the ladder
    assert (
        stage["progress"]["text"]
        == f"{len(fake.calls)} of {len(fake.calls)} planned runs done"
        == "20 of 20 planned runs done"
    )
    assert "gate L0: PASSED" in capsys.readouterr().out
    saved = json.loads((tmp_path / "s2.json").read_text())
    assert saved["stage_a"]["steps"]["L0"]["gate"]["passed"] and saved["protocol"] == "docs/quality-study-2.md"


def test_a_failing_gate_moves_down_the_ladder_with_the_grid_around_the_last_best(tmp_path, capsys):
    fake = FakeFederation({"ceiling": (5e-3, 0.3), "floor": (5e-3, 0.3)})
    payload = qg.main(gate_args(tmp_path, "--seeds", "2001", "--until", "L1"), execute=fake)
    steps = payload["stage_a"]["steps"]
    assert not steps["L0"]["gate"]["passed"] and not steps["L1"]["gate"]["passed"]
    assert steps["L1"]["arms"]["ceiling"]["grid_lrs"][:4] == [2.5e-3, 5e-3, 1e-2, 2e-2]
    assert payload["stage_a"]["outcome"] == "gate L1 failed"
    out = capsys.readouterr().out
    assert "gate L0: failed" in out and "gate L1: failed" in out


def test_a_step_is_planned_on_disk_before_its_first_run_finishes(tmp_path):
    """Another process (make_tables, a commit) reading the JSON mid-run never sees a step vanish."""
    flat = {"ceiling": (2.5e-3, 0.3), "floor": (2.5e-3, 0.3)}
    qg.main(gate_args(tmp_path, "--seeds", "2001", "--until", "L0"), execute=FakeFederation(flat))
    seen = []

    def peek(cfg, run_dir):
        seen.append(json.loads((tmp_path / "s2.json").read_text())["stage_a"])
        FakeFederation(flat)(cfg, run_dir)

    qg.main(gate_args(tmp_path, "--seeds", "2001", "--until", "L1", "--max-runs", "1"), execute=peek)
    assert len(seen) == 1 and set(seen[0]["steps"]) == {"L0", "L1"}
    assert seen[0]["progress"]["text"] == "8 of 16 planned runs done"


def test_resumes_from_the_results_json_without_the_run_directories(tmp_path):
    peaks = {"ceiling": (2.5e-3, 0.6), "floor": (2.5e-3, 0.35)}
    first = qg.main(gate_args(tmp_path, "--seeds", "2001", "--max-runs", "5"), execute=FakeFederation(peaks))
    assert first["stage_a"]["progress"]["done"] == 5 and first["stage_a"]["outcome"] == "stopped at --max-runs"
    import shutil

    shutil.rmtree(tmp_path / "runs")  # a fresh clone: the JSON is committed, the run directories are not
    again = FakeFederation(peaks)
    payload = qg.main(gate_args(tmp_path, "--seeds", "2001"), execute=again)
    assert len(again.calls) == 3 and payload["stage_a"]["progress"]["done"] == 8
    assert again.calls == ["floor/0.005/2001", "ceiling/0.01/2001", "floor/0.01/2001"]  # arms interleaved
    assert payload["stage_a"]["steps"]["L0"]["gate"]["passed"]


def test_bad_options_are_refused(tmp_path):
    with pytest.raises(SystemExit, match="--until: unknown ladder step 'L9'"):
        qg.main(gate_args(tmp_path, "--until", "L9"), execute=FakeFederation({}))
    with pytest.raises(SystemExit, match="--seeds: not a comma-separated list"):
        qg.main(gate_args(tmp_path, "--seeds", "a,b"), execute=FakeFederation({}))
    (tmp_path / "s2.json").write_text('{"runs": {}}')
    with pytest.raises(SystemExit, match="not a results JSON of study 2"):
        qg.main(gate_args(tmp_path), execute=FakeFederation({}))


def test_a_changed_setting_is_not_taken_from_the_json(tmp_path):
    peaks = {"ceiling": (2.5e-3, 0.6), "floor": (2.5e-3, 0.35)}
    qg.main(gate_args(tmp_path, "--seeds", "2001", "--max-runs", "2"), execute=FakeFederation(peaks))
    import shutil

    shutil.rmtree(tmp_path / "runs")
    again = FakeFederation(peaks)
    qg.main(gate_args(tmp_path, "--seeds", "2001", "--max-runs", "2", "--set", "train.batch_size=4"), execute=again)
    assert len(again.calls) == 2  # same keys, other inputs: run again, not reused


def test_tiny_pipeline_end_to_end(tmp_path):
    """The real pipeline at tiny scale: tiny-llama on a small facts task, one round, both arms at one lr."""
    sets = [
        "model.name=tiny-llama",
        "model.target_modules=[q_proj,v_proj]",
        "data.facts.num_entities=16",
        "rounds=1",
        "train.local_steps=1",
        "train.batch_size=2",
        "eval.max_examples=48",
        "eval.batch_size=16",
    ]
    args = gate_args(tmp_path, "--seeds", "2001", "--max-runs", "2", "--threads", "1")
    for s in sets:
        args += ["--set", s]
    payload = qg.main(args)
    runs = payload["stage_a"]["runs"]
    assert sorted(runs) == ["L0/ceiling/lr-0.00125/seed-2001", "L0/floor/lr-0.00125/seed-2001"]
    ceiling, floor = runs["L0/ceiling/lr-0.00125/seed-2001"], runs["L0/floor/lr-0.00125/seed-2001"]
    assert list(ceiling["tiers"]) == ["16"] and list(floor["tiers"]) == ["2"]
    assert len(ceiling["tiers"]["16"]["correct"]) == 48
    assert payload["stage_a"]["constant_guess"]["2001"] > 0
    assert ceiling["defence_actions"] == 0 == floor["defence_actions"]  # honest clients: no defence acts
    # each record names the CPU it ran on: wall seconds compare only within one machine
    assert ceiling["cpu"] == common.environment()["cpu"] == floor["cpu"]


def test_the_readme_section_shows_grids_gate_and_status(tmp_path):
    tables = load_bench("make_tables")
    fake = FakeFederation({"ceiling": (2.5e-3, 0.6), "floor": (2.5e-3, 0.35)})
    partial = qg.main(gate_args(tmp_path, "--seeds", "2001,2002", "--max-runs", "3"), execute=fake)
    text = tables.quality_study_2_section(partial, tmp_path, ROOT)
    assert "3 of 16 planned runs done; stopped at --max-runs" in text
    assert "| L0 | ceiling | 0.00125: " in text and "(1 of 2 seeds)" in text
    assert "gate not decided yet" in text
    done = qg.main(gate_args(tmp_path, "--seeds", "2001,2002"), execute=fake)
    text = tables.quality_study_2_section(done, tmp_path, ROOT)
    g = done["stage_a"]["steps"]["L0"]["gate"]
    assert f"gate **passed**: ceiling {g['ceiling_accuracy']:.3f}, floor {g['floor_accuracy']:.3f}" in text
    assert "0.0025: " in text and "*" in text and "16 of 16 planned runs done; gate L0 PASSED" in text
    # every run names its CPU; the stage counts them (runs from before the field say nothing)
    here = common.environment()["cpu"]
    assert f"Runs per CPU: {here} 16; wall seconds compare only within one CPU" in text
    for i, rec in enumerate(done["stage_a"]["runs"].values()):
        if i < 6:
            del rec["cpu"]
        elif i < 9:
            rec["cpu"] = "Other CPU"
    text = tables.quality_study_2_section(done, tmp_path, ROOT)
    assert "Machine (the last process to write the stage): " in text
    assert f"Runs per CPU: {here} 7, Other CPU 3, not recorded 6;" in text
    # with no results file, the README names the script that writes it
    assert "`python -m bench.quality_gate --json results/quality_study_2.json`" in tables.render(tmp_path, ROOT)


def test_the_recommendation_page_follows_the_results(tmp_path):
    """docs/choosing-a-method.md from study 1's committed results and a stage A in each of its states."""
    import shutil

    tables = load_bench("make_tables")
    results = tmp_path / "results"
    results.mkdir()
    shutil.copy(ROOT / "results" / "quality_study.json", results)
    page = tables.choosing_a_method(results)
    assert "**Use `fedit`**" in page and "REFUTED" in page and "Study 2 has not run yet." in page
    assert "`prelort-off` at tier 16 +0.035 [-0.011, +0.085]" in page  # ahead, but within noise, said so
    # stage A running, then failed along the whole ladder, then passed
    peaks = {"ceiling": (2.5e-3, 0.6), "floor": (2.5e-3, 0.35)}
    qg.main(
        gate_args(tmp_path, "--seeds", "2001", "--max-runs", "3", "--json", str(results / "quality_study_2.json")),
        execute=FakeFederation(peaks),
    )
    assert "Stage A (the federated gate) is running: 3 of 8 planned runs done" in tables.choosing_a_method(results)
    flat = {"ceiling": (2.5e-3, 0.3), "floor": (2.5e-3, 0.3)}
    qg.main(
        gate_args(
            tmp_path, "--seeds", "2001", "--runs-dir", str(tmp_path / "r2"), "--json", str(results / "s_fail.json")
        ),
        execute=FakeFederation(flat),
    )
    shutil.copy(results / "s_fail.json", results / "quality_study_2.json")
    page = tables.choosing_a_method(results)
    assert "failed at every step of the ladder" in page and "Best learning rate per rank at L3" in page
    assert "failed at every step of the ladder" in tables.choosing_summary(results)
    # part-way down the ladder: the failed steps with their figures and the checks that failed
    (results / "quality_study_2.json").unlink()
    qg.main(
        gate_args(
            tmp_path,
            "--seeds",
            "2001",
            "--runs-dir",
            str(tmp_path / "r2"),
            "--until",
            "L0",
            "--max-runs",
            "0",
            "--json",
            str(results / "quality_study_2.json"),
        ),
        execute=FakeFederation(flat),
    )
    page = tables.choosing_a_method(results)
    g = json.loads((results / "quality_study_2.json").read_text())["stage_a"]["steps"]["L0"]["gate"]
    failed = [name for name, ok in g["checks"].items() if not ok]
    assert failed[:2] == ["mean_gap_at_least_0.10", "positive_on_every_seed"] and g["mean_gap"] < 0, g
    assert (
        f"gate failed at L0 (rank 16 {g['ceiling_accuracy']:.3f}, rank 2 {g['floor_accuracy']:.3f}, gap "
        f"{g['mean_gap']:+.3f}; failed: gap >= 0.10, gap > 0 on every seed" in page
    ), page
    assert "); next ladder step under way" in page
    (results / "quality_study_2.json").unlink()
    qg.main(
        gate_args(
            tmp_path,
            "--seeds",
            "2001",
            "--runs-dir",
            str(tmp_path / "r3"),
            "--json",
            str(results / "quality_study_2.json"),
        ),
        execute=FakeFederation(peaks),
    )
    assert "Stage A's gate **passed** at ladder step L0" in tables.choosing_a_method(results)


def test_the_repository_readme_and_recommendation_page_are_current():
    tables = load_bench("make_tables")
    assert tables.main(["--check"]) == 0, "run python -m bench.make_tables"


def test_a_run_where_a_defence_acted_is_counted_and_flagged(tmp_path):
    tables = load_bench("make_tables")
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.log").write_text(
        "round 1: clipped client 3's change to 4 x the median per segment (robust.clip_to_median): ...\n"
        "round 2: client 1 rejected: change_too_large: ...\nround 2: accepted 3 updates\n"
    )
    assert qg.defence_actions(run) == 2 and qg.defence_actions(tmp_path / "none") == 0
    payload = qg.main(
        gate_args(tmp_path, "--seeds", "2001", "--max-runs", "1"),
        execute=FakeFederation({"ceiling": (1e-3, 0.5), "floor": (1e-3, 0.5)}),
    )
    key = next(iter(payload["stage_a"]["runs"]))
    payload["stage_a"]["runs"][key]["defence_actions"] = 2
    assert f"acted in 1 run(s), which the protocol expects never: {key}" in tables.quality_study_2_section(
        payload, tmp_path, ROOT
    )


class FailingClientFederation(FakeFederation):
    """A federation whose round 2 lost client 1 to an error (the run itself finishes)."""

    def __call__(self, cfg, run_dir: Path) -> None:
        super().__call__(cfg, run_dir)
        rows = (run_dir / "metrics.jsonl").read_text().splitlines()
        bad = json.loads(rows[1])
        bad["clients"] = [
            {"client": 0, "rank": 2, "status": "accepted"},
            {"client": 1, "rank": 2, "status": "failed", "reason": "ClientFailed: RuntimeError: size mismatch"},
        ]
        rows[1] = json.dumps(bad)
        (run_dir / "metrics.jsonl").write_text("\n".join(rows) + "\n")


def test_a_run_where_a_client_failed_is_refused_not_scored(tmp_path):
    """An honest in-process federation expects no failed client: such a run stops the study with one line
    naming the run and the failure, and is never recorded in the results."""
    with pytest.raises(SystemExit) as e:
        qg.main(
            gate_args(tmp_path, "--seeds", "2001", "--max-runs", "1", "--set", "rounds=3"),
            execute=FailingClientFederation({"ceiling": (1e-3, 0.5), "floor": (1e-3, 0.5)}),
        )
    msg = str(e.value.code)
    assert "1 client update(s) failed (first: round 2 client 1: ClientFailed: RuntimeError: size mismatch)" in msg
    assert "the run is not scored" in msg and "\n" not in msg
    assert not (tmp_path / "s2.json").exists() or not json.loads((tmp_path / "s2.json").read_text())["stage_a"]["runs"]
    assert qg.client_failures(tmp_path / "nowhere") == []


def test_a_run_another_process_has_claimed_is_left_to_it_and_waited_for(tmp_path, monkeypatch, capsys):
    """Two processes of the gate share the runs: one claimed by another live process is skipped, and read once
    that process has finished it."""
    import subprocess
    import sys
    import threading
    import time

    qs = load_bench("quality_study")
    monkeypatch.setattr(qs, "CLAIM_POLL_SECONDS", 0.05)
    peaks = {"ceiling": (2.5e-3, 0.6), "floor": (2.5e-3, 0.35)}
    key = "L0/ceiling/lr-0.00125/seed-2001"
    run = tmp_path / "runs" / key
    run.parent.mkdir(parents=True)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    claim = run.with_name(run.name + ".claim")
    claim.write_text(f"{other.pid}\n")
    base = qg.config_mod.parse_yaml((ROOT / "examples" / "quality_study.yaml").read_text())

    fake = FakeFederation(peaks)
    waited_for = threading.Event()  # set once the gate, its own runs done, looks at the claimed run again
    claim_run = qs.claim_run

    def claim_and_tell(run_dir):
        if run_dir == run and len(fake.calls) == 7:
            waited_for.set()
        return claim_run(run_dir)

    monkeypatch.setattr(qs, "claim_run", claim_and_tell)

    def the_other_process():
        waited_for.wait(timeout=60)
        time.sleep(0.2)
        FakeFederation(peaks)(qg.make_config(base, "ceiling", 2001, 1.25e-3, "L0", []), run)
        (run / qg.DONE_FILE).write_text('{"wall_seconds": 7.0}')
        claim.unlink()

    thread = threading.Thread(target=the_other_process)
    thread.start()
    try:
        payload = qg.main(gate_args(tmp_path, "--seeds", "2001"), execute=fake)
    finally:
        thread.join()
        other.kill()
        other.wait()
    assert "ceiling/0.00125/2001" not in fake.calls and len(fake.calls) == 7
    assert payload["stage_a"]["runs"][key]["wall_seconds"] == 7.0 and payload["stage_a"]["progress"]["done"] == 8
    out = capsys.readouterr().out
    assert f"{key}: another process is running it; coming back to it later" in out
    assert f"waiting for {run}: process {other.pid} is running it" in out
