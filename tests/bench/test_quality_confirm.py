"""bench/quality_confirm.py (study 2, stage C): the refusals, the arms, the two phases and their run layout,
the analysis on synthetic records with known answers, and two processes sharing the runs.

A fake federation writes what a finished run directory holds, with the facts suite's own example ids (so the
own-vs-others split is the real one) and an accuracy per tier set by the arm and the lr.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import re
import time
from pathlib import Path

import numpy as np
import pytest
from bench_scripts import load_bench
from test_quality_screen import LR_C, LR_F, FakeScreen, pass_stage_a, screen_accuracy

ROOT = Path(__file__).resolve().parents[2]
qc = load_bench("quality_confirm")
qs = load_bench("quality_screen")
st = load_bench("study_stats")
TIERS = ("2", "4", "8", "16")
V_STAR = "V2-cycle"  # stage B's choice under screen_accuracy(), at LR_F


def arm_of(cfg) -> str:
    """The run name a config is: its arm, with ``-sqrt`` for a selected baseline at the sqrt lr scaling."""
    if cfg.method == "fedit":
        return "ceiling" if cfg.clients.ranks == [16] else "fedit"
    if cfg.method == "prelort":
        arm = {"off": "prelort-off", "cycle": V_STAR, "sample": "V0-sample"}[cfg.prelort.nested]
    else:
        arm = cfg.method
    return f"{arm}-sqrt" if arm in qc.SELECTED and cfg.train.lr_rank_scaling == "sqrt" else arm


class FakeConfirm:
    """``accuracy``: (arm, lr) -> accuracy at every tier (default 0.3); ``log``: a file that gets one line per
    run executed (``key pid``); ``seconds``: each run's length."""

    def __init__(self, accuracy: dict | None = None, log: Path | None = None, seconds: float = 0.0):
        self.accuracy, self.log, self.seconds = accuracy or {}, log, seconds
        self.calls: list[str] = []

    def __call__(self, cfg, run_dir: Path) -> None:
        from prelort.data.facts import build_facts_suite
        from prelort.evaluate import example_id

        arm = arm_of(cfg)
        self.calls.append(f"{arm}/{cfg.train.lr:g}/{cfg.seed}")
        if self.log is not None:
            with self.log.open("a") as f:
                f.write(f"{arm}/{cfg.train.lr:g}/{cfg.seed} {os.getpid()}\n")
        time.sleep(self.seconds)
        p = self.accuracy.get((arm, cfg.train.lr), 0.3)
        run_dir.mkdir(parents=True)
        (run_dir / "config.yaml").write_text(cfg.to_yaml())
        with (run_dir / "metrics.jsonl").open("w") as f:
            for r in range(1, cfg.rounds + 1):
                f.write(json.dumps({"round": r, "kind": "train", "passes": 24, "optimizer_steps": 24}) + "\n")
        _, test = build_facts_suite(cfg.seed, cfg.data.facts)
        rng = random.Random(f"{cfg.seed}-{arm}-{cfg.train.lr}")
        (run_dir / "eval").mkdir()
        lines = [
            json.dumps(
                {
                    "round": cfg.rounds,
                    "rank": t,
                    "kind": "tier",
                    "id": example_id(row),
                    "category": row["category"],
                    "correct": int(rng.random() < p),
                    "loglik": -1.0 - (1 - p),
                    "n_tokens": 2,
                    "prediction": None,
                }
            )
            for t in sorted(set(cfg.clients.ranks))
            for row in test
        ]
        (run_dir / "eval" / f"round-{cfg.rounds}.jsonl").write_text("\n".join(lines) + "\n")


def confirm_args(tmp_path: Path, *extra: str) -> list[str]:
    return ["--runs-dir", str(tmp_path / "runs"), "--json", str(tmp_path / "s2.json"), "--replicates", "200", *extra]


def pass_stages_a_and_b(tmp_path: Path) -> dict:
    pass_stage_a(tmp_path, tmp_path / "s2.json")
    return qs.main(
        ["--runs-dir", str(tmp_path / "screen"), "--json", str(tmp_path / "s2.json")],
        execute=FakeScreen(screen_accuracy()),
    )


def test_stage_c_refuses_to_run_before_stages_a_and_b(tmp_path, capsys):
    def refused(*extra: str) -> str:
        with pytest.raises(SystemExit) as e:
            qc.main(confirm_args(tmp_path, *extra), execute=FakeConfirm())
        assert e.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1
        return lines[0]

    assert refused() == (
        "error: stage C runs only after stage A's gate has passed (docs/quality-study-2.md); stage A: no run yet, "
        "no gate decided (python -m bench.quality_gate)"
    )
    pass_stage_a(tmp_path, tmp_path / "s2.json")
    capsys.readouterr()
    assert refused() == (
        "error: stage C runs only after stage B has chosen its variant (docs/quality-study-2.md); stage B: "
        "no run yet (python -m bench.quality_screen)"
    )
    qs.main(
        ["--runs-dir", str(tmp_path / "screen"), "--json", str(tmp_path / "s2.json"), "--max-runs", "5"],
        execute=FakeScreen(screen_accuracy()),
    )
    capsys.readouterr()
    assert "stage B: 5 of 16 runs done, stopped at --max-runs (python -m bench.quality_screen)" in refused()
    assert refused("--variant", "V1-dim-warmup") == "error: stage B has no lr for V1-dim-warmup; pass --variant-lr"
    assert "--lrs: two positive learning rates (lr_F,lr_C) are needed" in refused("--lrs", "1e-3")
    assert "--step: unknown ladder step 'L9'" in refused("--step", "L9")
    assert "--variant: unknown variant 'V9'; known: V0-sample, V1-dim-warmup" in refused("--variant", "V9")


def test_the_arms_are_the_protocols_table():
    base = qc.config_mod.parse_yaml((ROOT / "examples" / "quality_study.yaml").read_text())
    arms = qc.arm_settings(V_STAR, qs.VARIANTS[V_STAR])
    assert list(arms) == [V_STAR, "prelort-off", "zeropad", "hetlora", "flexlora", "flora", "fedit", "ceiling"]
    cfgs = {a: qc.evaluated_once(*qc.run_inputs(base, s, 4001, 2.5e-3, "L1", [])) for a, s in arms.items()}
    for cfg in cfgs.values():
        assert cfg.clients.sampling == "stratified" and cfg.train.warmup_steps == 2  # L1's setting
        assert cfg.eval.every == cfg.rounds and not cfg.eval.base and not cfg.eval.truncation_curve
        assert cfg.seed == 4001 and cfg.train.lr == 2.5e-3
    assert (cfgs[V_STAR].method, cfgs[V_STAR].prelort.nested) == ("prelort", "cycle")
    assert (cfgs["prelort-off"].method, cfgs["prelort-off"].prelort.nested) == ("prelort", "off")
    for m in ("zeropad", "hetlora", "flexlora", "flora"):
        assert cfgs[m].method == m and cfgs[m].clients.ranks == [2, 4, 8, 16] and cfgs[m].lora.alpha == 16
    assert (cfgs["fedit"].method, cfgs["fedit"].clients.ranks, cfgs["fedit"].lora.alpha) == ("fedit", [2], 2)
    assert (cfgs["ceiling"].method, cfgs["ceiling"].clients.ranks, cfgs["ceiling"].lora.alpha) == ("fedit", [16], 16)


# the selected arms' best candidate under the fake: hetlora and flora at lr_C, zeropad sqrt-scaled at lr_C, the
# others at lr_F without scaling (a scaled candidate not named here scores the default 0.3)
SELECTION = {
    ("hetlora", LR_C): 0.35,
    ("flora", LR_C): 0.32,
    ("zeropad-sqrt", LR_C): 0.36,
    **{(a, LR_F): 0.31 for a in qc.SELECTED},
}


def test_the_two_phases_their_layout_and_the_stages_kept(tmp_path, capsys):
    before = pass_stages_a_and_b(tmp_path)
    assert before["stage_b"]["choice"]["variant"] == V_STAR and before["stage_b"]["choice"]["lr"] == LR_F
    fake = FakeConfirm(SELECTION)
    payload = qc.main(confirm_args(tmp_path, "--seeds", "4001,4002,4003"), execute=fake)
    stage = payload["stage_c"]
    s = stage["settings"]
    assert (s["step"], s["lr_floor"], s["lr_ceiling"], s["selection_grid"]) == ("L0", LR_F, LR_C, [LR_C, LR_F])
    assert (s["verdict_arm"], s["verdict_arm_lr"], s["verdict_arm_source"]) == (V_STAR, LR_F, "stage B's choice")
    # phase 1 first (5 arms x 2 scalings x 2 lrs x 2 seeds, seed by seed, unscaled first), then phase 2 (8 arms
    # x 3 seeds, seed by seed)
    assert len(fake.calls) == 40 + 24 and stage["progress"]["text"] == "64 of 64 runs done"
    assert fake.calls[:5] == [f"{a}/{LR_C:g}/3001" for a in qc.SELECTED]
    assert fake.calls[10:15] == [f"{a}-sqrt/{LR_C:g}/3001" for a in qc.SELECTED]
    assert {c.rsplit("/", 1)[1] for c in fake.calls[:40]} == {"3001", "3002"}
    lrs = stage["lrs"]
    assert lrs == {
        V_STAR: LR_F,
        "prelort-off": LR_F,
        "zeropad": LR_C,
        "hetlora": LR_C,
        "flexlora": LR_F,
        "flora": LR_C,
        "fedit": LR_F,
        "ceiling": LR_C,
    }
    names = stage["run_names"]
    assert names["zeropad"] == "zeropad-sqrt" and all(names[a] == a for a in lrs if a != "zeropad")
    assert fake.calls[40:48] == [f"{names[a]}/{lrs[a]:g}/4001" for a in lrs]
    sel = stage["selection"]
    assert (sel["zeropad"]["scaling"], sel["zeropad"]["lr"]) == ("sqrt", LR_C)
    assert (sel["hetlora"]["scaling"], sel["hetlora"]["lr"]) == ("none", LR_C)
    assert [(g["scaling"], g["lr"]) for g in sel["hetlora"]["grid"]] == [
        ("none", LR_C),
        ("none", LR_F),
        ("sqrt", LR_C),
        ("sqrt", LR_F),
    ]
    assert sel["hetlora"]["grid"][0]["mean_accuracy"] == pytest.approx(0.35, abs=0.06)
    # the scaled candidate trains as V3 does, and its reported runs are stored under its own name
    scaled = stage["runs"][f"L0/zeropad-sqrt/lr-{LR_C:g}/seed-4001"]
    assert scaled["arm"] == "zeropad-sqrt" and f"L0/zeropad/lr-{LR_C:g}/seed-4001" not in stage["runs"]
    cfg = qc.config_mod.parse_yaml(
        (tmp_path / "runs" / "L0" / "zeropad-sqrt" / f"lr-{LR_C:g}" / "seed-4001" / "config.yaml").read_text()
    )
    assert cfg["method"] == "zeropad" and cfg["train"]["lr_rank_scaling"] == "sqrt"
    assert cfg["train"]["lr_reference_rank"] == 16
    run = stage["runs"][f"L0/flora/lr-{LR_C:g}/seed-4002"]
    assert (run["arm"], run["lr"], run["seed"], run["step"]) == ("flora", LR_C, 4002, "L0")
    assert run["defence_actions"] == 0 and "commit" in run and run["inputs_digest"]
    assert list(run["tiers"]) == ["2", "4", "8", "16"] and len(run["tiers"]["2"]["correct"]) == 300
    assert list(stage["runs"][f"L0/fedit/lr-{LR_F:g}/seed-4001"]["tiers"]) == ["2"]
    assert (tmp_path / "runs" / "L0" / "ceiling" / f"lr-{LR_C:g}" / "seed-4003" / "study-run.json").is_file()
    assert stage["cpu_seconds"] >= 0
    analysis = stage["analysis"]
    assert analysis["seeds_compared"] == [4001, 4002, 4003] and analysis["complete"]
    assert len(analysis["comparisons"]) == 24 and len(analysis["decision_family"]) == 4
    assert analysis["verdict"]["verdict"] in ("confirmed", "refuted", "inconclusive")
    own = analysis["secondary"]["own_vs_others"][V_STAR]["2"]
    assert set(own) == {"own", "others"}
    assert stage["outcome"].startswith(analysis["verdict"]["verdict"])
    # stage C's writes kept stages A and B
    on_disk = json.loads((tmp_path / "s2.json").read_text())
    assert on_disk["stage_a"] == json.loads(json.dumps(before["stage_a"]))
    assert on_disk["stage_b"]["choice"] == before["stage_b"]["choice"]
    # resumable: nothing is run again, and a fresh clone (no run directories) reads the JSON
    again = FakeConfirm(SELECTION)
    qc.main(confirm_args(tmp_path, "--seeds", "4001,4002,4003"), execute=again)
    assert again.calls == []
    assert "64 of 64 runs done" in capsys.readouterr().out


def test_a_restarted_process_keeps_phase_1s_choice_in_the_file_while_it_runs(tmp_path):
    pass_stages_a_and_b(tmp_path)
    args = confirm_args(tmp_path, "--seeds", "4001,4002")
    first = qc.main([*args, "--max-runs", "44"], execute=FakeConfirm(SELECTION))["stage_c"]  # phase 1 + 4 runs
    seen: list[dict] = []

    class ReadsTheFile(FakeConfirm):
        def __call__(self, cfg, run_dir: Path) -> None:
            seen.append(json.loads((tmp_path / "s2.json").read_text())["stage_c"])
            super().__call__(cfg, run_dir)

    qc.main(args, execute=ReadsTheFile(SELECTION))
    assert len(seen) == 12
    for stage in seen:
        assert stage["selection"] == first["selection"] and set(stage["selection"]) == set(qc.SELECTED)
        assert (stage["lrs"], stage["run_names"]) == (first["lrs"], first["run_names"])


def test_partial_says_k_of_m_and_overrides_are_recorded(tmp_path):
    payload = qc.main(
        confirm_args(
            tmp_path,
            "--step",
            "L0",
            "--lrs",
            "2e-3,2e-3",
            "--variant",
            "V0-sample",
            "--variant-lr",
            "1e-3",
            "--selection-seeds",
            "3001",
            "--seeds",
            "4001",
            "--max-runs",
            "24",
        ),
        execute=FakeConfirm(),
    )
    stage = payload["stage_c"]
    s = stage["settings"]
    assert (s["step_source"], s["lr_source"], s["verdict_arm_source"]) == ("--step", "--lrs", "--variant")
    assert s["selection_grid"] == [1e-3, 2e-3] and s["verdict_arm"] == "V0-sample" and s["verdict_arm_lr"] == 1e-3
    assert stage["progress"]["text"] == "24 of 28 runs done" and stage["outcome"] == "stopped at --max-runs"
    assert (
        stage["analysis"]["verdict"] is None
        and stage["analysis"]["note"] == "no reported seed has finished every arm yet"
    )


# ------------------------------------------------------------------------------------------ the analysis


def synthetic_run(correct: np.ndarray, tiers=TIERS) -> dict:
    """A run record whose verdicts are ``correct`` at every tier of ``tiers``."""
    n = len(correct)
    text = "".join("1" if c else "0" for c in correct)
    ll = [round(-2.0 + float(c), 4) for c in correct]
    return {"examples": {"ids": list(range(n))}, "tiers": {t: {"correct": text, "loglik": ll} for t in tiers}}


def synthetic(accuracy: dict, seeds=range(4001, 4009), n: int = 300, verdict=V_STAR) -> dict:
    """``accuracy``: arm -> probability of a correct answer (every tier; FedIT and the ceiling at one tier); the
    verdict arm shares every baseline's per-example noise (paired), so differences are tight."""
    out: dict = {}
    for s in seeds:
        u = np.random.default_rng(s).random(n)
        for arm, p in accuracy.items():
            tiers = ("2",) if arm == "fedit" else ("16",) if arm == "ceiling" else TIERS
            out.setdefault(arm, {})[s] = synthetic_run(u < p, tiers)
    return out


def accuracies(verdict: float, **others: float) -> dict:
    acc = {V_STAR: verdict, **dict.fromkeys(qc.SELECTED, 0.3), "fedit": 0.2, "ceiling": 0.6}
    return {**acc, **{k.replace("_", "-"): v for k, v in others.items()}}


def test_an_arm_better_by_a_margin_is_confirmed_worse_refuted_equal_inconclusive():
    better = qc.analyse(synthetic(accuracies(0.45)), V_STAR, replicates=500, complete=True)
    assert better["verdict"]["verdict"] == "confirmed" and not better["verdict"]["partial"]
    for c in better["decision_family"]:
        assert c["diff"] == pytest.approx(0.15, abs=0.03) and c["ci_holm"][0] > 0 and c["significant"]
        assert c["ci_holm"][0] <= c["ci95"][0] and c["ci_holm"][1] >= c["ci95"][1]  # Holm's is the wider
        assert 0 < c["mdd"] < c["mdd_strictest"]
    worse = qc.analyse(synthetic(accuracies(0.15)), V_STAR, replicates=500)
    assert worse["verdict"]["verdict"] == "refuted"
    equal = qc.analyse(synthetic(accuracies(0.3)), V_STAR, replicates=500)
    assert equal["verdict"]["verdict"] == "inconclusive"
    cis = {c["tier"]: tuple(c["ci_holm"]) for c in equal["decision_family"]}
    assert st.decide(cis)["verdict"] == "refuted"  # study 1's equivalence branch would have said refuted


def test_the_best_baseline_is_picked_per_tier_and_holm_runs_over_4_and_24():
    runs = synthetic(accuracies(0.5, hetlora=0.35))
    # flora best at tier 16 only: its tier-16 records from a stronger run
    strong = synthetic(accuracies(0.5, flora=0.45))["flora"]
    for s, rec in runs["flora"].items():
        rec["tiers"]["16"] = strong[s]["tiers"]["16"]
    a = qc.analyse(runs, V_STAR, replicates=500)
    assert a["best_baseline"] == {"2": "hetlora", "4": "hetlora", "8": "hetlora", "16": "flora"}
    assert [(c["tier"], c["baseline"]) for c in a["decision_family"]] == [
        (2, "hetlora"),
        (4, "hetlora"),
        (8, "hetlora"),
        (16, "flora"),
    ]
    assert sorted(c["holm_level"] for c in a["decision_family"]) == pytest.approx([0.05 / 4, 0.05 / 3, 0.025, 0.05])
    assert len(a["comparisons"]) == 24 and sum(c["best"] for c in a["comparisons"]) == 4
    p = [c["p"] for c in a["comparisons"]]
    assert [c["p_holm"] for c in a["comparisons"]] == pytest.approx(st.holm(p)["adjusted"], abs=1e-5)
    # FedIT and the ceiling serve their one adapter at every tier
    assert a["arms"]["fedit"]["16"]["accuracy"] == a["arms"]["fedit"]["2"]["accuracy"]
    assert a["secondary"]["loglik"]["2"]["diff"] == pytest.approx(a["decision_family"][0]["diff"], abs=1e-4)


def test_gap_recovered_and_own_vs_others():
    n, seeds = 100, (4001, 4002)

    def exact(k: int) -> np.ndarray:  # the first k of n correct
        return np.arange(n) < k

    runs: dict = {}
    for s in seeds:
        for arm in (V_STAR, *qc.SELECTED):
            runs.setdefault(arm, {})[s] = synthetic_run(exact(40 if arm == V_STAR else 30))
        runs.setdefault("fedit", {})[s] = synthetic_run(exact(20), ("2",))
        runs.setdefault("ceiling", {})[s] = synthetic_run(exact(60), ("16",))
    own = {s: {t: "1" * 25 + "0" * 75 for t in TIERS} for s in seeds}  # the first 25 examples are own
    a = qc.analyse(runs, V_STAR, own=own, replicates=300)
    sec = a["secondary"]
    assert (sec["floor_accuracy"], sec["ceiling_accuracy"]) == (0.2, 0.6)
    assert sec["gap_recovered"][V_STAR]["8"]["g"] == pytest.approx(0.5)  # (0.4 - 0.2) / (0.6 - 0.2)
    assert sec["gap_recovered"]["zeropad"]["8"]["g"] == pytest.approx(0.25)
    assert "fedit" not in sec["gap_recovered"]
    lo, hi = sec["gap_recovered"][V_STAR]["8"]["ci95"]
    assert lo < 0.5 < hi
    ov = sec["own_vs_others"][V_STAR]["4"]
    assert ov["own"]["accuracy"] == 1.0 and ov["others"]["accuracy"] == pytest.approx(15 / 75)
    assert qc.gap_recovered(0.3, 0.3, 0.3) != qc.gap_recovered(0.3, 0.3, 0.3)  # nan: no gap to recover
    missing = qc.analyse({k: v for k, v in runs.items() if k != "flora"}, V_STAR, replicates=50)
    assert missing["verdict"] is None and missing["seeds_compared"] == []


def test_wall_time_is_compared_to_fedits_run_of_the_same_seed_across_machines():
    runs = synthetic(accuracies(0.3), seeds=(4001, 4002))
    # seed 4001 ran on a machine twice as fast as seed 4002's; every arm took 1.5x FedIT's time on both
    for arm, by_seed in runs.items():
        for s, rec in by_seed.items():
            fedit_wall = 100.0 if s == 4001 else 200.0
            rec["wall_seconds"] = fedit_wall * (1.0 if arm == "fedit" else 1.5)
            rec["cpu"] = "Fast CPU" if s == 4001 else "Slow CPU"
    a = qc.analyse(runs, V_STAR, replicates=50)
    assert a["arms"][V_STAR]["cost"]["wall_seconds"] == 225.0  # the plain mean mixes the machines
    assert a["arms"][V_STAR]["cost"]["wall_vs_floor"] == 1.5 and a["arms"]["fedit"]["cost"]["wall_vs_floor"] == 1.0
    assert a["arms"]["zeropad"]["cost"]["cpus"] == ["Fast CPU", "Slow CPU"]
    del runs["fedit"][4002]["wall_seconds"]  # a seed without FedIT's wall time: no ratio rather than a biased one
    assert qc.analyse(runs, V_STAR, replicates=50)["arms"][V_STAR]["cost"]["wall_vs_floor"] is None


def test_the_recommendation_is_the_significant_leader_or_else_the_cheapest_arm_tied_with_it():
    ahead = qc.analyse(synthetic(accuracies(0.45)), V_STAR, replicates=300)["recommendation"]
    assert set(ahead) == set(TIERS)
    for r in ahead.values():
        assert r["leader"] == r["use"] == V_STAR and r["significant_lead"] and r["tied"] == []
        assert set(r["against"]) == set(qc.BASELINES) and all(c["ci95"][0] > 0 for c in r["against"].values())
        assert r["against"]["fedit"]["diff"] == pytest.approx(0.25, abs=0.03)
    # V* and the five selected baselines alike (the same answers), FedIT below: no lead is significant, and the
    # cheapest of the tied is the one to use, whoever leads
    runs = synthetic(accuracies(0.3), seeds=(4001, 4002))
    for arm, by_seed in runs.items():
        for rec in by_seed.values():
            rec["wall_seconds"] = {"fedit": 100.0, "hetlora": 110.0}.get(arm, 150.0)
    rec = qc.analyse(runs, V_STAR, replicates=300)["recommendation"]
    for r in rec.values():
        assert r["leader"] == V_STAR and not r["significant_lead"]  # a tie in the mean goes to the earlier arm
        assert r["tied"] == list(qc.SELECTED) and r["against"]["fedit"]["ci95"][0] > 0
        assert r["use"] == "hetlora"  # 1.1x FedIT's wall time; FedIT is cheaper but significantly worse
    for by_seed in runs.values():
        for r in by_seed.values():
            del r["wall_seconds"]  # no wall ratio: fewer passes, then the arms' order decide
    assert {r["use"] for r in qc.analyse(runs, V_STAR, replicates=50)["recommendation"].values()} == {V_STAR}


def test_own_examples_follow_the_partition_of_entity_groups():
    base = qc.config_mod.parse_yaml((ROOT / "examples" / "quality_study.yaml").read_text())
    cfg = qc.evaluated_once(*qc.run_inputs(base, {"method": "zeropad"}, 4001, 1e-3, "L0", []))
    from prelort.data.facts import build_facts_suite
    from prelort.evaluate import example_id
    from prelort.recipe import load_data

    _, test = build_facts_suite(cfg.seed, cfg.data.facts)
    ids = sorted(example_id(r) for r in test)
    own = qc.own_examples(cfg, ids, cfg.clients.ranks)
    assert set(own) == set(TIERS)
    # one group per client, 8 groups over 8 clients: each rank holds 2 groups, every fact held by exactly one rank
    assert [sum(own[t][i] == "1" for t in TIERS) for i in range(len(ids))] == [1] * len(ids)
    _, _, parts = load_data(cfg)
    group = {example_id(r): r["group"] for r in test}
    held_by_16 = {g for k in (3, 7) for g in parts[k].unique("group")}
    assert own["16"] == "".join("1" if group[i] in held_by_16 else "0" for i in ids)
    assert qc.own_examples(cfg, [0, 1], cfg.clients.ranks) is None  # not the suite's ids


def _one_process(args: list[str], log: str) -> None:
    qc.main(args, execute=FakeConfirm(SELECTION, Path(log), seconds=0.2))


def test_two_processes_of_one_command_share_the_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(load_bench("quality_study"), "CLAIM_POLL_SECONDS", 0.2)  # inherited by the forks
    pass_stages_a_and_b(tmp_path)
    log = tmp_path / "executed.log"
    args = confirm_args(tmp_path, "--selection-seeds", "3001", "--seeds", "4001")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_one_process, args=(args, str(log))) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=180)
    assert [p.exitcode for p in procs] == [0, 0]
    executed = [line.split() for line in log.read_text().splitlines()]
    assert len(executed) == 28 and len({key for key, _ in executed}) == 28  # every run once, none twice
    assert len({pid for _, pid in executed}) == 2
    data = json.loads((tmp_path / "s2.json").read_text())
    assert data["stage_c"]["progress"]["text"] == "28 of 28 runs done" and "analysis" in data["stage_c"]
    assert "stage_a" in data and "stage_b" in data
    assert not list((tmp_path / "runs").rglob("*.claim"))


@pytest.mark.slow  # ~45 s: stage B's tiny pipeline covers the real path in the fast suite
def test_tiny_pipeline_end_to_end(tmp_path):
    """The real pipeline at tiny scale: tiny-llama, the 8 arms (every method) on one selection and one reported
    seed, the own-vs-others split from the real partition."""
    sets = [
        "model.name=tiny-llama",
        "model.target_modules=[q_proj,v_proj]",
        "data.facts.num_entities=16",
        "rounds=1",
        "train.local_steps=1",
        "train.batch_size=2",
        "eval.max_examples=48",
        "eval.batch_size=48",
    ]
    args = confirm_args(
        tmp_path,
        *("--step", "L0", "--lrs", "1e-3,2e-3", "--variant", "V2-cycle", "--variant-lr", "1e-3"),
        *("--selection-seeds", "3001", "--seeds", "4001", "--threads", "1"),
    )
    for s in sets:
        args += ["--set", s]
    stage = qc.main(args)["stage_c"]
    assert stage["progress"]["text"] == "28 of 28 runs done"
    every = qc.candidate_settings(qc.arm_settings(V_STAR, {}))
    assert sorted({r["arm"] for r in stage["runs"].values()}) == sorted(every)
    for rec in stage["runs"].values():
        assert len(next(iter(rec["tiers"].values()))["correct"]) == 48 and rec["defence_actions"] == 0
    analysis = stage["analysis"]
    assert analysis["seeds_compared"] == [4001] and len(analysis["decision_family"]) == 4
    own = analysis["secondary"]["own_vs_others"][V_STAR]
    assert set(own) == set(TIERS) and all(set(v) == {"own", "others"} for v in own.values())


def test_the_readme_and_recommendation_page_show_stage_c(tmp_path):
    import shutil

    tables = load_bench("make_tables")
    results = tmp_path / "results"
    results.mkdir()
    shutil.copy(ROOT / "results" / "quality_study.json", results)  # study 1: the page's recommendation
    json_path = results / "quality_study_2.json"
    pass_stage_a(tmp_path, json_path)
    qs.main(["--runs-dir", str(tmp_path / "screen"), "--json", str(json_path)], execute=FakeScreen(screen_accuracy()))
    assert tables.STAGE_C_NOT_RUN in tables.quality_study_2_section(json.loads(json_path.read_text()), results, ROOT)
    assert tables.STAGE_C_NOT_RUN in tables.choosing_summary(results)
    args = [
        *("--runs-dir", str(tmp_path / "runs"), "--json", str(json_path), "--replicates", "200"),
        *("--selection-seeds", "3001", "--seeds", "4001,4002"),
    ]
    partial = qc.main([*args, "--max-runs", "12"], execute=FakeConfirm(SELECTION))
    text = tables.quality_study_2_section(partial, results, ROOT)
    assert "### Quality study 2, stage C" in text and "**Status:** 12 of 36 runs done; stopped at --max-runs" in text
    assert "No verdict yet: 12 of 36 runs done." in text
    assert "Learning rates: `V2-cycle` 0.005, `prelort-off` not chosen yet" in text
    assert "Stage C (the confirmatory study) is running: 12 of 36 runs done; no verdict yet." in (
        tables.choosing_summary(results)
    )
    half = qc.main([*args, "--max-runs", "16"], execute=FakeConfirm(SELECTION))  # every arm on seed 4001
    verdict = half["stage_c"]["analysis"]["verdict"]
    text = tables.quality_study_2_section(half, results, ROOT)
    assert verdict["partial"] and "(PARTIAL: 28 of 36 runs done)" in text
    assert "(study 2, stage C," not in tables.choosing_a_method(results)  # no answer from a partial study
    # phase 1's table: every candidate, the chosen one starred; the lrs say which arm is scaled
    assert (
        "| arm | none scaling, lr 0.0025 | none scaling, lr 0.005 | sqrt scaling, lr 0.0025 | sqrt scaling, lr 0.005 |"
        in text
    )
    assert "`zeropad` 0.0025, sqrt-scaled" in text and "`hetlora` 0.0025," in text
    done = qc.main(args, execute=FakeConfirm(SELECTION))
    a = done["stage_c"]["analysis"]
    verdict = a["verdict"]["verdict"].upper()
    text = tables.quality_study_2_section(done, results, ROOT)
    assert f"**Verdict: {verdict}**" in text and "| tier | best baseline | difference | Holm CI | 95% CI |" in text
    c = a["decision_family"][0]
    assert f"| 2 | `{c['baseline']}` | {c['diff']:+.3f} | [{c['ci_holm'][0]:+.3f}, {c['ci_holm'][1]:+.3f}] |" in text
    assert "Own vs others' facts, `V2-cycle`: tier 2 " in text and "Gap recovered g = (A - F) / (C - F)" in text
    page = tables.choosing_a_method(results)
    assert "## Stage C: the confirmatory study" in page and f"**Verdict: {verdict}**" in page
    # study 2's answer leads the page and the README's three lines once every run is done; study 1 follows
    rec = a["recommendation"]
    uses = {r["use"] for r in rec.values()}
    assert page.index("**Setting measured (study 2, stage C,") < page.index("## Study 1: the earlier setting")
    assert "Study 1's answer: use `fedit` in a setting like study 1's" in page
    for t, r in rec.items():
        assert f"| {t} | `{r['use']}` | `{r['leader']}` {a['arms'][r['leader']][t]['accuracy']:.3f} [" in page
    summary = tables.choosing_summary(results)
    assert summary.startswith(f"**Use `{uses.pop()}`** in a setting like study 2's" if len(uses) == 1 else "**Use** ")
    assert f"PreLort (`V2-cycle`) against the best baseline per tier, pre-registered: **{verdict}**" in summary
    assert "Stage A" not in summary and "study 1's" not in summary
    # what each rank trains at: zeropad chose the sqrt scaling (reference rank 16), V2-cycle none
    assert done["stage_c"]["lr_per_rank"]["zeropad"] == pytest.approx(
        {"2": 0.0025 * 8**0.5, "4": 0.005, "8": 0.0025 * 2**0.5, "16": 0.0025}
    )
    assert done["stage_c"]["lr_per_rank"]["V2-cycle"] == dict.fromkeys(TIERS, 0.005)
    assert done["stage_c"]["lr_per_rank"]["fedit"] == {"2": LR_F}
    assert tables._lr_per_rank_text(done["stage_c"], "zeropad") == (
        "rank 2: 0.00707, rank 4: 0.005, rank 8: 0.00354, rank 16: 0.0025"
    )
    for arm in {r["use"] for r in rec.values()}:  # each recommended arm's lr per rank and cost
        cost = a["arms"][arm]["cost"]
        assert f"| `{arm}` | {tables._lr_per_rank_text(done['stage_c'], arm)} | {cost['passes']:.0f} |" in page
    assert "| `V2-cycle` | 0.005 |" in page and "| `ceiling` | 0.0025 |" in page  # each arm's lr and cost
    assert "| `zeropad` | 0.0025, sqrt-scaled |" in page
    assert a["arms"]["flora"]["cost"]["passes"] == 240 and a["arms"]["flora"]["cost"]["rounds"] == 10
    # the fake runs take ~0 s: their wall ratio means nothing (test_wall_time_is_compared_... checks its value)
    assert "| passes per run | s per round | wall ÷ FedIT |" in page
    assert re.search(r"\| `flora` \|[^\n]*\| 240 \| \d+ \| (\d+\.\d\d|-) \|\n", page)
