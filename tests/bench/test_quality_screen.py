"""bench/quality_screen.py (study 2, stage B): the variants, the lrs from stage A, score, eligibility, the choice,
resumption, and two processes sharing the runs.

A fake federation writes what a finished run directory holds (config.yaml, train records with the steps per rank
dimension, per-example evaluation records at the tiers 2/4/8/16) with an accuracy per tier set by the variant
and the lr.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import shutil
import time
from pathlib import Path

import pytest
from bench_scripts import load_bench
from test_quality_gate import FakeFederation as GateFederation

ROOT = Path(__file__).resolve().parents[2]
qs = load_bench("quality_screen")
qg = load_bench("quality_gate")
N_EXAMPLES = 300
TIERS = (2, 4, 8, 16)


def variant_of(cfg) -> str:
    if cfg.prelort.nested == "cycle":
        return "V2-cycle"
    if cfg.train.lr_rank_scaling == "sqrt":
        return "V3-sqrt-lr"
    return "V1-dim-warmup" if cfg.train.dim_warmup_steps else "V0-sample"


class FakeScreen:
    """``accuracy``: (variant, lr) -> accuracy per tier (a dict) or one for every tier; ``log``: a file that gets
    one line per run executed (``key pid``), so processes' runs can be counted; ``seconds``: each run's length."""

    def __init__(self, accuracy: dict, log: Path | None = None, seconds: float = 0.0):
        self.accuracy, self.log, self.seconds = accuracy, log, seconds
        self.calls: list[str] = []

    def __call__(self, cfg, run_dir: Path) -> None:
        variant = variant_of(cfg)
        self.calls.append(f"{variant}/{cfg.train.lr:g}/{cfg.seed}")
        if self.log is not None:
            with self.log.open("a") as f:
                f.write(f"{variant}/{cfg.train.lr:g}/{cfg.seed} {os.getpid()}\n")
        time.sleep(self.seconds)
        p = self.accuracy[(variant, cfg.train.lr)]
        run_dir.mkdir(parents=True)
        (run_dir / "config.yaml").write_text(cfg.to_yaml())
        with (run_dir / "metrics.jsonl").open("w") as f:
            for r in range(1, cfg.rounds + 1):
                rec = {"round": r, "kind": "train", "passes": 24, "optimizer_steps": 24, "dim_steps": [6] * 16}
                f.write(json.dumps(rec) + "\n")
        rng = random.Random(f"{cfg.seed}-{variant}-{cfg.train.lr}")
        (run_dir / "eval").mkdir()
        lines = []
        for t in TIERS:
            pt = p[t] if isinstance(p, dict) else p
            lines += [
                json.dumps(
                    {
                        "round": cfg.rounds,
                        "rank": t,
                        "kind": "tier",
                        "id": i,
                        "category": "color",
                        "correct": int(i < round(pt * N_EXAMPLES)),
                        "loglik": -1.0 - (1 - pt) + rng.random() * 1e-3,
                        "n_tokens": 2,
                        "prediction": None,
                    }
                )
                for i in range(N_EXAMPLES)
            ]
        (run_dir / "eval" / f"round-{cfg.rounds}.jsonl").write_text("\n".join(lines) + "\n")


# stage A passing at L0 with the ceiling best at 2.5e-3 and the floor at 1e-2... the floor's 1e-2 sits at the grid's
# edge, so a peak of 5e-3 keeps both interior: lr_F = 5e-3, lr_C = 2.5e-3
GATE_PEAKS = {"ceiling": (2.5e-3, 0.6), "floor": (5e-3, 0.35)}
LR_C, LR_F = 2.5e-3, 5e-3


def screen_accuracy() -> dict:
    """V2 best and eligible; V3 scores highest but its tier 2 is below the constant guess (ineligible at both
    lrs); V1 is eligible only at its lower-scoring lr."""
    return {
        ("V0-sample", LR_C): 0.30,
        ("V0-sample", LR_F): 0.28,
        ("V1-dim-warmup", LR_C): 0.31,
        ("V1-dim-warmup", LR_F): {2: 0.01, 4: 0.6, 8: 0.6, 16: 0.6},
        ("V2-cycle", LR_C): 0.33,
        ("V2-cycle", LR_F): 0.34,
        ("V3-sqrt-lr", LR_C): {2: 0.02, 4: 0.7, 8: 0.7, 16: 0.7},
        ("V3-sqrt-lr", LR_F): {2: 0.03, 4: 0.7, 8: 0.7, 16: 0.7},
    }


def pass_stage_a(tmp_path: Path, json_path: Path) -> dict:
    return qg.main(
        ["--seeds", "2001", "--runs-dir", str(tmp_path / "gate"), "--json", str(json_path)],
        execute=GateFederation(GATE_PEAKS),
    )


def screen_args(tmp_path: Path, *extra: str) -> list[str]:
    return ["--runs-dir", str(tmp_path / "runs"), "--json", str(tmp_path / "s2.json"), *extra]


def test_the_variants_are_the_protocols_table():
    base = qg.config_mod.parse_yaml((ROOT / "examples" / "quality_study.yaml").read_text())
    cfgs = {v: qs.make_config(base, v, 3001, 2.5e-3, "L1", []) for v in qs.VARIANTS}
    for cfg in cfgs.values():
        assert cfg.method == "prelort" and cfg.clients.ranks == [2, 4, 8, 16] and cfg.lora.alpha == 16
        assert cfg.clients.sampling == "stratified" and cfg.train.warmup_steps == 2  # L1's setting
        assert cfg.eval.every == cfg.rounds and not cfg.eval.base and not cfg.eval.truncation_curve
    v0, v1, v2, v3 = (cfgs[v] for v in qs.VARIANTS)
    assert (v0.prelort.nested, v0.train.dim_warmup_steps, v0.train.lr_rank_scaling) == ("sample", 0, "none")
    assert (v1.prelort.nested, v1.train.dim_warmup_steps) == ("sample", 3)
    assert v2.prelort.nested == "cycle"
    assert (v3.prelort.nested, v3.train.lr_rank_scaling, v3.train.lr_reference_rank) == ("sample", "sqrt", 16)
    # each repair changes one thing from V0
    ref = v0.to_dict()
    for cfg, changed in ((v1, {"train"}), (v2, {"prelort"}), (v3, {"train"})):
        d = cfg.to_dict()
        assert {k for k in d if d[k] != ref[k]} == changed
    assert qs.lr_grid(5e-3, 2.5e-3) == [2.5e-3, 5e-3] and qs.lr_grid(2.5e-3, 2.5e-3) == [1.25e-3, 2.5e-3]


def test_stage_b_refuses_to_run_before_stage_a_passes(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        qs.main(screen_args(tmp_path), execute=FakeScreen({}))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: stage B runs only after stage A's gate has passed (docs/quality-study-2.md); stage A: no run yet, "
        "no gate decided (python -m bench.quality_gate)"
    ]
    qg.main(
        [
            "--seeds",
            "2001",
            "--max-runs",
            "3",
            "--runs-dir",
            str(tmp_path / "gate"),
            "--json",
            str(tmp_path / "s2.json"),
        ],
        execute=GateFederation(GATE_PEAKS),
    )
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        qs.main(screen_args(tmp_path), execute=FakeScreen({}))
    assert e.value.code == 2
    assert "stage A: 3 of 8 planned runs done, no gate decided, stopped at --max-runs" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # a step stage A has no lrs for needs --lrs
        qs.main(screen_args(tmp_path, "--step", "L2"), execute=FakeScreen({}))
    assert e.value.code == 2 and "no best lr of both arms at L2; pass --lrs" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        qs.main(screen_args(tmp_path, "--step", "L7"), execute=FakeScreen({}))
    assert e.value.code == 2 and "--step: unknown ladder step 'L7'" in capsys.readouterr().err


def test_the_screen_after_a_passing_gate_scores_and_chooses(tmp_path, capsys):
    gate = pass_stage_a(tmp_path, tmp_path / "s2.json")
    arms = gate["stage_a"]["steps"]["L0"]["arms"]
    assert (arms["floor"]["best_lr"], arms["ceiling"]["best_lr"]) == (LR_F, LR_C)
    fake = FakeScreen(screen_accuracy())
    payload = qs.main(screen_args(tmp_path), execute=fake)
    stage = payload["stage_b"]
    assert stage["settings"]["step"] == "L0" and stage["settings"]["step_source"] == "stage A's gate"
    assert stage["settings"]["lrs"] == [LR_C, LR_F] and stage["settings"]["seeds"] == [3001, 3002]
    assert len(fake.calls) == 16 and stage["progress"]["text"] == "16 of 16 runs done"
    assert fake.calls[:4] == [f"{v}/{LR_C:g}/3001" for v in qs.VARIANTS]  # seed by seed, every variant
    guess = sum(stage["constant_guess"].values()) / 2
    assert 0.05 < guess < 0.3
    v = stage["variants"]
    assert v["V2-cycle"]["lr"] == LR_F and v["V2-cycle"]["eligible"]
    assert v["V1-dim-warmup"]["lr"] == LR_C and v["V1-dim-warmup"]["eligible"]  # the eligible lr, not the higher
    assert v["V3-sqrt-lr"]["lr"] == LR_F and not v["V3-sqrt-lr"]["eligible"]  # none eligible: the higher score
    assert v["V3-sqrt-lr"]["best"]["tiers_below_constant_guess"] == ["2"]
    g = v["V2-cycle"]["best"]
    assert g["mean_accuracy"] == pytest.approx(0.34) and g["tiers"]["16"]["accuracy_per_seed"] == {
        "3001": 0.34,
        "3002": 0.34,
    }
    assert set(g["tiers"]["8"]["loglik_per_seed"]) == {"3001", "3002"} and g["dim_steps"]["3001"] == [60] * 16
    choice = stage["choice"]
    assert choice["variant"] == "V2-cycle" and choice["lr"] == LR_F and choice["eligible"]
    assert choice["eligible_variants"] == ["V0-sample", "V1-dim-warmup", "V2-cycle"]
    run = stage["runs"][f"L0/V2-cycle/lr-{LR_F:g}/seed-3002"]
    assert run["variant"] == "V2-cycle" and run["defence_actions"] == 0 and "commit" in run and run["inputs_digest"]
    assert list(run["tiers"]) == ["2", "4", "8", "16"] and len(run["tiers"]["2"]["correct"]) == N_EXAMPLES
    # one JSON, two stages: stage B's writes kept stage A, and stage A's next write keeps stage B
    on_disk = json.loads((tmp_path / "s2.json").read_text())
    assert on_disk["stage_a"] == json.loads(json.dumps(gate["stage_a"])) and on_disk["stage_b"]["choice"] == choice
    pass_stage_a(tmp_path, tmp_path / "s2.json")
    assert json.loads((tmp_path / "s2.json").read_text())["stage_b"]["choice"] == choice
    assert "16 of 16 runs done; chosen: V2-cycle has the highest score" in capsys.readouterr().out


def test_the_choice_rules():
    def entry(lr, score, eligible, ll=-1.0):
        return {"lr": lr, "mean_accuracy": score, "mean_loglik": ll, "eligible": eligible}

    assert qs.best_lr([entry(1, 0.5, False), entry(2, 0.3, True)])["lr"] == 2
    assert qs.best_lr([entry(1, 0.5, False), entry(2, 0.3, False)])["lr"] == 1
    assert qs.best_lr([entry(1, 0.3, True, -2.0), entry(2, 0.3, True, -1.0)])["lr"] == 2  # tie: log-likelihood
    reference = {"V0-sample": {"best": entry(1, 0.4, True)}, "V2-cycle": {"best": entry(1, 0.5, False)}}
    choice = qs.choose(reference)
    assert choice["variant"] == "V0-sample" and "no repair helped" in choice["text"]
    none = qs.choose({"V0-sample": {"best": entry(1, 0.4, False)}, "V2-cycle": {"best": entry(2, 0.5, False)}})
    assert none["variant"] == "V2-cycle" and not none["eligible"]
    assert none["text"].startswith("no PreLort variant kept every tier above the constant-guess floor")


def test_resumes_from_the_json_on_a_fresh_clone_and_records_overrides(tmp_path):
    pass_stage_a(tmp_path, tmp_path / "s2.json")
    first = qs.main(screen_args(tmp_path, "--max-runs", "5"), execute=FakeScreen(screen_accuracy()))
    assert first["stage_b"]["progress"]["done"] == 5 and first["stage_b"]["outcome"] == "stopped at --max-runs"
    assert "choice" not in first["stage_b"]
    shutil.rmtree(tmp_path / "runs")  # a fresh clone: the JSON is committed, the run directories are not
    again = FakeScreen(screen_accuracy())
    payload = qs.main(screen_args(tmp_path), execute=again)
    assert len(again.calls) == 11 and payload["stage_b"]["choice"]["variant"] == "V2-cycle"
    # --step and --lrs override stage A, and say so
    other = FakeScreen({(v, 1e-3): 0.3 for v in qs.VARIANTS})
    payload = qs.main(
        screen_args(tmp_path, "--step", "L0", "--lrs", "1e-3", "--seeds", "3001", "--json", str(tmp_path / "o.json")),
        execute=other,
    )
    s = payload["stage_b"]["settings"]
    assert (s["step_source"], s["lrs"], s["lr_source"]) == ("--step", [1e-3], "--lrs") and len(other.calls) == 4


def _one_process(args: list[str], log: str) -> None:
    qs.main(args, execute=FakeScreen(screen_accuracy(), Path(log), seconds=0.3))


def test_two_processes_of_one_command_share_the_runs(tmp_path):
    pass_stage_a(tmp_path, tmp_path / "s2.json")
    log = tmp_path / "executed.log"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_one_process, args=(screen_args(tmp_path), str(log))) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    executed = [line.split() for line in log.read_text().splitlines()]
    assert len(executed) == 16 and len({key for key, _ in executed}) == 16  # every run once, none twice
    assert len({pid for _, pid in executed}) == 2  # both processes ran some
    stage = json.loads((tmp_path / "s2.json").read_text())["stage_b"]
    assert stage["progress"]["text"] == "16 of 16 runs done" and stage["choice"]["variant"] == "V2-cycle"
    assert "stage_a" in json.loads((tmp_path / "s2.json").read_text())
    assert not list((tmp_path / "runs").rglob("*.claim"))  # every claim released


def test_tiny_pipeline_end_to_end(tmp_path):
    """The real pipeline at tiny scale: tiny-llama, every variant (cycle and sqrt lr included) at one lr."""
    sets = [
        "model.name=tiny-llama",
        "model.target_modules=[q_proj,v_proj]",
        "data.facts.num_entities=16",
        "rounds=1",
        "train.local_steps=2",
        "train.batch_size=2",
        "eval.max_examples=24",
        "eval.batch_size=24",
    ]
    args = screen_args(tmp_path, "--step", "L0", "--lrs", "1e-3", "--seeds", "3001", "--threads", "1")
    for s in sets:
        args += ["--set", s]
    stage = qs.main(args)["stage_b"]
    assert stage["progress"]["text"] == "4 of 4 runs done" and stage["choice"]["variant"] in qs.VARIANTS
    runs = stage["runs"]
    assert sorted(runs) == sorted(f"L0/{v}/lr-0.001/seed-3001" for v in qs.VARIANTS)
    for rec in runs.values():
        assert list(rec["tiers"]) == ["2", "4", "8", "16"] and len(rec["tiers"]["16"]["correct"]) == 24
        assert rec["defence_actions"] == 0 and len(rec["dim_steps"]) == 16
    # cycle: each of the round's clients reaches its top segment on a fixed share of its 2 steps (its rank
    # first): dimensions 8-15 (only the rank-16 client) on 1 of 2, dimensions 0-1 (every client) on all 8
    cycle = runs["L0/V2-cycle/lr-0.001/seed-3001"]["dim_steps"]
    assert cycle[0] == 8 and cycle[15] == 1
    # the dimension warm-up trains every client, not only the one at the adapter's full rank 16 (a shape error
    # once failed the others at every round; a run with a failed client is now refused, not scored)
    assert runs["L0/V1-dim-warmup/lr-0.001/seed-3001"]["dim_steps"][0] == 8


def test_the_readme_and_recommendation_page_show_stage_b(tmp_path):
    tables = load_bench("make_tables")
    results = tmp_path / "results"
    results.mkdir()
    shutil.copy(ROOT / "results" / "quality_study.json", results)  # study 1: the page's recommendation
    json_path = results / "quality_study_2.json"
    pass_stage_a(tmp_path, json_path)
    assert tables.STAGE_B_NOT_RUN in tables.quality_study_2_section(json.loads(json_path.read_text()), results, ROOT)
    assert tables.STAGE_B_NOT_RUN in tables.choosing_a_method(results)
    args = ["--runs-dir", str(tmp_path / "runs"), "--json", str(json_path)]
    partial = qs.main([*args, "--max-runs", "5"], execute=FakeScreen(screen_accuracy()))
    text = tables.quality_study_2_section(partial, results, ROOT)
    assert "**Status:** 5 of 16 runs done; stopped at --max-runs" in text and "(1 of 2 seeds)" in text
    assert (
        f"| `V0-sample` | {LR_C:g} | 0.300 | 0.300 | 0.300 | 0.300 | (1 of 2 seeds) | - | 60 / 60 / 60 / 60 |" in text
    )
    assert f"| `V1-dim-warmup` | {LR_F:g} | - | - | - | - | - | - | - |" in text
    assert "Stage B (repairing PreLort's local training) is running: 5 of 16 runs done." in tables.choosing_summary(
        results
    )
    done = qs.main(args, execute=FakeScreen(screen_accuracy()))
    text = tables.quality_study_2_section(done, results, ROOT)
    assert "### Quality study 2, stage A" in text and "### Quality study 2, stage B" in text
    assert f"stage A's best lrs at L0: floor {LR_F:g}, ceiling {LR_C:g}" in text
    assert "**Choice:** V2-cycle has the highest score of the eligible variants at lr 0.005 (0.340)." in text
    assert "| `V2-cycle` | 0.005 | 0.340 | 0.340 | 0.340 | 0.340 | 0.340* | yes |" in text
    assert "| `V3-sqrt-lr` | 0.005 | 0.030 | 0.700 | 0.700 | 0.700 | 0.532* | no (tier 2) |" in text
    summary = tables.choosing_summary(results)
    assert "Stage B (repairing PreLort's local training, on selection seeds, 16 of 16 runs done) chose: V2-cycle" in (
        summary
    )
