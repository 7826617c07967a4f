"""Quality study 2, stage C (docs/quality-study-2.md): the confirmatory study.

Runs only once stage A's gate (bench/quality_gate.py) has passed at a ladder step S* and stage B
(bench/quality_screen.py) has chosen its PreLort variant V*, at S*'s setting on the study's base config
(``--config``, default examples/quality_study.yaml: 8 clients of ranks 2/4/8/16, one of each rank per round,
every tier evaluated once after the last round). Eight arms (``arm_settings``): V* at its stage-B lr, five
baselines whose lr is selected, FedIT (the floor, every client at rank 2) at lr_F and the ceiling (stage A's:
every client at rank 16) at lr_C.

- Phase 1, lr selection: ``prelort-off``, ``zeropad``, ``hetlora``, ``flexlora`` and ``flora`` at stage B's
  2-point grid ({lr_F, lr_C}; {lr_C / 2, lr_C} if equal) and both lr scalings (``SCALINGS``: none, and V3's
  ``train.lr_rank_scaling: sqrt``; the protocol's amendment of 2026-12-03) on the selection seeds 3001 and 3002,
  each taking the (scaling, lr) with the highest mean accuracy over the tiers (ties: the answer
  log-likelihood); no eligibility rule. A scaled candidate runs as ``ARM-sqrt``.
- Phase 2: the 8 arms on the reported seeds 4001-4008, each at its lr (and scaling).
- Analysis (:func:`analyse`, pure): per tier the best baseline; V* minus it at each tier (the decision family,
  Holm over the 4, Holm-adjusted and plain 95% intervals, the MDD at a = 0.05 and 0.05 / 4); V* minus every
  baseline at every tier (Holm over the 24); the verdict by study 1's rule without its equivalence branch; the
  secondary endpoints (answer log-likelihood, own-vs-others accuracy, gap recovered); per tier the arm to
  recommend (:func:`recommend`, exploratory).

One run directory per run under ``--runs-dir`` (``STEP/ARM/lr-X/seed-S``), never redone once finished; the
``stage_c`` key of ``--json`` (results/quality_study_2.json, beside stages A and B) is rewritten after every run
with the per-example records and "k of M runs done"; on a fresh clone a run recorded there with the same inputs
is not redone. Two processes of the same command share the runs (claims, as stages A and B):

    python -m bench.quality_confirm --threads 1 &  python -m bench.quality_confirm --threads 1
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from prelort import config as config_mod
from prelort.config import Config
from prelort.train import rank_lr

from . import study_stats as st
from ._common import environment, repo_relative, write_stage
from .quality_gate import ARMS as GATE_ARMS
from .quality_gate import (
    HEADER,
    STEPS,
    config_inputs,
    digest_of,
    earlier_runs,
    evaluated_once,
    score_grid,
    step_overrides,
    study_run,
)
from .quality_gate import STUDY_SETTINGS as GATE_SETTINGS
from .quality_screen import VARIANTS, lr_grid, read_results, refuse, stage_a_setting
from .quality_study import _ci, _Resamplers, holm_family, run_inprocess, verdicts

ROOT = Path(__file__).resolve().parents[1]
SELECTED = ("prelort-off", "zeropad", "hetlora", "flexlora", "flora")  # their lr is selected in phase 1
BASELINES = (*SELECTED, "fedit")  # the verdict arm's competitors (the ceiling is a reference, not one)
FLOOR, CEILING = "fedit", "ceiling"
SELECTION_SEEDS = (3001, 3002)
REPORTED_SEEDS = tuple(range(4001, 4009))
TIERS = ("2", "4", "8", "16")
ALPHA, POWER = 0.05, 0.8
# the method each arm runs, set in the config data (the protocol's table); FedIT and the ceiling are stage A's arms
BASELINE_SETTINGS: dict[str, dict[str, Any]] = {
    "prelort-off": {"method": "prelort", "prelort": {"nested": "off"}},
    "zeropad": {"method": "zeropad"},
    "hetlora": {"method": "hetlora"},
    "flexlora": {"method": "flexlora"},
    "flora": {"method": "flora"},
    FLOOR: {"method": "fedit", **GATE_ARMS["floor"]},
    CEILING: {"method": "fedit", **GATE_ARMS["ceiling"]},
}
# the lr scalings a selected baseline is chosen over (amendment of 2026-12-03): the verdict arm was chosen among
# variants with and without V3's scaling, so every baseline is too; FedIT and the ceiling train one rank each, at
# the lr stage A measured best for it
SCALINGS: dict[str, dict[str, Any]] = {"none": {}, "sqrt": {"train": dict(VARIANTS["V3-sqrt-lr"]["train"])}}
# stage A's settings without its method: every tier evaluated once, after the last round only
STUDY_SETTINGS = [s for s in GATE_SETTINGS if not s.startswith("method=")]


def arm_settings(variant: str, variant_settings: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The 8 arms in the protocol's order: V* (the PreLort ``variant`` with its settings), the five selected
    baselines, FedIT and the ceiling."""
    return {variant: {"method": "prelort", **variant_settings}, **BASELINE_SETTINGS}


def candidate(arm: str, scaling: str) -> str:
    """The run name of a selected baseline at an lr scaling: the arm itself without one, else ``ARM-SCALING``."""
    return arm if scaling == "none" else f"{arm}-{scaling}"


def candidate_settings(arms: Mapping[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every run name's settings: the arms, and each selected baseline at each scaling other than none."""
    out = {name: dict(settings) for name, settings in arms.items()}
    for arm in SELECTED:
        for scaling, extra in SCALINGS.items():
            if scaling != "none":
                merged = dict(arms[arm])
                for key, value in extra.items():
                    merged[key] = {**merged.get(key, {}), **value}
                out[candidate(arm, scaling)] = merged
    return out


def select(scored: Mapping[str, Sequence[dict[str, Any]]], grid: Sequence[float]) -> dict[str, Any]:
    """A selected baseline's choice from its scored candidates (scaling -> :func:`score_grid` rows): the
    (scaling, lr) with the highest mean accuracy over the tiers, ties by the log-likelihood; ``lr`` and
    ``scaling`` None until every candidate has all its seeds."""
    rows = [{**g, "scaling": scaling} for scaling, gs in scored.items() for g in gs]
    entry: dict[str, Any] = {"grid": rows, "lr": None, "scaling": None}
    if len(rows) == len(grid) * len(SCALINGS):
        best = max(rows, key=lambda g: (g["mean_accuracy"], g["mean_loglik"]))
        entry["lr"], entry["scaling"] = best["lr"], best["scaling"]
    return entry


def run_inputs(
    base: dict[str, Any], settings: Mapping[str, Any], seed: int, lr: float, step: str, overrides: Sequence[str]
) -> tuple[dict[str, Any], list[str]]:
    """A stage-C run's config inputs (:func:`quality_gate.config_inputs`)."""
    return config_inputs(base, settings, seed, lr, [*STUDY_SETTINGS, *step_overrides(step), *overrides])


# ------------------------------------------------------------------------------------------ own vs others


def own_examples(cfg: Config, ids: Sequence[Any], ranks: Sequence[int]) -> dict[str, str] | None:
    """Per tier t of ``ranks`` (the heterogeneous federation's ranks, cycled over the clients as
    ``clients.ranks`` is: client k has ranks[k % len]), a "0"/"1" string over ``ids``: 1 where the example's
    fact is held by a client of rank t. The facts suite puts entity k in group ``k mod groups`` and gives every
    record its group; the partition (``prelort.recipe.load_data``, by ``group``) gives each client the records
    of its groups; an evaluated example's id is :func:`prelort.evaluate.example_id` of its held-out record.
    So an example is "own" at tier t iff a rank-t client's partition holds its entity group. Every arm of a
    seed shares the clients, data and partition, so the split is the same for every arm (FedIT's and the
    ceiling's clients included, whose own rank is one for all). None if ``ids`` are not the suite's ids."""
    from prelort.evaluate import example_id
    from prelort.recipe import load_data

    _, test, parts = load_data(cfg)
    group_of = {example_id(r): r["group"] for r in test}
    if not all(str(i) in group_of for i in ids):
        return None
    out: dict[str, str] = {}
    for t in sorted(set(ranks)):
        held = {g for k, part in enumerate(parts) if ranks[k % len(ranks)] == t for g in part.unique("group")}
        out[str(t)] = "".join("1" if group_of[str(i)] in held else "0" for i in ids)
    return out


# ------------------------------------------------------------------------------------------ analysis


def tier_record(rec: dict[str, Any], tier: str) -> dict[str, Any]:
    """A run's records at ``tier``; an arm with one tier (FedIT: rank 2, the ceiling: rank 16) serves that
    adapter at every tier."""
    tiers = rec["tiers"]
    if tier not in tiers and len(tiers) == 1:
        return next(iter(tiers.values()))
    return tiers[tier]


def _loglik(rec: dict[str, Any], tier: str) -> np.ndarray | None:
    values = tier_record(rec, tier).get("loglik")
    if not values or any(x is None for x in values):
        return None
    return np.asarray(values, dtype=np.float64)


def best_baselines(means: Mapping[str, Mapping[str, float]], baselines: Sequence[str]) -> dict[str, str]:
    """Per tier, the baseline with the highest mean accuracy (``means[arm][tier]``); ties: the earlier in
    ``baselines``."""
    tiers = next(iter(means.values())).keys()
    return {t: max(baselines, key=lambda b: (means[b][t], -baselines.index(b))) for t in tiers}


def gap_recovered(arm: float, floor: float, ceiling: float) -> float:
    """g = (A - F) / (C - F): the share of the ceiling's lead over the floor that the arm recovers (nan when
    the ceiling does not lead)."""
    return (arm - floor) / (ceiling - floor) if ceiling != floor else float("nan")


def analyse(
    reported: Mapping[str, Mapping[int, dict[str, Any]]],
    verdict_arm: str,
    *,
    own: Mapping[int, Mapping[str, str] | None] | None = None,
    baselines: Sequence[str] = BASELINES,
    tiers: Sequence[str] = TIERS,
    replicates: int = 10_000,
    bootstrap_seed: int = 12345,
    complete: bool = False,
) -> dict[str, Any]:
    """Stage C's statistics from the reported runs (``reported[arm][seed]``: a run's record) on the seeds
    every arm has finished: per arm and tier the accuracy and log-likelihood (95% CIs) and the mean cost per
    run (passes, wall seconds, wall time relative to FedIT's run of the same seed, the CPUs).
    ``own[seed][tier]``: :func:`own_examples`' split of that seed's examples (None: no own-vs-others endpoint)."""
    arms = [verdict_arm, *baselines, CEILING]
    seeds = sorted(set.intersection(*(set(reported.get(a, {})) for a in arms)))
    out: dict[str, Any] = {"complete": complete, "replicates": replicates, "bootstrap_seed": bootstrap_seed}
    out["seeds_compared"] = seeds
    if not seeds:
        out["verdict"] = None
        out["note"] = "no reported seed has finished every arm yet"
        return out
    for s in seeds:
        if any(reported[a][s]["examples"]["ids"] != reported[verdict_arm][s]["examples"]["ids"] for a in arms):
            raise ValueError(f"seed {s}: the arms evaluated different held-out examples; cannot pair them")
    resamplers = _Resamplers(replicates, bootstrap_seed)

    def acc(arm: str, tier: str) -> list[np.ndarray]:
        return [verdicts(tier_record(reported[arm][s], tier)["correct"]) for s in seeds]

    def means(values: list[np.ndarray]) -> np.ndarray:
        return resamplers.get(tuple(len(v) for v in values)).means(values)

    # per arm and tier: accuracy and answer log-likelihood with 95% CIs
    summary: dict[str, Any] = {}
    floor_walls = [reported[FLOOR][s].get("wall_seconds") for s in seeds]
    for arm in arms:
        entry: dict[str, Any] = {}
        for t in tiers:
            v = acc(arm, t)
            entry[t] = {"accuracy": round(st.pooled_mean(v), 5), "ci95": _ci(means(v))}
            ll = [_loglik(reported[arm][s], t) for s in seeds]
            if all(x is not None for x in ll):
                entry[t]["loglik"] = round(st.pooled_mean(ll), 5)
                entry[t]["loglik_ci95"] = _ci(means(ll))
        runs_of = [reported[arm][s] for s in seeds]
        costs = [r["cost"]["passes"] for r in runs_of if r.get("cost")]
        walls = [r["wall_seconds"] for r in runs_of if r.get("wall_seconds") is not None]
        # wall seconds compare only on one CPU, and the seeds ran over sessions on different machines: the
        # ratio to FedIT's run of the same seed (run beside it, seed by seed) compares; so do the passes
        ratios = [r["wall_seconds"] / f for r, f in zip(runs_of, floor_walls) if r.get("wall_seconds") and f]
        entry["cost"] = {
            "passes": round(float(np.mean(costs)), 1) if costs else None,
            "wall_seconds": round(float(np.mean(walls)), 1) if walls else None,
            "wall_vs_floor": round(float(np.mean(ratios)), 3) if len(ratios) == len(seeds) else None,
            "cpus": sorted({str(r.get("cpu") or "not recorded") for r in runs_of}),
            "rounds": runs_of[0].get("final_round"),
        }
        summary[arm] = entry
    out["arms"] = summary
    best = best_baselines({b: {t: summary[b][t]["accuracy"] for t in tiers} for b in baselines}, baselines)
    out["best_baseline"] = best

    # V* minus every baseline at every tier: 24 comparisons, Holm across the 24 (reported, not the decision)
    comparisons: list[dict[str, Any]] = []
    reps_of: dict[tuple[str, str], np.ndarray] = {}
    for t in tiers:
        for b in baselines:
            diff = st.paired_differences(acc(verdict_arm, t), acc(b, t))
            reps = reps_of[(t, b)] = means(diff)
            comparisons.append(
                {
                    "tier": int(t),
                    "baseline": b,
                    "diff": round(st.pooled_mean(diff), 5),
                    "ci95": _ci(reps),
                    "p": round(st.bootstrap_p(reps), 5),
                    "se": round(float(np.std(reps, ddof=1)) if reps.size > 1 else 0.0, 5),
                    "best": b == best[t],
                }
            )
    h = st.holm([c["p"] for c in comparisons], ALPHA)
    for c, adj, rej in zip(comparisons, h["adjusted"], h["reject"]):
        c.update(p_holm=round(adj, 5), significant=rej)
    out["comparisons"] = comparisons

    # the decision family: V* minus the best baseline per tier, Holm across the 4
    family = [dict(c) for c in comparisons if c["best"]]
    holm_family(family, reps_of)
    out["decision_family"] = family
    out["verdict"] = {
        **st.decide({c["tier"]: tuple(c["ci_holm"]) for c in family}, equivalence=None),
        "partial": not complete,
        "verdict_arm": verdict_arm,
    }
    out["mdd"] = {
        "per_tier": {str(c["tier"]): c["mdd"] for c in family},
        "per_tier_strictest": {str(c["tier"]): c["mdd_strictest"] for c in family},
        "how": f"(z_(1-a/2) + z_{POWER}) x the bootstrap SE of the paired difference, a = {ALPHA} (mdd) and "
        f"a = {ALPHA}/{len(family)} (mdd_strictest)",
    }
    out["secondary"] = secondary(reported, verdict_arm, baselines, tiers, seeds, best, own, means)
    out["recommendation"] = recommend(acc, means, summary, [verdict_arm, *baselines], tiers)
    return out


def recommend(
    acc: Callable[[str, str], list[np.ndarray]],
    means: Callable[[list[np.ndarray]], np.ndarray],
    summary: Mapping[str, Any],
    arms: Sequence[str],
    tiers: Sequence[str],
) -> dict[str, Any]:
    """Per tier, what docs/choosing-a-method.md tells a user to run (the protocol's "What users get": the best
    arm and whether its lead is significant). Of the ``arms`` a heterogeneous federation can run (V* and the
    baselines; the ceiling is not one), the leader has the highest mean accuracy (ties: the earlier arm); its
    paired difference from every other arm gets a 95% bootstrap CI. Its lead is significant when every lower
    bound is above 0 (an intersection-union test, which needs no multiplicity correction); it is then the
    recommendation. Otherwise the arms it is not significantly above are tied with it, and the recommendation
    is the cheapest of the tied and the leader: the lowest wall time relative to FedIT's (ties: fewer passes,
    then the earlier arm), since the evidence cannot tell them apart. Exploratory, not in the decision."""
    arms = list(arms)

    def cost(arm: str) -> tuple[float, float, int]:
        c = summary[arm].get("cost") or {}
        ratio, passes = c.get("wall_vs_floor"), c.get("passes")
        return (ratio if ratio is not None else np.inf, passes if passes is not None else np.inf, arms.index(arm))

    out: dict[str, Any] = {}
    for t in tiers:
        leader = max(arms, key=lambda a: (summary[a][t]["accuracy"], -arms.index(a)))
        against = {}
        for other in arms:
            if other != leader:
                diff = st.paired_differences(acc(leader, t), acc(other, t))
                against[other] = {"diff": round(st.pooled_mean(diff), 5), "ci95": _ci(means(diff))}
        tied = [a for a, c in against.items() if c["ci95"][0] <= 0]
        out[t] = {
            "leader": leader,
            "against": against,
            "significant_lead": not tied,
            "tied": tied,
            "use": leader if not tied else min([leader, *tied], key=cost),
        }
    return out


def secondary(reported, verdict_arm, baselines, tiers, seeds, best, own, means) -> dict[str, Any]:
    """The secondary endpoints, each with a 95% CI: V* minus the best baseline in answer log-likelihood;
    per arm and tier the accuracy on the facts the rank-t clients hold ("own") and on the others'; the gap
    recovered per arm and tier, (A_t - F) / (C - F), its replicates from one set of draws for all three arms."""
    out: dict[str, Any] = {"loglik": {}, "own_vs_others": {}, "gap_recovered": {}}
    for t in tiers:
        a = [_loglik(reported[verdict_arm][s], t) for s in seeds]
        b = [_loglik(reported[best[t]][s], t) for s in seeds]
        if all(x is not None for x in a + b):
            diff = st.paired_differences(a, b)
            out["loglik"][t] = {"baseline": best[t], "diff": round(st.pooled_mean(diff), 5), "ci95": _ci(means(diff))}
    arms = [verdict_arm, *baselines, CEILING]
    if own is not None and all(own.get(s) for s in seeds):
        for arm in arms:
            entry: dict[str, Any] = {}
            for t in tiers:
                for side, flag in (("own", 1), ("others", 0)):
                    v = []
                    for s in seeds:
                        mask = verdicts(own[s][t]) == flag
                        v.append(verdicts(tier_record(reported[arm][s], t)["correct"])[mask])
                    if all(len(x) for x in v):
                        entry.setdefault(t, {})[side] = {"accuracy": round(st.pooled_mean(v), 5), "ci95": _ci(means(v))}
            out["own_vs_others"][arm] = entry
    else:
        out["own_vs_others_note"] = "the examples' holders are unknown for some seed"

    def acc(arm: str, t: str) -> list[np.ndarray]:
        return [verdicts(tier_record(reported[arm][s], t)["correct"]) for s in seeds]

    floor_v, ceiling_v = acc(FLOOR, TIERS[0]), acc(CEILING, TIERS[-1])
    f, c = st.pooled_mean(floor_v), st.pooled_mean(ceiling_v)
    f_reps, c_reps = means(floor_v), means(ceiling_v)
    out["floor_accuracy"], out["ceiling_accuracy"] = round(f, 5), round(c, 5)
    for arm in [verdict_arm, *(b for b in baselines if b != FLOOR)]:
        entry = {}
        for t in tiers:
            v = acc(arm, t)
            with np.errstate(divide="ignore", invalid="ignore"):
                reps = (means(v) - f_reps) / (c_reps - f_reps)
            reps = reps[np.isfinite(reps)]
            entry[t] = {
                "g": round(gap_recovered(st.pooled_mean(v), f, c), 5),
                "ci95": _ci(reps) if reps.size else None,
            }
        out["gap_recovered"][arm] = entry
    return out


# ------------------------------------------------------------------------------------------ the runs


def stage_b_choice(
    payload: dict[str, Any], variant: str | None, variant_lr: float | None
) -> tuple[str, dict, float, str]:
    """``(V*, its settings, its lr, where they came from)``: stage B's choice, or ``variant`` (with its lr
    from ``variant_lr`` or stage B's grid for it) given on the command line."""
    stage = payload.get("stage_b") or {}
    recorded = (stage.get("settings") or {}).get("variants") or {}
    if variant is None:
        choice = stage.get("choice")
        if not choice:
            state = (stage.get("progress") or {}).get("text", "no run yet")
            raise refuse(
                "stage C runs only after stage B has chosen its variant (docs/quality-study-2.md); stage B: "
                f"{state}"
                + (f", {stage['outcome']}" if stage.get("outcome") else "")
                + " (python -m bench.quality_screen)"
            )
        name = choice["variant"]
        return name, recorded.get(name, VARIANTS[name]), float(choice["lr"]), "stage B's choice"
    lr = variant_lr if variant_lr is not None else ((stage.get("variants") or {}).get(variant) or {}).get("lr")
    if lr is None:
        raise refuse(f"stage B has no lr for {variant}; pass --variant-lr")
    return variant, recorded.get(variant, VARIANTS[variant]), float(lr), "--variant"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.quality_confirm", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=ROOT / "examples" / "quality_study.yaml")
    p.add_argument(
        "--step",
        default=None,
        help=f"ladder step to run at ({', '.join(STEPS)}; default: the one whose stage-A gate passed; recorded)",
    )
    p.add_argument(
        "--lrs",
        default=None,
        help="lr_F,lr_C: the floor's and the ceiling's lr (default: their best lr at the step in stage A; recorded)",
    )
    p.add_argument(
        "--variant",
        default=None,
        help=f"the verdict arm ({', '.join(VARIANTS)}; default: stage B's choice; recorded)",
    )
    p.add_argument("--variant-lr", type=float, default=None, help="the verdict arm's lr (default: stage B's for it)")
    p.add_argument(
        "--selection-seeds", default=",".join(map(str, SELECTION_SEEDS)), help="phase 1's seeds (default 3001,3002)"
    )
    p.add_argument("--seeds", default=",".join(map(str, REPORTED_SEEDS)), help="reported seeds (default 4001-4008)")
    p.add_argument("--runs-dir", type=Path, default=ROOT / "results" / "runs" / "quality_confirm")
    p.add_argument("--json", type=Path, default=ROOT / "results" / "quality_study_2.json")
    p.add_argument("--max-runs", type=int, default=None, help="stop after running this many runs (skips don't count)")
    p.add_argument("--replicates", type=int, default=10_000, help="bootstrap replicates (default 10,000)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    args = p.parse_args(argv)
    if args.step is not None and args.step not in STEPS:
        raise refuse(f"--step: unknown ladder step {args.step!r}; known: {', '.join(STEPS)}")
    if args.variant is not None and args.variant not in VARIANTS:
        raise refuse(f"--variant: unknown variant {args.variant!r}; known: {', '.join(VARIANTS)}")
    try:
        args.seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
        args.selection_seeds = [int(x) for x in args.selection_seeds.split(",") if x.strip()]
        args.lrs = None if args.lrs is None else [float(x) for x in args.lrs.split(",") if x.strip()]
    except ValueError:
        raise refuse("--seeds/--selection-seeds/--lrs: not a comma-separated list of numbers") from None
    if not args.seeds or not args.selection_seeds:
        raise refuse("--seeds/--selection-seeds: at least one seed is needed")
    if args.lrs is not None and (len(args.lrs) != 2 or any(lr <= 0 for lr in args.lrs)):
        raise refuse(f"--lrs: two positive learning rates (lr_F,lr_C) are needed, got {args.lrs}")
    if args.variant_lr is not None and args.variant_lr <= 0:
        raise refuse(f"--variant-lr: must be positive, got {args.variant_lr}")
    if args.max_runs is not None and args.max_runs < 0:
        raise refuse(f"--max-runs: must be >= 0, got {args.max_runs}")
    if args.replicates < 1:
        raise refuse(f"--replicates: must be >= 1, got {args.replicates}")
    if not args.config.is_file():
        raise refuse(f"--config: {args.config} does not exist")
    try:
        config_mod.load(args.config, args.overrides)
        args.base = config_mod.parse_yaml(args.config.read_text()) or {}
    except config_mod.ConfigError as e:
        raise refuse(f"--config/--set: {e}") from None
    return args


def main(argv: Sequence[str] | None = None, execute: Callable[[Config, Path], None] = run_inprocess) -> dict[str, Any]:
    args = parse_args(argv)
    results = read_results(args.json)
    step, stage_a_lrs, step_source = stage_a_setting(results, args.step, "stage C")
    if args.lrs is not None:
        (lr_f, lr_c), lr_source = args.lrs, "--lrs"
    elif stage_a_lrs is not None:
        (lr_f, lr_c), lr_source = stage_a_lrs, f"stage A's best lrs at {step}"
    else:
        raise refuse(f"stage A has no best lr of both arms at {step}; pass --lrs")
    variant, variant_settings, variant_lr, variant_source = stage_b_choice(results, args.variant, args.variant_lr)
    grid = lr_grid(lr_f, lr_c)
    arms = arm_settings(variant, variant_settings)
    fixed_lr = {variant: variant_lr, FLOOR: lr_f, CEILING: lr_c}
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    earlier = earlier_runs(args.json, "stage_c")
    # what phase 1 chose stays in the file until this process has chosen again (after its phase-1 runs): a
    # reader, or a commit, in between must not find the selection gone
    chosen = {
        k: v for k, v in (results.get("stage_c") or {}).items() if k in ("selection", "lrs", "run_names", "lr_per_rank")
    }
    stage: dict[str, Any] = {
        "command": "python -m bench.quality_confirm "
        + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)),
        "settings": {
            "config": repo_relative(args.config),
            "step": step,
            "step_source": step_source,
            "step_overrides": step_overrides(step),
            "lr_floor": lr_f,
            "lr_ceiling": lr_c,
            "lr_source": lr_source,
            "selection_grid": grid,
            "verdict_arm": variant,
            "verdict_arm_lr": variant_lr,
            "verdict_arm_source": variant_source,
            "selection_seeds": args.selection_seeds,
            "seeds": args.seeds,
            "overrides": args.overrides,
            "study_settings": STUDY_SETTINGS,
            "arms": arms,
            "lr_scalings": SCALINGS,
            "runs_dir": repo_relative(args.runs_dir),
        },
        "config": args.base,
        "environment": environment(),
        "selection": {},
        **chosen,
        "runs": {},
    }
    payload: dict[str, Any] = {**HEADER, "stage_c": stage}
    settings_of = candidate_settings(arms)
    planned = len(SELECTED) * len(SCALINGS) * len(grid) * len(args.selection_seeds) + len(arms) * len(args.seeds)
    ran, stopped = 0, False
    claimed: list[tuple[str, float, int]] = []

    def count(stage: dict[str, Any]) -> None:
        done = sum(r.get("step") == step for r in stage["runs"].values())
        stage["progress"] = {"done": done, "planned": planned, "text": f"{done} of {planned} runs done"}
        stage["cpu_seconds"] = round(sum(r["wall_seconds"] for r in stage["runs"].values()), 1)

    def save() -> None:
        payload.update(write_stage(args.json, "stage_c", stage, HEADER, count))

    def one(arm: str, lr: float, seed: int, wait: bool = False) -> None:
        nonlocal ran, stopped
        key = f"{step}/{arm}/lr-{lr:g}/seed-{seed}"
        inputs = run_inputs(args.base, settings_of[arm], seed, lr, step, args.overrides)
        may_run = args.max_runs is None or ran < args.max_runs
        fields = {"step": step, "arm": arm, "lr": lr, "seed": seed}
        rec, how = study_run(
            evaluated_once(*inputs),
            args.runs_dir / key,
            fields,
            digest_of(*inputs),
            earlier.get(key),
            execute,
            may_run=may_run,
            wait=wait,
        )
        if rec is None:
            stopped = stopped or how == "not run"
            if how == "claimed":
                claimed.append((arm, lr, seed))
                print(f"{key}: another process is running it; coming back to it later", flush=True)
            return
        ran += how == "ran"
        stage["runs"][key] = rec
        acc = " ".join(f"r{t}={a:.3f}" for t, a in rec["accuracy"].items())
        print(f"[{len(stage['runs'])} of {planned}] {key}: {how} ({rec['wall_seconds']:.0f} s) {acc}", flush=True)
        if how == "ran":
            save()

    def drain() -> None:  # the runs another process was running, waited for once this process has none left
        while claimed:
            one(*claimed.pop(0), wait=True)

    def runs_of(arm: str, lr: float, seeds: Sequence[int]) -> dict[int, dict[str, Any]]:
        return {s: stage["runs"][k] for s in seeds if (k := f"{step}/{arm}/lr-{lr:g}/seed-{s}") in stage["runs"]}

    # phase 1: the selected arms' scaling and lr, seed by seed so that partial results cover every arm
    for seed in args.selection_seeds:
        for scaling in SCALINGS:
            for lr in grid:
                for arm in SELECTED:
                    one(candidate(arm, scaling), lr, seed)
    drain()
    save()  # takes in the runs another process recorded
    lrs, run_name = dict(fixed_lr), {arm: arm for arm in arms}
    for arm in SELECTED:
        scored = {
            scaling: score_grid(
                {lr: runs_of(candidate(arm, scaling), lr, args.selection_seeds) for lr in grid}, args.selection_seeds
            )
            for scaling in SCALINGS
        }
        entry = stage["selection"][arm] = select(scored, grid)
        if entry["lr"] is not None:
            lrs[arm], run_name[arm] = entry["lr"], candidate(arm, entry["scaling"])
    stage["lrs"] = {arm: lrs.get(arm) for arm in arms}
    stage["run_names"] = {arm: run_name[arm] for arm in arms if arm in lrs}
    stage["lr_per_rank"] = {
        arm: lr_per_rank(
            evaluated_once(
                *run_inputs(args.base, settings_of[run_name[arm]], args.seeds[0], lrs[arm], step, args.overrides)
            )
        )
        for arm in arms
        if arm in lrs
    }
    # phase 2: the 8 arms on the reported seeds, each at its lr and scaling (once phase 1 has chosen them)
    if all(arm in lrs for arm in arms):
        for seed in args.seeds:
            for arm in arms:
                one(run_name[arm], lrs[arm], seed)
        drain()
    save()
    reported = {arm: runs_of(run_name[arm], lrs[arm], args.seeds) for arm in arms if arm in lrs}
    complete = stage["progress"]["done"] == planned
    if len(reported) == len(arms):
        own = {s: own_of(args, arms, step, lrs, s, reported[variant][s]) for s in reported[variant]}
        stage["analysis"] = analyse(reported, variant, own=own, replicates=args.replicates, complete=complete)
    verdict = (stage.get("analysis") or {}).get("verdict")
    if verdict is None:
        stage["outcome"] = "stopped at --max-runs" if stopped else "runs missing"
    else:
        stage["outcome"] = ("" if complete else f"PARTIAL ({stage['progress']['text']}): ") + (
            f"{verdict['verdict']}: {verdict['reason']}"
        )
    save()
    print(f"{stage['progress']['text']}; {stage['outcome']}; wrote {args.json}", flush=True)
    return payload


def lr_per_rank(cfg: Config) -> dict[str, float]:
    """The lr each client rank of a run trains at (:func:`prelort.train.rank_lr`): what a user sets per rank."""
    return {str(r): rank_lr(cfg.train, r) for r in sorted(set(cfg.clients.ranks))}


def own_of(args, arms, step, lrs, seed, rec) -> dict[str, str] | None:
    """:func:`own_examples` of one reported seed, from the verdict arm's config there (the heterogeneous
    federation's ranks)."""
    variant = next(iter(arms))
    cfg = evaluated_once(*run_inputs(args.base, arms[variant], seed, lrs[variant], step, args.overrides))
    return own_examples(cfg, rec["examples"]["ids"], cfg.clients.ranks)


if __name__ == "__main__":
    main()
