"""The pre-registered quality study (docs/quality-study.md): PreLort against the baselines per rank tier.

Arms: prelort with nested = sample / sandwich / all / off, zeropad, hetlora, flexlora, flora, fedit, all on the
study's base config (``--config``, default examples/quality_study.yaml) with stratified client sampling.
Phases:

1. learning-rate selection: per arm, one full-budget run per lr of the grid (``--lrs``) on the selection seed;
   the lr with the highest mean over rank tiers of held-out accuracy wins (ties: higher mean answer
   log-likelihood);
2. the reported seeds (``--seeds``, none equal to the selection seed) at each arm's selected lr.

Every run is a run directory under ``--runs-dir`` (``select/ARM/lr-X`` and ``report/ARM/seed-S``); a finished
one (``study-run.json`` beside a matching config.yaml) is never redone, an unfinished one (killed) is deleted
and started over. The run directories are not committed (they hold adapters): where one is missing, a run the
results JSON already records is taken from there when its config (rebuilt from the JSON's base config,
overrides and study settings) equals this run's, so a fresh clone resumes the study where its JSON stops.
After every run the results JSON (``--json``) is rewritten with every finished run's
per-example records (per tier, the verdicts as a "0"/"1" string and the log-likelihoods in a fixed example
order), its cost (forward/backward passes, optimizer steps, wall time, steps per rank dimension), "k of M runs
done", and the analysis of bench/study_stats.py (paired bootstrap CIs, Holm, minimum detectable difference,
the verdict - PARTIAL until every run is done), and the plot of the paired differences.

    python -m bench.quality_study                                   # the whole study (resumable)
    python -m bench.quality_study --max-runs 4                      # at most 4 runs this session
    python -m bench.quality_study --arms prelort-sample,zeropad --seeds 0,1 --lrs 1e-3

On the reported seeds the arms ``prelort-sandwich`` and ``prelort-all`` are evaluated after every round
(``eval.every=1``) so that they can be compared with the single-pass arms at equal forward/backward passes,
not only at equal optimizer steps; evaluating does not change training. Their selection runs are evaluated
after the last round only, like every other run: the lr selection reads nothing else.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from prelort import config as config_mod  # noqa: E402
from prelort.config import Config  # noqa: E402

from . import study_stats as st
from ._common import claim_run, environment, release_run, repo_relative, write_json

ROOT = Path(__file__).resolve().parents[1]
# arm -> (method, prelort.nested); set in the config data directly (a --set string "off" would read as YAML false)
ARMS: dict[str, tuple[str, str | None]] = {
    "prelort-sample": ("prelort", "sample"),
    "prelort-sandwich": ("prelort", "sandwich"),
    "prelort-all": ("prelort", "all"),
    "prelort-off": ("prelort", "off"),
    "zeropad": ("zeropad", None),
    "hetlora": ("hetlora", None),
    "flexlora": ("flexlora", None),
    "flora": ("flora", None),
    "fedit": ("fedit", None),
}
# variants outside the pre-registered protocol: only with --arms, reported as extra arms, never in the verdict
EXTRA_ARMS: dict[str, tuple[str, str | None]] = {
    "prelort-sample_width": ("prelort", "sample_width"),
}
VERDICT_ARM = "prelort-sample"  # fixed in docs/quality-study.md: the nested mode with the baselines' cost
BASELINES = ("zeropad", "hetlora", "flexlora", "flora", "fedit")
MULTI_PASS_ARMS = ("prelort-sandwich", "prelort-all")  # reported runs evaluated every round (equal passes)
STUDY_SETTINGS = ["clients.sampling=stratified"]  # every tier trains every round (the protocol)
DONE = "study-run.json"
ALPHA = 0.05
POWER = 0.8


# ------------------------------------------------------------------------------------------ configs and runs


def make_config(base: dict[str, Any], arm: str, seed: int, lr: float, overrides: Sequence[str], phase: str) -> Config:
    """One run's config: the base config, the arm, the study's settings, the seed, the lr, the overrides; the
    evaluation runs after the last round (every arm) and, on the reported seeds, after every round (multi-pass
    arms: the equal-passes comparison reads those rounds; the lr selection reads only the last one); the base
    model (round 0) is evaluated in the verdict arm's runs only."""
    data = json.loads(json.dumps(base))
    method, nested = {**ARMS, **EXTRA_ARMS}[arm]
    data.update(method=method, seed=seed)
    data.setdefault("train", {})["lr"] = lr
    if nested is not None:
        data.setdefault("prelort", {})["nested"] = nested
    sets = [*STUDY_SETTINGS, *overrides]
    rounds = config_mod.from_dict(data, sets).rounds
    every_round = arm in MULTI_PASS_ARMS and phase == "report"
    # the untrained model is the same for every arm of a seed: the verdict arm's runs evaluate it, once per seed
    return config_mod.from_dict(
        data, [*sets, f"eval.every={1 if every_round else rounds}", f"eval.base={str(arm == VERDICT_ARM).lower()}"]
    )


def run_inprocess(cfg: Config, run_dir: Path) -> None:
    """One federation in this process (the model is loaded once per run)."""
    from prelort.engines.inprocess import InProcessEngine
    from prelort.runner import Session

    session = Session(cfg, run_dir, verbose=False)
    session.run(InProcessEngine(session, progress=False))


def config_matches(run_dir: Path, cfg: Config) -> bool:
    from prelort.rundir import RunDir

    return RunDir(run_dir).config_matches(cfg)


def recorded_runs(path: Path) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """``{key: (record, its config)}`` of the runs an earlier results JSON holds (empty if there is none)."""
    if not path.is_file():
        return {}
    try:
        old = json.loads(path.read_text())
        base, overrides = old["config"], old["settings"]["overrides"]
        study_settings, runs = old["settings"]["study_settings"], old["runs"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise SystemExit(
            f"{path}: not a results JSON of this study ({type(e).__name__}: {e}); move it away or pass another --json"
        ) from None
    if study_settings != STUDY_SETTINGS:  # the rebuilt configs would not be the ones those runs had
        return {}
    out = {}
    for key, rec in runs.items():
        try:
            cfg = make_config(base, rec["arm"], rec["seed"], rec["lr"], overrides, rec["phase"])
        except (KeyError, config_mod.ConfigError):
            continue
        out[key] = (rec, cfg.to_dict())
    return out


CLAIM_POLL_SECONDS = 30.0  # how often a process waiting for another's run looks again
WAIT_REPORT_SECONDS = 600.0  # how often it says it is still waiting


def run_cpu(run_dir: Path) -> str | None:
    """The CPU a finished run ran on, as its done marker records it (None for runs from before it did)."""
    try:
        cpu = json.loads((run_dir / DONE).read_text()).get("cpu")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    return cpu if isinstance(cpu, str) else None


def ensure_run(
    cfg: Config, run_dir: Path, execute: Callable[[Config, Path], None], *, wait: bool = True
) -> tuple[bool, float] | None:
    """``(ran, wall seconds)``: skip a finished run, start an unfinished one over, run a missing one. Before
    running, the run is claimed (``_common.claim_run``), so that processes of the same command share the runs:
    one claimed by another live process is waited for (``wait``, with a progress line; taken over if that
    process dies first) or, with ``wait=False``, left to it: None."""
    marker = run_dir / DONE
    waiting_since: float | None = None
    reported = 0.0
    while True:
        if marker.is_file():
            if not config_matches(run_dir, cfg):
                raise SystemExit(
                    f"{run_dir} holds a finished run with another config; delete it or pass another --runs-dir"
                )
            if waiting_since is not None:
                print(f"{run_dir}: finished by the other process", flush=True)
            return False, float(json.loads(marker.read_text())["wall_seconds"])
        holder = claim_run(run_dir)
        if holder is None:
            break
        if not wait:
            return None
        now = time.monotonic()
        if waiting_since is None or now - reported >= WAIT_REPORT_SECONDS:
            waited = "" if waiting_since is None else f" (waited {(now - waiting_since) / 60:.0f} min)"
            print(f"waiting for {run_dir}: process {holder} is running it{waited}", flush=True)
            waiting_since, reported = waiting_since or now, now
        time.sleep(CLAIM_POLL_SECONDS)
    try:
        if marker.is_file():  # finished by another process between the look and the claim
            return ensure_run(cfg, run_dir, execute, wait=wait)
        if run_dir.exists():
            shutil.rmtree(run_dir)  # killed part-way: its records may be incomplete, so it starts over
        t0 = time.perf_counter()
        execute(cfg, run_dir)
        wall = round(time.perf_counter() - t0, 1)
        # the CPU too: wall seconds compare only on one machine, and a study's runs span sessions and machines
        write_json(marker, {"wall_seconds": wall, "cpu": environment()["cpu"]})
        return True, wall
    finally:
        release_run(run_dir)


# ------------------------------------------------------------------------------------------ reading a run


def _id_key(x: Any) -> tuple[int, Any]:
    return (0, x) if isinstance(x, (int, float)) and not isinstance(x, bool) else (1, str(x))


def read_eval_records(run_dir: Path) -> dict[int, list[dict[str, Any]]]:
    """``{round: records}`` of ``eval/round-N.jsonl`` (one JSON object per evaluated example and tier)."""
    from prelort.rundir import RunDir

    out = RunDir(run_dir).read_eval_records()
    if not out:
        raise SystemExit(
            f"{run_dir}: no per-example evaluation records (eval/round-N.jsonl); the study needs "
            "prelort's per-example evaluation (issue 12 part A)"
        )
    return out


def compact(records: list[dict[str, Any]], ids: list[Any], loglik: bool) -> dict[str, Any]:
    by_id = {r["id"]: r for r in records}
    if set(by_id) != set(ids):
        raise SystemExit(
            f"evaluation records of rank {records[0].get('rank')!r} cover other examples than the run's "
            "other tiers: cannot pair them"
        )
    out: dict[str, Any] = {"correct": "".join("1" if by_id[i]["correct"] else "0" for i in ids)}
    if loglik:
        out["loglik"] = [None if by_id[i].get("loglik") is None else round(float(by_id[i]["loglik"]), 4) for i in ids]
    return out


def collect_run(run_dir: Path) -> dict[str, Any]:
    """The compact record of a finished run: per-example verdicts per tier, cost and per-dimension steps."""
    from prelort.rundir import RunDir

    metrics = RunDir(run_dir).metrics.records()
    train = sorted((r for r in metrics if r.get("kind") == "train"), key=lambda r: r["round"])
    evals = read_eval_records(run_dir)
    final = max(evals)
    all_records = [r for recs in evals.values() for r in recs]
    ids = sorted({r["id"] for r in all_records if r.get("kind") == "tier"}, key=_id_key)
    category = {r["id"]: r.get("category") for r in all_records}
    groups: dict[tuple[int, str, str], list[dict[str, Any]]] = {}
    for r in all_records:
        groups.setdefault((int(r["round"]), str(r["kind"]), str(r["rank"])), []).append(r)
    tiers = {
        rank: compact(recs, ids, True) for (rd, kind, rank), recs in groups.items() if kind == "tier" and rd == final
    }
    curve = {rank: compact(recs, ids, True) for (rd, kind, rank), recs in groups.items() if kind == "curve"}
    per_round: dict[str, dict[str, Any]] = {}
    for (rd, kind, rank), recs in groups.items():
        if kind == "tier" and rd != final:
            per_round.setdefault(str(rd), {})[rank] = compact(recs, ids, False)
    base = next((compact(recs, ids, True) for (rd, kind, rank), recs in groups.items() if kind == "base"), None)
    dims = max((len(r.get("dim_steps") or []) for r in train), default=0)

    def dim_total(key: str) -> list[int]:
        return [sum((r.get(key) or [0] * dims)[i] for r in train) for i in range(dims)]

    return {
        "final_round": final,
        "examples": {"ids": ids, "category": [category.get(i) for i in ids]},
        "tiers": dict(sorted(tiers.items(), key=lambda kv: int(kv[0]))),
        "curve": dict(sorted(curve.items(), key=lambda kv: int(kv[0]))),
        "per_round": per_round,
        "base": base,
        "rounds": [
            {"round": r["round"], "passes": r.get("passes"), "optimizer_steps": r.get("optimizer_steps")} for r in train
        ],
        "cost": {
            "passes": sum(r.get("passes") or 0 for r in train),
            "optimizer_steps": sum(r.get("optimizer_steps") or 0 for r in train),
        },
        "dim_steps": dim_total("dim_steps"),
        "dim_clients": dim_total("dim_clients"),
    }


def accuracy(correct: str) -> float:
    return sum(c == "1" for c in correct) / len(correct) if correct else float("nan")


def verdicts(correct: str) -> np.ndarray:
    return np.frombuffer(correct.encode(), dtype=np.uint8) - ord("0")


def selection_score(rec: dict[str, Any]) -> tuple[float, float]:
    accs = [accuracy(t["correct"]) for t in rec["tiers"].values()]
    lls = [x for t in rec["tiers"].values() for x in t.get("loglik", []) if x is not None]
    return (round(sum(accs) / len(accs), 9), sum(lls) / len(lls) if lls else -math.inf)


# ------------------------------------------------------------------------------------------ analysis


def _ci(reps: np.ndarray, level: float = 0.95) -> list[float]:
    return [round(x, 5) for x in st.percentile_ci(reps, level)]


def holm_family(family: list[dict[str, Any]], reps_of: Mapping[tuple[str, str], np.ndarray]) -> None:
    """Holm across ``family`` (comparisons with ``tier``, ``baseline``, ``p``, ``se``), in place: each gets its
    Holm p-value, verdict and level, the Holm-adjusted interval of its bootstrap differences ``reps_of[(tier,
    baseline)]``, and the MDD at ALPHA and at the strictest Holm level ALPHA / len(family)."""
    h = st.holm([c["p"] for c in family], ALPHA)
    m = len(family)
    for c, adj, rej, level in zip(family, h["adjusted"], h["reject"], h["level"]):
        c.update(
            p_holm=round(adj, 5),
            significant=rej,
            holm_level=level,
            ci_holm=_ci(reps_of[(str(c["tier"]), c["baseline"])], 1 - level),
            mdd=round(st.mdd(c["se"], ALPHA, POWER), 4),
            mdd_strictest=round(st.mdd(c["se"], ALPHA / m, POWER), 4),
        )


class _Resamplers:
    """One resampler per set of seeds (seeds sorted), so every comparison on the same seeds shares draws."""

    def __init__(self, replicates: int, seed: int):
        self.replicates, self.seed, self.cache = replicates, seed, {}

    def get(self, sizes: tuple[int, ...]) -> st.Resampler:
        if sizes not in self.cache:
            self.cache[sizes] = st.Resampler(list(sizes), self.replicates, self.seed)
        return self.cache[sizes]


def analyse(
    runs: dict[str, dict[str, Any]],
    arms: Sequence[str],
    seeds: Sequence[int],
    *,
    replicates: int = 10_000,
    bootstrap_seed: int = 12345,
    complete: bool = False,
) -> dict[str, Any]:
    """The study's statistics from the finished reported runs (``runs['report/ARM/seed-S']``)."""
    reported = {
        arm: {s: runs[f"report/{arm}/seed-{s}"] for s in seeds if f"report/{arm}/seed-{s}" in runs} for arm in arms
    }
    resamplers = _Resamplers(replicates, bootstrap_seed)
    out: dict[str, Any] = {"complete": complete, "replicates": replicates, "bootstrap_seed": bootstrap_seed}

    def values(arm: str, ss: Sequence[int], tier: str, where: str = "tiers") -> list[np.ndarray]:
        return [verdicts(reported[arm][s][where][tier]["correct"]) for s in ss]

    def resampler(arm_values: list[np.ndarray]) -> st.Resampler:
        return resamplers.get(tuple(len(v) for v in arm_values))

    # accuracy per arm per tier and the truncation curve, each with its 95% CI over that arm's seeds
    summary: dict[str, Any] = {}
    for arm in arms:
        ss = sorted(reported[arm])
        if not ss:
            continue
        first = reported[arm][ss[0]]
        entry: dict[str, Any] = {"seeds": ss, "tiers": {}, "curve": {}}
        for where in ("tiers", "curve"):
            for tier in first[where]:
                v = values(arm, ss, tier, where)
                entry[where][tier] = {"accuracy": round(st.pooled_mean(v), 5), "ci95": _ci(resampler(v).means(v))}
        runs_of = [reported[arm][s] for s in ss]
        entry["cost"] = {
            key: round(float(np.mean([r["cost"][key] for r in runs_of])), 1) for key in ("passes", "optimizer_steps")
        }
        entry["cost"]["wall_seconds"] = round(float(np.mean([r["wall_seconds"] for r in runs_of])), 1)
        dims = [r["dim_steps"] for r in runs_of if r.get("dim_steps")]
        if dims:
            entry["dim_steps_mean"] = [round(float(np.mean([d[i] for d in dims])), 2) for i in range(len(dims[0]))]
        summary[arm] = entry
    out["arms"] = summary
    # the untrained model (evaluated once per seed, in the verdict arm's runs): what training adds to
    base = {s: r["base"] for s, r in reported.get(VERDICT_ARM, {}).items() if r.get("base")}
    if base:
        v = [verdicts(base[s]["correct"]) for s in sorted(base)]
        out["base_model"] = {
            "seeds": sorted(base),
            "accuracy": round(st.pooled_mean(v), 5),
            "ci95": _ci(resampler(v).means(v)),
        }

    # the tests: PreLort minus each baseline per tier, on the seeds every verdict arm has finished
    verdict_arms = [VERDICT_ARM, *[b for b in BASELINES if b in arms]]
    common = sorted(set.intersection(*(set(reported.get(a, {})) for a in verdict_arms))) if VERDICT_ARM in arms else []
    out["seeds_compared"] = common
    if not common or len(verdict_arms) < 2:
        out["verdict"] = None
        out["note"] = "no reported seed has finished PreLort and every baseline yet"
        return out
    # every comparison below (tests, equal steps/passes, exploratory) pairs arms on a seed's examples
    for s in sorted({s for runs_of in reported.values() for s in runs_of}):
        ids = [runs_of[s]["examples"]["ids"] for runs_of in reported.values() if s in runs_of]
        if any(v != ids[0] for v in ids):
            raise ValueError(f"seed {s}: the arms evaluated different held-out examples; cannot pair them")
    tiers = sorted(reported[VERDICT_ARM][common[0]]["tiers"], key=int)
    comparisons = []
    reps_of: dict[tuple[str, str], np.ndarray] = {}
    best: dict[str, str] = {}
    for tier in tiers:
        p_vals = values(VERDICT_ARM, common, tier)
        rs = resampler(p_vals)
        best[tier] = max(verdict_arms[1:], key=lambda b: (st.pooled_mean(values(b, common, tier)), -BASELINES.index(b)))
        for b in verdict_arms[1:]:
            diff = st.paired_differences(p_vals, values(b, common, tier))
            reps = rs.means(diff)
            reps_of[(tier, b)] = reps
            se = float(np.std(reps, ddof=1)) if reps.size > 1 else 0.0
            comparisons.append(
                {
                    "tier": int(tier),
                    "baseline": b,
                    "diff": round(st.pooled_mean(diff), 5),
                    "ci95": _ci(reps),
                    "p": round(st.bootstrap_p(reps), 5),
                    "se": round(se, 5),
                    "best": b == best[tier],
                }
            )
    holm_family(comparisons, reps_of)
    out["comparisons"] = comparisons
    out["best_baseline"] = {t: best[t] for t in tiers}
    best_rows = {c["tier"]: c for c in comparisons if c["best"]}
    out["verdict"] = {
        **st.decide({t: tuple(best_rows[t]["ci_holm"]) for t in best_rows}),
        "partial": not complete,
        "verdict_arm": VERDICT_ARM,
    }
    out["mdd"] = {
        "best_baseline_per_tier": {str(t): best_rows[t]["mdd"] for t in sorted(best_rows)},
        "best_baseline_per_tier_strictest": {str(t): best_rows[t]["mdd_strictest"] for t in sorted(best_rows)},
        "median_all": round(float(np.median([c["mdd"] for c in comparisons])), 4),
        "how": f"(z_(1-a/2) + z_{POWER}) x the bootstrap SE of the paired difference, a = {ALPHA} "
        f"(mdd) and a = {ALPHA}/{len(comparisons)} (mdd_strictest, Holm's first step)",
    }
    # truncation curve: PreLort minus each baseline per t (95% CI, not part of the tests)
    curve_t = sorted(reported[VERDICT_ARM][common[0]]["curve"], key=int)
    out["curve_differences"] = {
        t: {
            b: _ci_entry(values(VERDICT_ARM, common, t, "curve"), values(b, common, t, "curve"), resampler)
            for b in verdict_arms[1:]
            if t in reported[b][common[0]]["curve"]
        }
        for t in curve_t
    }
    out["equal_steps"], out["equal_passes"] = _multi_pass(reported, arms, tiers, values, resampler)
    out["exploratory"] = _exploratory(reported, arms, tiers, best, values, resampler)
    return out


def _exploratory(reported, arms, tiers, best, values, resampler) -> dict[str, Any]:
    """Post hoc, outside the tests and the verdict: each other PreLort arm minus the tier's best baseline (the
    verdict's), 95% CI without multiplicity correction, so a reader sees how another nesting mode compares."""
    out: dict[str, Any] = {}
    others = [a for a in arms if {**ARMS, **EXTRA_ARMS}[a][0] == "prelort" and a != VERDICT_ARM]
    for arm in others:
        entry: dict[str, Any] = {}
        for t in tiers:
            b = best[t]
            ss = sorted(set(reported[arm]) & set(reported[b]))
            if ss:
                entry[t] = {"baseline": b, "seeds": ss, **_ci_entry(values(arm, ss, t), values(b, ss, t), resampler)}
        if entry:
            out[arm] = entry
    return out


def _ci_entry(a: list[np.ndarray], b: list[np.ndarray], resampler) -> dict[str, Any]:
    diff = st.paired_differences(a, b)
    return {"diff": round(st.pooled_mean(diff), 5), "ci95": _ci(resampler(diff).means(diff))}


def _multi_pass(reported, arms, tiers, values, resampler) -> tuple[dict[str, Any], dict[str, Any]]:
    """sandwich / all (and off) minus prelort-sample at equal optimizer steps (final round) and at equal passes
    (the last round whose cumulative passes stay within prelort-sample's total on that seed)."""
    equal_steps: dict[str, Any] = {}
    equal_passes: dict[str, Any] = {}
    if VERDICT_ARM not in arms:
        return equal_steps, equal_passes
    for arm in [a for a in ("prelort-sandwich", "prelort-all", "prelort-off", *EXTRA_ARMS) if a in arms]:
        ss = sorted(set(reported[arm]) & set(reported[VERDICT_ARM]))
        if not ss:
            continue
        passes_ratio = float(
            np.mean(
                [reported[arm][s]["cost"]["passes"] / max(1, reported[VERDICT_ARM][s]["cost"]["passes"]) for s in ss]
            )
        )
        equal_steps[arm] = {
            "seeds": ss,
            "passes_ratio": round(passes_ratio, 3),
            "tiers": {t: _ci_entry(values(arm, ss, t), values(VERDICT_ARM, ss, t), resampler) for t in tiers},
        }
        if arm not in MULTI_PASS_ARMS:
            continue
        chosen: dict[int, str] = {}
        for s in ss:
            budget = reported[VERDICT_ARM][s]["cost"]["passes"]
            total, pick = 0, None
            for r in reported[arm][s]["rounds"]:
                total += r["passes"] or 0
                if total <= budget:
                    pick = r["round"]
            if pick is None or (
                str(pick) not in reported[arm][s]["per_round"] and pick != reported[arm][s]["final_round"]
            ):
                break
            chosen[s] = str(pick)
        if len(chosen) != len(ss):
            equal_passes[arm] = {"note": "no evaluated round within prelort-sample's pass budget"}
            continue

        def at_budget(t: str) -> list[np.ndarray]:
            out = []
            for s in ss:
                run = reported[arm][s]
                tiers_then = run["tiers"] if int(chosen[s]) == run["final_round"] else run["per_round"][chosen[s]]
                out.append(verdicts(tiers_then[t]["correct"]))
            return out

        equal_passes[arm] = {
            "seeds": ss,
            "rounds": {str(s): int(chosen[s]) for s in ss},
            "tiers": {t: _ci_entry(at_budget(t), values(VERDICT_ARM, ss, t), resampler) for t in tiers},
        }
    return equal_steps, equal_passes


# ------------------------------------------------------------------------------------------ plot


def plot_differences(analysis: dict[str, Any], out: Path) -> Path | None:
    """Paired differences PreLort minus each baseline per tier, with the Holm-adjusted and 95% CIs."""
    comps = analysis.get("comparisons")
    if not comps:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tiers = sorted({c["tier"] for c in comps})
    baselines = list(dict.fromkeys(c["baseline"] for c in comps))
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    width = 0.8 / len(baselines)
    for j, b in enumerate(baselines):
        xs, ys, lo, hi, lo95, hi95 = [], [], [], [], [], []
        for i, t in enumerate(tiers):
            c = next(c for c in comps if c["tier"] == t and c["baseline"] == b)
            xs.append(i - 0.4 + width * (j + 0.5))
            ys.append(c["diff"])
            lo.append(c["diff"] - c["ci_holm"][0])
            hi.append(c["ci_holm"][1] - c["diff"])
            lo95.append(c["diff"] - c["ci95"][0])
            hi95.append(c["ci95"][1] - c["diff"])
        bars = ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o", capsize=3, label=b, elinewidth=1)
        ax.errorbar(xs, ys, yerr=[lo95, hi95], fmt="none", elinewidth=3, alpha=0.4, color=bars[0].get_color())
    ax.axhline(0, color="black", linewidth=0.8)
    ax.axhspan(-st.EQUIVALENCE, st.EQUIVALENCE, color="grey", alpha=0.1, label="+-0.03")
    ax.set_xticks(range(len(tiers)), [f"tier {t}" for t in tiers])
    ax.set_ylabel(f"accuracy: {VERDICT_ARM} minus baseline")
    verdict = analysis.get("verdict") or {}
    ax.set_title(
        f"paired differences (thin: Holm-adjusted CI, thick: 95% CI); verdict {verdict.get('verdict')}"
        + (" (PARTIAL)" if verdict.get("partial") else ""),
        fontsize=9,
    )
    ax.legend(fontsize=8, ncol=3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# ------------------------------------------------------------------------------------------ main


def parse_list(text: str, flag: str, cast: type) -> list:
    try:
        values = [cast(t.strip()) for t in text.split(",") if t.strip()]
    except ValueError:
        raise SystemExit(f"{flag}: expected a comma-separated list of {cast.__name__}, got {text!r}") from None
    if not values:
        raise SystemExit(f"{flag}: empty list")
    return values


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--config",
        type=Path,
        default=ROOT / "examples" / "quality_study.yaml",
        help="the study's base config (default examples/quality_study.yaml)",
    )
    p.add_argument(
        "--arms",
        default=",".join(ARMS),
        help=f"comma list of arms (default the pre-registered ones: {', '.join(ARMS)}; extra, not "
        f"pre-registered: {', '.join(EXTRA_ARMS)})",
    )
    p.add_argument("--seeds", default="0,1,2,3,4", help="reported seeds (default 0,1,2,3,4)")
    p.add_argument("--selection-seed", type=int, default=1000, help="seed of the lr-selection runs (default 1000)")
    p.add_argument("--lrs", default="1e-3,3e-3,1e-2", help="learning-rate grid (default 1e-3,3e-3,1e-2)")
    p.add_argument("--runs-dir", type=Path, default=ROOT / "results" / "runs" / "quality_study")
    p.add_argument("--json", type=Path, default=ROOT / "results" / "quality_study.json")
    p.add_argument("--max-runs", type=int, default=None, help="stop after running this many runs (skips don't count)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for every run (recorded in the JSON)",
    )
    p.add_argument(
        "--bootstrap",
        type=int,
        default=10_000,
        help="bootstrap replicates (default 10000; the smallest bootstrap p is 2 / (B + 1), so Holm over 20 tests "
        "needs B >= 800 to reach significance at all)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    args = p.parse_args(argv)
    args.arms = parse_list(args.arms, "--arms", str)
    unknown = [a for a in args.arms if a not in ARMS and a not in EXTRA_ARMS]
    if unknown:
        raise SystemExit(f"--arms: unknown arm(s) {', '.join(unknown)}; known: {', '.join([*ARMS, *EXTRA_ARMS])}")
    args.seeds = parse_list(args.seeds, "--seeds", int)
    args.lrs = parse_list(args.lrs, "--lrs", float)
    if any(lr <= 0 for lr in args.lrs):
        raise SystemExit(f"--lrs: learning rates must be positive, got {args.lrs}")
    if args.selection_seed in args.seeds:
        raise SystemExit(
            f"--selection-seed {args.selection_seed} is also a reported seed; lr selection must not "
            "see the reported seeds' data"
        )
    if args.max_runs is not None and args.max_runs < 0:
        raise SystemExit(f"--max-runs: must be >= 0, got {args.max_runs}")
    if args.bootstrap < 2:
        raise SystemExit(f"--bootstrap: must be >= 2, got {args.bootstrap}")
    if not args.config.is_file():
        raise SystemExit(f"--config: {args.config} does not exist")
    try:
        args.base = config_mod.load(args.config, args.overrides).to_dict()
    except config_mod.ConfigError as e:
        raise SystemExit(f"--config/--set: {e}") from None
    return args


def main(argv: Sequence[str] | None = None, execute: Callable[[Config, Path], None] = run_inprocess) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    command = "python -m bench.quality_study " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
    )
    total = len(args.arms) * (len(args.lrs) + len(args.seeds))
    payload: dict[str, Any] = {
        "benchmark": "quality_study",
        "command": command,
        "protocol": "docs/quality-study.md",
        "settings": {
            "config": repo_relative(args.config),
            "arms": args.arms,
            "seeds": args.seeds,
            "selection_seed": args.selection_seed,
            "lr_grid": args.lrs,
            "overrides": args.overrides,
            "study_settings": STUDY_SETTINGS,
            "extra_arms": [a for a in args.arms if a in EXTRA_ARMS],
            "verdict_arm": VERDICT_ARM,
            "baselines": list(BASELINES),
            "runs_dir": repo_relative(args.runs_dir),
        },
        "config": args.base,
        "environment": environment(),
        "arms": {},
        "runs": {},
    }
    recorded = recorded_runs(args.json)
    ran = 0
    stopped = False

    # the verdict is complete when the pre-registered arms' runs are: an extra arm still running leaves it so
    registered_total = sum(a in ARMS for a in args.arms) * (len(args.lrs) + len(args.seeds))

    def progress() -> dict[str, Any]:
        done = len(payload["runs"])
        registered = sum(r["arm"] in ARMS for r in payload["runs"].values())
        text = f"{done} of {total} runs done"
        if registered_total != total:
            text += f" (pre-registered arms: {registered} of {registered_total})"
        return {
            "done": done,
            "total": total,
            "text": text,
            "pre_registered_done": registered,
            "pre_registered_total": registered_total,
        }

    def save() -> None:
        payload["progress"] = progress()
        complete = payload["progress"]["pre_registered_done"] == registered_total
        payload["cpu_seconds"] = round(sum(r["wall_seconds"] for r in payload["runs"].values()), 1)
        try:
            payload["analysis"] = analyse(
                payload["runs"], args.arms, args.seeds, replicates=args.bootstrap, complete=complete
            )
        except (KeyError, ValueError) as e:  # the runs stay recorded; the study goes on
            payload["analysis"] = {"error": f"{type(e).__name__}: {e}", "complete": complete}
            print(f"warning: the analysis failed ({type(e).__name__}: {e}); the runs are recorded", flush=True)
        plot = plot_differences(payload["analysis"], args.json.with_suffix("") / "paired_differences.png")
        payload["plots"] = [repo_relative(plot)] if plot else []
        write_json(args.json, payload)

    def one(key: str, arm: str, seed: int, lr: float, phase: str, reuse_only: bool) -> dict[str, Any] | None:
        nonlocal ran, stopped
        if key in payload["runs"]:  # taken in the reuse sweep
            return payload["runs"][key]
        run_dir = args.runs_dir / key
        cfg = make_config(args.base, arm, seed, lr, args.overrides, phase)
        earlier = recorded.get(key)
        # its directory is gone (not committed), its record is not
        from_json = not run_dir.exists() and earlier is not None and earlier[1] == cfg.to_dict()
        finished = from_json or (run_dir / DONE).is_file()
        if not finished and reuse_only:
            return None
        if not finished and args.max_runs is not None and ran >= args.max_runs:
            stopped = True
            return None
        if from_json:
            rec, did_run, wall = earlier[0], False, earlier[0]["wall_seconds"]
        else:
            did_run, wall = ensure_run(cfg, run_dir, execute)
            rec = {
                "arm": arm,
                "seed": seed,
                "lr": lr,
                "phase": phase,
                "wall_seconds": wall,
                "run_dir": repo_relative(run_dir),
                **collect_run(run_dir),
            }
        ran += did_run
        rec["accuracy"] = {t: round(accuracy(v["correct"]), 6) for t, v in rec["tiers"].items()}
        payload["runs"][key] = rec
        if phase == "select":  # in the grid before the save, so the JSON always lists every finished lr
            acc, ll = selection_score(rec)
            payload["arms"][arm]["grid"].append(
                {"lr": lr, "run": key, "mean_accuracy": acc, "mean_loglik": round(ll, 5)}
            )
        tiers = " ".join(f"r{t}={a:.3f}" for t, a in rec["accuracy"].items())
        print(
            f"[{progress()['text']}] {key}: lr={lr:g} {'ran' if did_run else 'finished earlier'} "
            f"({wall:.0f} s; {rec['cost']['passes']} passes, {rec['cost']['optimizer_steps']} steps) {tiers}",
            flush=True,
        )
        if did_run:
            save()
        return rec

    def sweep(reuse_only: bool) -> None:
        nonlocal stopped
        # phase 1: learning rate per arm on the selection seed
        for arm in args.arms:
            entry: dict[str, Any] = payload["arms"].setdefault(arm, {"grid": []})  # one() appends each finished lr
            grid, ran_before = entry["grid"], ran
            for lr in args.lrs:
                one(f"select/{arm}/lr-{lr:g}", arm, args.selection_seed, lr, "select", reuse_only)
            if "lr" not in entry and len(grid) == len(args.lrs):
                grid.sort(key=lambda g: g["lr"])  # the grid's order, whichever sweep found each point
                best = max(grid, key=lambda g: (g["mean_accuracy"], g["mean_loglik"]))
                entry.update(
                    lr=best["lr"], at_grid_edge=len(args.lrs) > 1 and best["lr"] in (min(args.lrs), max(args.lrs))
                )
            if "lr" in entry and ran > ran_before:
                save()  # the choice is in the JSON as soon as the grid is done, not only after the next run
        # phase 2: the reported seeds, seed by seed so partial results cover every arm
        for seed in args.seeds:
            for arm in args.arms:
                lr = payload["arms"][arm].get("lr")
                if lr is None:
                    stopped = stopped or not reuse_only
                    continue
                one(f"report/{arm}/seed-{seed}", arm, seed, lr, "report", reuse_only)

    # every finished run first, so each save while the rest runs keeps them all (an arm added to a finished
    # study would otherwise write a JSON without the runs it has not revisited yet); then what is left
    sweep(reuse_only=True)
    sweep(reuse_only=False)
    save()
    verdict = payload["analysis"].get("verdict") or {}
    print(
        f"{payload['progress']['text']}"
        + (" (stopped at --max-runs)" if stopped else "")
        + f"; verdict: {verdict.get('verdict', 'n/a')}"
        + (" (PARTIAL)" if verdict.get("partial") else "")
        + f"; wrote {args.json}",
        flush=True,
    )
    return payload


if __name__ == "__main__":
    main()
