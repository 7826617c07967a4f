"""Quality study 2, stage B (docs/quality-study-2.md): repair PreLort's local training, screened on selection seeds.

Runs only once stage A's gate (bench/quality_gate.py) has passed at a ladder step S*, at S*'s setting on the
study's base config (``--config``, default examples/quality_study.yaml: 8 clients of ranks 2/4/8/16, one of
each rank per round). Four PreLort variants (``VARIANTS``: the unrepaired ``sample`` and three one-change
repairs) each run at the lrs {lr_F, lr_C} (the floor's and the ceiling's best lr at S*; if equal,
{lr_C / 2, lr_C}) on the selection seeds 3001 and 3002, every tier evaluated once after the last round. A
variant's score at an lr: the mean over the seeds of its mean accuracy over the tiers (ties: the mean answer
log-likelihood); eligible iff every tier's accuracy, averaged over the seeds, is at least the constant-guess
floor averaged over the same seeds. Each variant takes its best eligible lr (none eligible: the higher score,
flagged); the choice is the eligible variant with the highest score there (none eligible: the highest score,
said so).

One run directory per run under ``--runs-dir`` (``STEP/VARIANT/lr-X/seed-S``), never redone once finished; the
``stage_b`` key of ``--json`` (results/quality_study_2.json, beside stage A) is rewritten after every run with
the per-example records, the scores, the eligibility and the choice; on a fresh clone a run recorded there
with the same inputs is not redone. Two processes of the same command share the runs (each claims a run
before running it, skips the runs the other has claimed and waits for them at the end), so two cores give
two runs at a time at ``--threads 1``:

    python -m bench.quality_screen --threads 1 &  python -m bench.quality_screen --threads 1
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from prelort import config as config_mod
from prelort.config import Config

from ._common import environment, repo_relative, write_stage
from .quality_gate import (
    HEADER,
    STEPS,
    config_inputs,
    constant_guess,
    digest_of,
    earlier_runs,
    evaluated_once,
    score_grid,
    step_overrides,
    study_run,
)
from .quality_gate import STUDY_SETTINGS as GATE_SETTINGS
from .quality_study import accuracy, run_inprocess

ROOT = Path(__file__).resolve().parents[1]
# variant -> its settings, set in the config data (docs/quality-study-2.md, stage B's table); all prelort
VARIANTS: dict[str, dict[str, dict[str, Any]]] = {
    "V0-sample": {"prelort": {"nested": "sample"}},
    "V1-dim-warmup": {"prelort": {"nested": "sample"}, "train": {"dim_warmup_steps": 3}},
    "V2-cycle": {"prelort": {"nested": "cycle"}},
    "V3-sqrt-lr": {
        "prelort": {"nested": "sample"},
        "train": {"lr_rank_scaling": "sqrt", "lr_reference_rank": 16},
    },
}
REFERENCE = "V0-sample"  # the unrepaired PreLort: if it wins, no repair helped
SELECTION_SEEDS = (3001, 3002)
# stage A's settings with PreLort for FedIT: every tier evaluated once, after the last round only
STUDY_SETTINGS = ["method=prelort", *(s for s in GATE_SETTINGS if not s.startswith("method="))]


def refuse(message: str) -> SystemExit:
    """A one-line refusal with exit status 2 (raise the result)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    return SystemExit(2)


def run_inputs(
    base: dict[str, Any], variant: str, seed: int, lr: float, step: str, overrides: Sequence[str]
) -> tuple[dict[str, Any], list[str]]:
    """A stage-B run's config inputs (:func:`quality_gate.config_inputs`)."""
    return config_inputs(base, VARIANTS[variant], seed, lr, [*STUDY_SETTINGS, *step_overrides(step), *overrides])


def make_config(
    base: dict[str, Any], variant: str, seed: int, lr: float, step: str, overrides: Sequence[str]
) -> Config:
    return evaluated_once(*run_inputs(base, variant, seed, lr, step, overrides))


def inputs_digest(base: dict[str, Any], variant: str, seed: int, lr: float, step: str, overrides: Sequence[str]) -> str:
    return digest_of(*run_inputs(base, variant, seed, lr, step, overrides))


def stage_a_setting(
    payload: dict[str, Any], step: str | None, stage_name: str = "stage B"
) -> tuple[str, list[float] | None, str]:
    """``(S*, [lr_F, lr_C] or None, where they came from)`` from stage A's results: the step whose gate passed
    (or ``step``, given on the command line) and the floor's and ceiling's best lr there (None where that step
    has none). ``stage_name``: the stage that refuses to run while no gate has passed."""
    stage = payload.get("stage_a") or {}
    steps = stage.get("steps") or {}
    source = "--step"
    if step is None:
        passed = [s for s, e in steps.items() if (e.get("gate") or {}).get("passed")]
        if not passed:
            decided = {s: "passed" if e["gate"]["passed"] else "failed" for s, e in steps.items() if e.get("gate")}
            state = (stage.get("progress") or {}).get("text", "no run yet")
            gates = ", ".join(f"{s} {v}" for s, v in decided.items()) or "no gate decided"
            raise refuse(
                f"{stage_name} runs only after stage A's gate has passed (docs/quality-study-2.md); stage A: "
                f"{state}, {gates}"
                + (f", {stage['outcome']}" if stage.get("outcome") else "")
                + " (python -m bench.quality_gate)"
            )
        step, source = passed[0], "stage A's gate"
    arms = (steps.get(step) or {}).get("arms") or {}
    lrs = [arms.get(arm, {}).get("best_lr") for arm in ("floor", "ceiling")]
    return step, None if None in lrs else [float(x) for x in lrs], source


def lr_grid(lr_floor: float, lr_ceiling: float) -> list[float]:
    """{lr_F, lr_C}, or {lr_C / 2, lr_C} if they are equal."""
    return [lr_ceiling / 2, lr_ceiling] if lr_floor == lr_ceiling else sorted({lr_floor, lr_ceiling})


def score_variant(
    points: dict[float, dict[int, dict[str, Any]]], seeds: Sequence[int], guess: float
) -> list[dict[str, Any]]:
    """Per lr with every seed done: the score (:func:`quality_gate.score_grid`), each tier's accuracy and answer
    log-likelihood per seed and mean over the seeds, the steps per rank dimension per seed, and eligibility
    (every tier's mean accuracy >= ``guess``, the constant guess averaged over the same seeds)."""
    out = []
    for entry in score_grid(points, seeds):
        runs = [points[entry["lr"]][s] for s in seeds]
        tiers: dict[str, Any] = {}
        for t in runs[0]["tiers"]:
            accs = [accuracy(r["tiers"][t]["correct"]) for r in runs]
            lls = [[x for x in r["tiers"][t].get("loglik", []) if x is not None] for r in runs]
            tiers[t] = {
                "accuracy": round(sum(accs) / len(accs), 6),
                "accuracy_per_seed": {str(s): round(a, 6) for s, a in zip(seeds, accs)},
                "loglik_per_seed": {str(s): round(sum(x) / len(x), 5) if x else None for s, x in zip(seeds, lls)},
            }
        below = [t for t, v in tiers.items() if v["accuracy"] < guess]
        out.append(
            {
                **entry,
                "tiers": tiers,
                "eligible": not below,
                "tiers_below_constant_guess": below,
                "dim_steps": {str(s): r.get("dim_steps") for s, r in zip(seeds, runs)},
            }
        )
    return out


def _rank(g: dict[str, Any]) -> tuple[float, float]:
    # scores are rounded to 1e-9 (score_grid): equal ones fall to the log-likelihood
    return (g["mean_accuracy"], g["mean_loglik"])


def best_lr(grid: list[dict[str, Any]]) -> dict[str, Any]:
    """The variant's grid entry at its lr: the eligible lr with the highest score (ties: the log-likelihood);
    if no lr is eligible, the highest score."""
    eligible = [g for g in grid if g["eligible"]]
    return max(eligible or grid, key=_rank)


def choose(variants: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Stage B's choice from each variant's entry at its lr (every variant scored)."""
    at_lr = {name: v["best"] for name, v in variants.items()}
    eligible = {name: g for name, g in at_lr.items() if g["eligible"]}
    pool = eligible or at_lr
    name = max(pool, key=lambda n: _rank(pool[n]))
    g = pool[name]
    if not eligible:
        text = (
            f"no PreLort variant kept every tier above the constant-guess floor; the highest score is {name} "
            f"at lr {g['lr']:g} ({g['mean_accuracy']:.3f})"
        )
    elif name == REFERENCE:
        text = (
            f"{name} (unrepaired) has the highest score at lr {g['lr']:g} ({g['mean_accuracy']:.3f}): no repair "
            "helped, and stage C tests PreLort as published"
        )
    else:
        text = f"{name} has the highest score of the eligible variants at lr {g['lr']:g} ({g['mean_accuracy']:.3f})"
    return {
        "variant": name,
        "lr": g["lr"],
        "score": g["mean_accuracy"],
        "eligible": bool(eligible),
        "eligible_variants": sorted(eligible),
        "text": text,
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.quality_screen", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=ROOT / "examples" / "quality_study.yaml")
    p.add_argument(
        "--step",
        default=None,
        help=f"ladder step to run at ({', '.join(STEPS)}; default: the one whose stage-A gate passed; recorded)",
    )
    p.add_argument(
        "--lrs",
        default=None,
        help="learning rates, comma-separated (default: the floor's and ceiling's best lr at the step; recorded)",
    )
    p.add_argument("--seeds", default=",".join(map(str, SELECTION_SEEDS)), help="selection seeds (default 3001,3002)")
    p.add_argument("--runs-dir", type=Path, default=ROOT / "results" / "runs" / "quality_screen")
    p.add_argument("--json", type=Path, default=ROOT / "results" / "quality_study_2.json")
    p.add_argument("--max-runs", type=int, default=None, help="stop after running this many runs (skips don't count)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    args = p.parse_args(argv)
    if args.step is not None and args.step not in STEPS:
        raise refuse(f"--step: unknown ladder step {args.step!r}; known: {', '.join(STEPS)}")
    try:
        args.seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
        args.lrs = None if args.lrs is None else [float(x) for x in args.lrs.split(",") if x.strip()]
    except ValueError:
        raise refuse("--seeds/--lrs: not a comma-separated list of numbers") from None
    if not args.seeds:
        raise refuse("--seeds: at least one seed is needed")
    if args.lrs is not None and (not args.lrs or any(lr <= 0 for lr in args.lrs)):
        raise refuse(f"--lrs: positive learning rates are needed, got {args.lrs}")
    if args.max_runs is not None and args.max_runs < 0:
        raise refuse(f"--max-runs: must be >= 0, got {args.max_runs}")
    if not args.config.is_file():
        raise refuse(f"--config: {args.config} does not exist")
    try:
        config_mod.load(args.config, args.overrides)
        args.base = config_mod.parse_yaml(args.config.read_text()) or {}
    except config_mod.ConfigError as e:
        raise refuse(f"--config/--set: {e}") from None
    return args


def read_results(path: Path) -> dict[str, Any]:
    """Study 2's results JSON (empty before any run); a broken file is a one-line refusal."""
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError as e:
        raise refuse(f"{path}: not readable JSON ({e})") from None


def main(argv: Sequence[str] | None = None, execute: Callable[[Config, Path], None] = run_inprocess) -> dict[str, Any]:
    args = parse_args(argv)
    step, stage_a_lrs, step_source = stage_a_setting(read_results(args.json), args.step)
    if args.lrs is not None:
        lrs, lr_source = sorted(set(args.lrs)), "--lrs"
    elif stage_a_lrs is not None:
        lr_f, lr_c = stage_a_lrs
        lrs, lr_source = lr_grid(lr_f, lr_c), f"stage A's best lrs at {step}: floor {lr_f:g}, ceiling {lr_c:g}"
    else:
        raise refuse(f"stage A has no best lr of both arms at {step}; pass --lrs")
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    earlier = earlier_runs(args.json, "stage_b")
    stage: dict[str, Any] = {
        "command": "python -m bench.quality_screen "
        + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)),
        "settings": {
            "config": repo_relative(args.config),
            "step": step,
            "step_source": step_source,
            "step_overrides": step_overrides(step),
            "lrs": lrs,
            "lr_source": lr_source,
            "seeds": args.seeds,
            "overrides": args.overrides,
            "study_settings": STUDY_SETTINGS,
            "variants": VARIANTS,
            "runs_dir": repo_relative(args.runs_dir),
        },
        "config": args.base,
        "environment": environment(),
        "constant_guess": {},
        "variants": {},
        "runs": {},
    }
    payload: dict[str, Any] = {**HEADER, "stage_b": stage}
    planned = len(VARIANTS) * len(lrs) * len(args.seeds)
    ran, stopped = 0, False
    claimed: list[tuple[str, float, int]] = []
    points: dict[str, dict[float, dict[int, dict[str, Any]]]] = {v: {} for v in VARIANTS}

    def count(stage: dict[str, Any]) -> None:
        done = len(stage["runs"])
        stage["progress"] = {"done": done, "planned": planned, "text": f"{done} of {planned} runs done"}
        stage["cpu_seconds"] = round(sum(r["wall_seconds"] for r in stage["runs"].values()), 1)

    def save() -> None:
        payload.update(write_stage(args.json, "stage_b", stage, HEADER, count))

    def one(variant: str, lr: float, seed: int, wait: bool = False) -> None:
        nonlocal ran, stopped
        key = f"{step}/{variant}/lr-{lr:g}/seed-{seed}"
        cfg = make_config(args.base, variant, seed, lr, step, args.overrides)
        digest = inputs_digest(args.base, variant, seed, lr, step, args.overrides)
        may_run = args.max_runs is None or ran < args.max_runs
        fields = {"step": step, "variant": variant, "lr": lr, "seed": seed}
        rec, how = study_run(
            cfg, args.runs_dir / key, fields, digest, earlier.get(key), execute, may_run=may_run, wait=wait
        )
        if rec is None:
            stopped = stopped or how == "not run"
            if how == "claimed":
                claimed.append((variant, lr, seed))
                print(f"{key}: another process is running it; coming back to it later", flush=True)
            return
        ran += how == "ran"
        stage["runs"][key] = rec
        points[variant].setdefault(lr, {})[seed] = rec
        if str(seed) not in stage["constant_guess"]:
            stage["constant_guess"][str(seed)] = round(constant_guess(cfg), 6)
        acc = " ".join(f"r{t}={a:.3f}" for t, a in rec["accuracy"].items())
        print(f"[{len(stage['runs'])} of {planned}] {key}: {how} ({rec['wall_seconds']:.0f} s) {acc}", flush=True)
        if how == "ran":
            save()

    # seed by seed, so that partial results cover every variant
    for seed in args.seeds:
        for lr in lrs:
            for variant in VARIANTS:
                one(variant, lr, seed)
    while claimed:  # the runs another process was running, waited for once this process has none left
        one(*claimed.pop(0), wait=True)
    complete = True
    for variant in VARIANTS:
        entry = stage["variants"][variant] = {"grid": [], "lr": None}
        if all(s in stage["constant_guess"] for s in map(str, args.seeds)):
            guess = sum(stage["constant_guess"][str(s)] for s in args.seeds) / len(args.seeds)
            entry["grid"] = score_variant(points[variant], args.seeds, guess)
        if len(entry["grid"]) < len(lrs):
            complete = False
            continue
        best = best_lr(entry["grid"])
        entry.update(lr=best["lr"], eligible=best["eligible"], best=best)
    if complete:
        stage["choice"] = choose(stage["variants"])
        stage["outcome"] = f"chosen: {stage['choice']['text']}"
    else:
        stage["outcome"] = "stopped at --max-runs" if stopped else "runs missing"
    save()
    print(f"{stage['progress']['text']}; {stage['outcome']}; wrote {args.json}", flush=True)
    return payload


if __name__ == "__main__":
    main()
