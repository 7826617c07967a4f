"""Quality study 2, stage A (docs/quality-study-2.md): the federated gate, with the learning rate found per rank.

Two arms on the study's base config (``--config``, default examples/quality_study.yaml), both FedIT with every
client at one rank and the same scale s = alpha / R = 1: ``ceiling`` (rank 16) and ``floor`` (rank 2). Each runs
on every pilot seed at every lr of its grid; an arm's best lr is the one with the highest mean accuracy over
the pilot seeds (ties: higher mean answer log-likelihood), and a best lr at the grid's edge extends the grid by
one 2x step, at most twice. The gate passes iff, at the best lrs, the ceiling beats the floor by >= 0.10 on
average and on every seed, and the ceiling is >= 0.15 above the constant-guess floor. If it fails, the setting
moves one step down the pre-declared ladder (``LADDER``) and the gate runs again, until a gate passes, the ladder
ends, or the step ``--until`` names is done.

One run directory per run under ``--runs-dir`` (``STEP/ARM/lr-X/seed-S``), never redone once finished, restarted
if killed; ``--json`` (results/quality_study_2.json) is rewritten after every run with the per-example records,
the grids, the gates and "k of M runs done"; on a fresh clone (no run directories) a run recorded there with the
same config is not redone.

    python -m bench.quality_gate                          # stage A as the protocol says (resumable)
    python -m bench.quality_gate --max-runs 6             # at most 6 runs this session
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import sys
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from prelort import config as config_mod
from prelort.config import Config

from ._common import environment, repo_relative, write_stage
from .quality_study import accuracy, collect_run, ensure_run, run_cpu, run_inprocess, selection_score

ROOT = Path(__file__).resolve().parents[1]
# arm -> its settings; both FedIT, both at s = alpha / R = 1 (docs/quality-study-2.md, stage A)
ARMS: dict[str, dict[str, Any]] = {
    "ceiling": {"clients": {"ranks": [16]}, "lora": {"alpha": 16}},
    "floor": {"clients": {"ranks": [2]}, "lora": {"alpha": 2}},
}
# the ladder, cumulative: each step's overrides include the previous steps'
LADDER: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("L0", ()),
    ("L1", ("train.warmup_steps=2",)),
    ("L2", ("rounds=20",)),
    ("L3", ("data.partition.classes_per_client=2",)),
)
STEPS = [name for name, _ in LADDER]
PILOT_SEEDS = (2001, 2002, 2003)
BASE_GRID = (1.25e-3, 2.5e-3, 5e-3, 1e-2)
MAX_EXTENSIONS = 2
GATE_MIN_GAP = 0.10  # mean ceiling - floor
GATE_ABOVE_GUESS = 0.15  # ceiling - constant guess
HEADER = {"benchmark": "quality_study_2", "protocol": "docs/quality-study-2.md"}  # the results JSON's top level
STUDY_SETTINGS = ["method=fedit", "clients.sampling=stratified", "eval.base=false", "eval.truncation_curve=false"]
DONE_FILE = "study-run.json"


def _commit() -> str | None:
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


COMMIT = _commit()  # recorded per run: the code a run was made with


def step_overrides(step: str) -> list[str]:
    """The ladder's overrides up to and including ``step``."""
    out: list[str] = []
    for name, sets in LADDER:
        out += sets
        if name == step:
            return out
    raise ValueError(f"unknown ladder step {step!r}; known: {', '.join(STEPS)}")


def config_inputs(
    base: dict[str, Any], settings: Mapping[str, Any], seed: int, lr: float, sets: Sequence[str]
) -> tuple[dict[str, Any], list[str]]:
    """What one run's config is made of (every stage of study 2): the config file's data with an arm's
    ``settings`` (a section's dict merged into it, a plain value such as ``method`` set), ``seed`` and ``lr``,
    and the overrides ``sets`` (the stage's settings, the ladder step's, the command line's)."""
    data = json.loads(json.dumps(base))
    for section, values in settings.items():
        if isinstance(values, dict):
            data.setdefault(section, {}).update(values)
        else:
            data[section] = values
    data["seed"] = seed
    data.setdefault("train", {})["lr"] = lr
    return data, list(sets)


def run_inputs(
    base: dict[str, Any], arm: str, seed: int, lr: float, step: str, overrides: Sequence[str]
) -> tuple[dict[str, Any], list[str]]:
    """A stage-A run's config inputs (:func:`config_inputs`)."""
    return config_inputs(base, ARMS[arm], seed, lr, [*STUDY_SETTINGS, *step_overrides(step), *overrides])


def evaluated_once(data: dict[str, Any], sets: Sequence[str]) -> Config:
    """The config of ``data`` with the overrides ``sets``, evaluated once, after the last round."""
    rounds = config_mod.from_dict(data, sets).rounds
    return config_mod.from_dict(data, [*sets, f"eval.every={rounds}"])


def digest_of(data: dict[str, Any], sets: Sequence[str]) -> str:
    """A run's identity for resuming from the JSON: a digest of what its config is made of, not of the resolved
    config, so a later prelort that adds a config field with a default does not disown finished runs."""
    return hashlib.sha256(json.dumps([data, sets], sort_keys=True).encode()).hexdigest()[:16]


def make_config(base: dict[str, Any], arm: str, seed: int, lr: float, step: str, overrides: Sequence[str]) -> Config:
    """One run's config (``base``: the config file's data): evaluated once, after the last round, at the
    arm's only tier."""
    return evaluated_once(*run_inputs(base, arm, seed, lr, step, overrides))


def inputs_digest(base: dict[str, Any], arm: str, seed: int, lr: float, step: str, overrides: Sequence[str]) -> str:
    """:func:`digest_of` the run's inputs."""
    return digest_of(*run_inputs(base, arm, seed, lr, step, overrides))


def constant_guess(cfg: Config) -> float:
    """Accuracy of always answering each attribute's most common held-out value (the task's constant-guess
    floor: a model that learned no fact but the answer distribution scores this)."""
    from prelort.data.facts import build_facts_suite

    _, test = build_facts_suite(cfg.seed, cfg.data.facts)
    by_attribute: dict[str, Counter[str]] = {}
    for row in test:
        by_attribute.setdefault(row["category"], Counter())[row["output"]] += 1
    return sum(c.most_common(1)[0][1] for c in by_attribute.values()) / len(test)


# run.log lines of a defence acting on an update (issue 26): an honest federation should show none
DEFENCE_MARKS = ("robust.clip_to_median", "robust.max_examples_ratio", "change_too_large")


def defence_actions(run_dir: Path) -> int:
    """How many times the update defences acted in a run (clipped, capped or refused an update): the
    protocol expects 0 in these honest federations, and the results flag a run where it is not."""
    from prelort.rundir import RunDir

    log = RunDir(run_dir).log_file
    if not log.is_file():
        return 0
    return sum(any(m in line for m in DEFENCE_MARKS) for line in log.read_text(errors="replace").splitlines())


class FailedClients(SystemExit):
    """A study run in which client updates failed: a bug to fix, never a result to score (exits with its
    one-line message)."""


def client_failures(run_dir: Path) -> list[str]:
    """The client updates that failed in a run (``"round R client C: reason"``, from its metrics.jsonl). These
    honest, in-process federations expect none: a failure is a bug (study 2's screen once scored a variant
    whose clients below rank 16 all failed), so a study never scores such a run."""
    from prelort.rundir import RunDir

    path = RunDir(run_dir).metrics_file
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        clients = row.get("clients") if isinstance(row, dict) else None
        for c in clients if isinstance(clients, list) else []:
            if isinstance(c, dict) and c.get("status") == "failed":
                out.append(f"round {row.get('round')} client {c.get('client')}: {c.get('reason')}")
    return out


def study_run(
    cfg: Config,
    run_dir: Path,
    fields: dict[str, Any],
    digest: str,
    earlier: dict[str, Any] | None,
    execute: Callable[[Config, Path], None],
    *,
    may_run: bool,
    wait: bool,
) -> tuple[dict[str, Any] | None, str]:
    """One run of a study-2 stage and its record: ``(record, how)``, ``how`` one of ``recorded`` (taken from the
    JSON's ``earlier`` record: its directory is gone, its inputs ``digest`` the same), ``finished`` (its
    directory), ``ran``, or with record None ``not run`` (unfinished and not ``may_run``: --max-runs reached)
    or ``claimed`` (another live process is running it and not ``wait``). The record: ``fields`` (what the
    run is), its digest, commit, wall time, :func:`collect_run`'s per-example records, accuracy per tier and
    ``defence_actions``, and the CPU it ran on (``cpu``, when its done marker says)."""
    if not run_dir.exists() and earlier is not None and earlier.get("inputs_digest") == digest:
        return earlier, "recorded"
    if not (run_dir / DONE_FILE).is_file() and not may_run:
        return None, "not run"
    outcome = ensure_run(cfg, run_dir, execute, wait=wait)
    if outcome is None:
        return None, "claimed"
    did_run, wall = outcome
    failed = client_failures(run_dir)
    if failed:
        raise FailedClients(
            f"{run_dir}: {len(failed)} client update(s) failed (first: {failed[0]}); the run is not scored: fix "
            "the cause, delete the run directory and run again"
        )
    rec = {**fields, "inputs_digest": digest, "commit": COMMIT, "wall_seconds": wall, **collect_run(run_dir)}
    cpu = run_cpu(run_dir)
    if cpu is not None:
        rec["cpu"] = cpu
    rec["accuracy"] = {t: round(accuracy(v["correct"]), 6) for t, v in rec["tiers"].items()}
    rec["defence_actions"] = defence_actions(run_dir)
    return rec, "ran" if did_run else "finished"


def earlier_runs(path: Path, stage_key: str) -> dict[str, dict[str, Any]]:
    """The runs ``stage_key`` of the results JSON ``path`` records (none if there is no file or no such stage)."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        if stage_key not in data and data.get("benchmark") == "quality_study_2":
            return {}
        return dict(data[stage_key]["runs"])
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise SystemExit(
            f"{path}: not a results JSON of study 2 ({type(e).__name__}: {e}); move it away or pass another --json"
        ) from None


def lr_grid(step: str, arm: str, steps: dict[str, Any]) -> list[float]:
    """The arm's starting grid at ``step``: the base grid at L0, else 4 points 2x apart whose second is the
    previous step's best lr of the arm."""
    i = STEPS.index(step)
    if i == 0:
        return list(BASE_GRID)
    prev = steps.get(STEPS[i - 1], {}).get("arms", {}).get(arm, {}).get("best_lr")
    if prev is None:
        raise SystemExit(f"step {step}: step {STEPS[i - 1]} has no best lr for {arm} yet; run it first")
    return [prev / 2, prev, prev * 2, prev * 4]


def score_grid(points: dict[float, dict[int, dict[str, Any]]], seeds: Sequence[int]) -> list[dict[str, Any]]:
    """Per lr with every seed done: the mean accuracy and answer log-likelihood over the seeds."""
    out = []
    for lr in sorted(points):
        if not all(s in points[lr] for s in seeds):
            continue
        scores = [selection_score(points[lr][s]) for s in seeds]
        out.append(
            {
                "lr": lr,
                "mean_accuracy": round(sum(a for a, _ in scores) / len(scores), 9),
                "mean_loglik": round(sum(ll for _, ll in scores) / len(scores), 5),
                "accuracy": {str(s): a for s, (a, _) in zip(seeds, scores)},
            }
        )
    return out


def gate(ceiling: dict[str, Any], floor: dict[str, Any], guess: float, seeds: Sequence[int]) -> dict[str, Any]:
    """The gate at the two arms' best lrs (their grid entries)."""
    diffs = [ceiling["accuracy"][str(s)] - floor["accuracy"][str(s)] for s in seeds]
    mean_gap = sum(diffs) / len(diffs)
    checks = {
        "mean_gap_at_least_0.10": mean_gap >= GATE_MIN_GAP,
        "positive_on_every_seed": all(d > 0 for d in diffs),
        "ceiling_0.15_above_constant_guess": ceiling["mean_accuracy"] >= guess + GATE_ABOVE_GUESS,
    }
    return {
        "passed": all(checks.values()),
        "checks": checks,
        "ceiling_accuracy": ceiling["mean_accuracy"],
        "floor_accuracy": floor["mean_accuracy"],
        "mean_gap": round(mean_gap, 6),
        "gap_per_seed": {str(s): round(d, 6) for s, d in zip(seeds, diffs)},
        "constant_guess": round(guess, 6),
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.quality_gate", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=ROOT / "examples" / "quality_study.yaml")
    p.add_argument(
        "--until", default=STEPS[-1], help=f"last ladder step to run ({', '.join(STEPS)}; default: the whole ladder)"
    )
    p.add_argument("--seeds", default=",".join(map(str, PILOT_SEEDS)), help="pilot seeds (default 2001,2002,2003)")
    p.add_argument("--runs-dir", type=Path, default=ROOT / "results" / "runs" / "quality_gate")
    p.add_argument("--json", type=Path, default=ROOT / "results" / "quality_study_2.json")
    p.add_argument("--max-runs", type=int, default=None, help="stop after running this many runs (skips don't count)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    args = p.parse_args(argv)
    if args.until not in STEPS:
        raise SystemExit(f"--until: unknown ladder step {args.until!r}; known: {', '.join(STEPS)}")
    try:
        args.seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--seeds: not a comma-separated list of integers: {args.seeds!r}") from None
    if not args.seeds:
        raise SystemExit("--seeds: at least one seed is needed")
    if args.max_runs is not None and args.max_runs < 0:
        raise SystemExit(f"--max-runs: must be >= 0, got {args.max_runs}")
    if not args.config.is_file():
        raise SystemExit(f"--config: {args.config} does not exist")
    try:
        config_mod.load(args.config, args.overrides)  # the file and the overrides are valid
        args.base = config_mod.parse_yaml(args.config.read_text()) or {}
    except config_mod.ConfigError as e:
        raise SystemExit(f"--config/--set: {e}") from None
    return args


def main(argv: Sequence[str] | None = None, execute: Callable[[Config, Path], None] = run_inprocess) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    earlier = earlier_runs(args.json, "stage_a")
    stage: dict[str, Any] = {
        "command": "python -m bench.quality_gate "
        + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)),
        "settings": {
            "config": repo_relative(args.config),
            "seeds": args.seeds,
            "overrides": args.overrides,
            "study_settings": STUDY_SETTINGS,
            "ladder": {name: list(sets) for name, sets in LADDER},
            "base_grid": list(BASE_GRID),
            "max_extensions": MAX_EXTENSIONS,
            "runs_dir": repo_relative(args.runs_dir),
        },
        "config": args.base,
        "environment": environment(),
        "constant_guess": {},
        "steps": {},
        "runs": {},
    }
    payload = {**HEADER, "stage_a": stage}
    ran, stopped = 0, False
    claimed: list[tuple[str, float, int]] = []  # (arm, lr, seed) of the current step another process is running

    def count(stage: dict[str, Any]) -> None:
        done = len(stage["runs"])
        planned = sum(len(a["grid_lrs"]) * len(args.seeds) for s in stage["steps"].values() for a in s["arms"].values())
        stage["progress"] = {"done": done, "planned": planned, "text": f"{done} of {planned} planned runs done"}
        stage["cpu_seconds"] = round(sum(r["wall_seconds"] for r in stage["runs"].values()), 1)

    def save() -> None:
        payload.update(write_stage(args.json, "stage_a", stage, HEADER, count))

    def one(step: str, arm: str, lr: float, seed: int, wait: bool = False) -> dict[str, Any] | None:
        """The run's record; None if stopped at --max-runs or (not ``wait``) another process is running it."""
        nonlocal ran, stopped
        key = f"{step}/{arm}/lr-{lr:g}/seed-{seed}"
        cfg = make_config(args.base, arm, seed, lr, step, args.overrides)
        digest = inputs_digest(args.base, arm, seed, lr, step, args.overrides)
        may_run = args.max_runs is None or ran < args.max_runs
        fields = {"step": step, "arm": arm, "lr": lr, "seed": seed}
        rec, how = study_run(
            cfg, args.runs_dir / key, fields, digest, earlier.get(key), execute, may_run=may_run, wait=wait
        )
        if rec is None:
            stopped = stopped or how == "not run"
            if how == "claimed":
                claimed.append((arm, lr, seed))
                print(f"{key}: another process is running it; coming back to it later", flush=True)
            return None
        did_run = how == "ran"
        ran += did_run
        stage["runs"][key] = rec
        if str(seed) not in stage["constant_guess"]:
            stage["constant_guess"][str(seed)] = round(constant_guess(cfg), 6)
        acc = " ".join(f"r{t}={a:.3f}" for t, a in rec["accuracy"].items())
        print(
            f"[{len(stage['runs'])} runs] {key}: {'ran' if did_run else 'finished earlier'} "
            f"({rec['wall_seconds']:.0f} s) {acc}",
            flush=True,
        )
        if did_run:
            save()
        return rec

    def run_step(step: str) -> dict[str, Any] | None:
        """Run a step's grids (seed by seed, so partial results cover both arms) and its gate; None if stopped."""
        entry = stage["steps"].setdefault(step, {"overrides": step_overrides(step), "arms": {}})
        for arm in ARMS:
            entry["arms"].setdefault(arm, {"grid_lrs": lr_grid(step, arm, stage["steps"]), "extensions": 0})
        save()  # the step's plan on disk from its start, so the planned count and tables never drop a step
        points: dict[str, dict[float, dict[int, dict[str, Any]]]] = {arm: {} for arm in ARMS}
        while True:
            grids = {arm: entry["arms"][arm]["grid_lrs"] for arm in ARMS}
            # the arms interleaved, lr by lr, so that a partial step has runs of both
            order = [
                (arm, g[i]) for i in range(max(map(len, grids.values()))) for arm, g in grids.items() if i < len(g)
            ]
            for seed in args.seeds:
                for arm, lr in order:
                    rec = one(step, arm, lr, seed)
                    if rec is not None:
                        points[arm].setdefault(lr, {})[seed] = rec
            # the runs another process was running: waited for once this process has none left to run
            while claimed:
                arm, lr, seed = claimed.pop(0)
                rec = one(step, arm, lr, seed, wait=True)
                if rec is not None:
                    points[arm].setdefault(lr, {})[seed] = rec
            extended = False
            for arm, a in entry["arms"].items():
                a["grid"] = score_grid(points[arm], args.seeds)
                if len(a["grid"]) < len(a["grid_lrs"]):
                    continue  # stopped part-way
                best = max(a["grid"], key=lambda g: (g["mean_accuracy"], g["mean_loglik"]))
                lrs = a["grid_lrs"]
                at_low, at_high = best["lr"] == min(lrs), best["lr"] == max(lrs)
                if (at_low or at_high) and a["extensions"] < MAX_EXTENSIONS:
                    a["grid_lrs"] = sorted([*lrs, min(lrs) / 2 if at_low else max(lrs) * 2])
                    a["extensions"] += 1
                    a.pop("best_lr", None)
                    extended = True
                else:
                    a.update(best_lr=best["lr"], best=best, at_grid_edge=at_low or at_high)
            if stopped or not extended:
                break
        save()
        if not all("best_lr" in a for a in entry["arms"].values()):
            return None
        guess = sum(stage["constant_guess"][str(s)] for s in args.seeds) / len(args.seeds)
        entry["gate"] = gate(entry["arms"]["ceiling"]["best"], entry["arms"]["floor"]["best"], guess, args.seeds)
        save()
        return entry["gate"]

    outcome = "stopped at --max-runs"
    for step in STEPS[: STEPS.index(args.until) + 1]:
        result = run_step(step)
        if result is None:
            break
        verdict = "PASSED" if result["passed"] else "failed"
        print(
            f"gate {step}: {verdict} (ceiling {result['ceiling_accuracy']:.3f}, floor {result['floor_accuracy']:.3f}, "
            f"gap {result['mean_gap']:+.3f}, constant guess {result['constant_guess']:.3f})",
            flush=True,
        )
        outcome = f"gate {step} {verdict}"
        if result["passed"]:
            break
    else:
        if args.until == STEPS[-1]:
            outcome += "; the ladder ended without a pass (docs/quality-study-2.md: the study stops)"
    stage["outcome"] = outcome
    save()
    print(f"{stage['progress']['text']}; {outcome}; wrote {args.json}", flush=True)
    return payload


if __name__ == "__main__":
    main()
