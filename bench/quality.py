"""Quality benchmark: the six methods on real models, per rank tier, over several seeds.

Every method gets the same federation (8 clients of ranks 2/4/8/16, 4 sampled per round, Dirichlet
non-IID over the builtin suite's task categories), the same training budget (rounds x clients x local
steps x batch, one forward/backward pass per step: PreLort uses ``prelort.nested: sample``) and the same
learning-rate selection procedure:

    for each method, for each lr in the grid: a run of the full round budget (``--select-rounds``
    defaults to the reported runs' rounds: a shorter proxy picked learning rates that were best after
    one round and diverged by the third) on a SEPARATE selection seed (``--select-seed``, never a reported seed), scored by the held-out perplexity of that
    seed's test split, averaged in log space over the rank tiers; the lowest score wins.

The reported seeds' test sets never influence the choice. Reported per model: mean +- sample std over
seeds of exact-match accuracy, ROUGE-L and perplexity per method per rank tier (final round), the
truncation curve (t = 1, 2, 4, ..., R), and the zero-shot base model (evaluated once per seed and shared
by all methods of that seed: it does not depend on the method). Evaluation happens only after the last
round; a model that two evaluation points share (same round, same broadcast tensors: e.g. a tier and the
same t on the truncation curve, or FLoRA whose tiers all get the same merged model) is evaluated once.

    python -m bench.quality                                      # SmolLM2, 6 methods x 3 seeds (~60-90 min, 2 cores)
    python -m bench.quality --quick                              # 1 seed, 2 rounds, tiny eval (smoke)
    python -m bench.quality --models smollm2-135m-instruct,qwen2.5-coder-0.5b-instruct
    python -m bench.quality --methods prelort,fedit --seeds 0,1 --rounds 3 --json out.json
    python -m bench.quality --models qwen2.5-coder-0.5b-instruct --seeds 0 --merge --lr-from smollm2-135m-instruct

``--merge`` adds the models of this invocation to an existing ``--json`` file (each model keeps the command,
seeds and settings it ran with); ``--lr-from MODEL`` skips the selection runs and reuses the learning rate
each method was given for MODEL in that file - a transfer, recorded as such, for a model too slow to tune
on these cores.

Resumable: run directories live under ``--runs-dir`` (default ``results/runs/quality``); a finished one
(``bench-complete.json``) is skipped, an interrupted one is resumed from its last checkpoint.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from prelort import config as config_mod  # noqa: E402
from prelort.adapters import LoraAdapter  # noqa: E402
from prelort.config import Config  # noqa: E402
from prelort.data import tokenize_for_training  # noqa: E402
from prelort.engines.inprocess import InProcessEngine  # noqa: E402
from prelort.evaluate import _pad_id, evaluate_examples, perplexity, select_examples, truncation_tiers  # noqa: E402
from prelort.methods import available  # noqa: E402
from prelort.rank_geometry import adapter_rank  # noqa: E402
from prelort.report import compare_runs, mean_std, read_run  # noqa: E402
from prelort.runner import Session  # noqa: E402

from ._common import environment, repo_relative, write_json

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("prelort", "fedit", "zeropad", "hetlora", "flexlora", "flora")
METRICS = ("accuracy", "rougeL", "perplexity")
COMPLETE = "bench-complete.json"
SELECTION = "selection.json"


@dataclass(frozen=True)
class ModelProfile:
    """Per-model budget: rounds (fewer for slower models) and the cost used in the time estimate."""

    rounds: int
    step_seconds: float  # one optimizer step, batch 8 x ~64 tokens, 2 free CPU cores
    eval_seconds_per_example: float  # generation + perplexity of one held-out example
    load_seconds: float
    note: str = ""


PROFILES: dict[str, ModelProfile] = {
    "smollm2-135m-instruct": ModelProfile(rounds=3, step_seconds=2.0, eval_seconds_per_example=0.25, load_seconds=5),
    "qwen2.5-coder-0.5b-instruct": ModelProfile(
        rounds=2,
        step_seconds=8.0,
        eval_seconds_per_example=1.0,
        load_seconds=10,
        note="~4x slower per step than SmolLM2: 2 rounds instead of 3 (same rounds for every method)",
    ),
    "tiny-llama": ModelProfile(
        rounds=1,
        step_seconds=0.02,
        eval_seconds_per_example=0.005,
        load_seconds=0.5,
        note="random tiny Llama: a plumbing check, its numbers mean nothing",
    ),
}
DEFAULT_PROFILE = ModelProfile(rounds=4, step_seconds=2.0, eval_seconds_per_example=0.25, load_seconds=5)


# --quick: the same pipeline, smaller (a smoke run, never a published figure)
QUICK_OVERRIDES = (
    "clients.num=4",
    "clients.per_round=2",
    "data.num_train=400",
    "data.num_test=64",
    "train.local_steps=2",
    "train.batch_size=4",
    "eval.max_examples=16",
    "eval.max_new_tokens=6",
)


def base_settings(model: str, quick: bool) -> dict[str, Any]:
    """The config shared by every method and seed (method, seed, rounds and lr are filled in per run)."""
    settings = {
        "engine": "inprocess",
        "audit": False,
        "model": {"name": model},
        "lora": {"alpha": 32},
        "clients": {"num": 8, "per_round": 4, "ranks": [2, 4, 8, 16]},
        "prelort": {"nested": "sample"},
        "data": {
            "source": "builtin",
            "num_train": 2000,
            "num_test": 200,
            "max_length": 96,
            "partition": {"kind": "dirichlet", "by": "category", "alpha": 0.5, "min_partition_size": 4},
        },
        "train": {"local_steps": 4, "batch_size": 8, "schedule": "constant"},
        # answers are a word or a number: 8 new tokens cover them and keep greedy generation cheap
        "eval": {
            "max_examples": 64,
            "batch_size": 16,
            "max_new_tokens": 8,
            "truncation_curve": True,
            "mode": "generate",
        },  # this benchmark's published numbers include ROUGE-L
    }
    for assignment in QUICK_OVERRIDES if quick else ():
        config_mod.apply_override(settings, assignment)
    return settings


def make_config(
    settings: dict[str, Any], method: str, seed: int, rounds: int, lr: float, *, base_eval: bool, overrides: list[str]
) -> Config:
    data = json.loads(json.dumps(settings))
    data.update(method=method, seed=seed, rounds=rounds)
    data["train"]["lr"] = lr
    data["eval"] = dict(data["eval"], every=rounds, base=base_eval)
    return config_mod.from_dict(data, overrides)


# ------------------------------------------------------------------------------------------ evaluation


def broadcast_digest(broadcast: Any) -> str:
    """SHA-1 of the function a tier's model computes: its LoRA dimensions with a non-zero B column, and any
    dense base delta.

    A dimension i with B[:, i] = 0 adds exact zeros to the rank-R sum the masked adapter computes, so
    dropping it changes no output bit: FLoRA's fresh LoRA (B = 0) at every tier, or dimensions no client
    has trained yet, hash like their absence.
    """
    h = hashlib.sha1()
    adapter = broadcast.adapter
    for name in sorted(k for k in adapter if k.endswith(".lora_A")):
        module = name[: -len(".lora_A")]
        a = adapter[name].detach().to("cpu", torch.float32)
        b = adapter[module + ".lora_B"].detach().to("cpu", torch.float32)
        used = b.abs().sum(dim=0) != 0
        h.update(module.encode())
        h.update(a[used].contiguous().numpy().tobytes())
        h.update(b[:, used].contiguous().numpy().tobytes())
    for name in sorted(broadcast.base_delta or {}):
        h.update(name.encode())
        h.update(broadcast.base_delta[name].detach().to("cpu").contiguous().numpy().tobytes())
    return h.hexdigest()


class BenchSession(Session):
    """A Session that evaluates each distinct model of a round once.

    Greedy generation and perplexity are deterministic in the weights, so two evaluation points with the
    same round and the same broadcast tensors (digest) have the same metrics.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        self.eval_cache: dict[tuple[int, str], dict[str, Any]] = {}
        self.evaluations = 0
        self.cache_hits = 0
        super().__init__(*args, **kwargs)

    def evaluate_tier_examples(self, t: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        fed = self.federation
        broadcast = fed.method.tier(fed.state, t)
        cache_key = (fed.round, broadcast_digest(broadcast))
        if cache_key in self.eval_cache:
            self.cache_hits += 1
            metrics, examples = self.eval_cache[cache_key]
            return dict(metrics), [dict(ex) for ex in examples]
        LoraAdapter(self.model).apply_broadcast(broadcast, adapter_rank(broadcast.adapter))
        metrics, examples = evaluate_examples(
            self.model, self.tokenizer, self.test_records, self.cfg.eval, self.cfg.data.max_length
        )
        self.evaluations += 1
        self.eval_cache[cache_key] = (dict(metrics), [dict(ex) for ex in examples])
        return metrics, examples


def distinct_evaluations(method: str, ranks: list[int]) -> int:
    """How many distinct models one run evaluates at the end (tiers and truncation curve share)."""
    points = set(ranks) | set(truncation_tiers(max(ranks)))
    if method == "flora":
        return 1  # every tier receives the same merged model
    if method == "fedit":
        return len({min(t, min(ranks)) for t in points})  # the global adapter has rank r_min
    return len(points)


# ------------------------------------------------------------------------------------------ runs


def _config_matches(run_dir: Path, cfg: Config) -> bool:
    from prelort.rundir import RunDir

    # who evaluates the shared base model may change on resume
    return RunDir(run_dir).config_matches(cfg, ignore=("eval.base",))


def run_federation(cfg: Config, run_dir: Path) -> dict[str, Any]:
    """Run (or resume, or skip when complete) one federation; returns its completion record."""
    marker = run_dir / COMPLETE
    if marker.is_file():
        if not _config_matches(run_dir, cfg):
            raise SystemExit(
                f"{run_dir} holds a finished run with a different config; delete it or pass another --runs-dir"
            )
        return {**json.loads(marker.read_text()), "run_dir": repo_relative(run_dir)}
    from prelort.rundir import RunDir

    resume = RunDir(run_dir).checkpoint_dir(0).is_dir() and _config_matches(run_dir, cfg)
    if run_dir.exists() and not resume:
        shutil.rmtree(run_dir)  # an interrupted run that cannot be resumed: start over
    t0 = time.perf_counter()
    session = BenchSession(cfg, run_dir, resume=resume, verbose=False)
    session.run(InProcessEngine(session, progress=False))
    record = {
        "run_dir": repo_relative(run_dir),
        "method": cfg.method,
        "seed": cfg.seed,
        "lr": cfg.train.lr,
        "rounds": cfg.rounds,
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "resumed": resume,
        "evaluations": session.evaluations,
        "evaluations_shared": session.cache_hits,
    }
    write_json(marker, record)
    return record


def selection_score(cfg: Config, run_dir: Path) -> dict[str, Any]:
    """Short run on the selection seed; score = mean over tiers of log(held-out perplexity)."""
    marker = run_dir / SELECTION
    if marker.is_file():
        return json.loads(marker.read_text())
    if run_dir.exists():
        shutil.rmtree(run_dir)
    t0 = time.perf_counter()
    session = Session(cfg, run_dir, verbose=False)
    engine = InProcessEngine(session, progress=False)
    fed = session.federation
    fed.start()
    for round_ in range(1, cfg.rounds + 1):
        fed.end_round(round_, engine.execute(fed.begin_round(round_)))
    chosen = select_examples(session.test_records, cfg.eval.max_examples)
    examples = tokenize_for_training(chosen, session.tokenizer, cfg.data.max_length)
    pad = _pad_id(session.tokenizer)
    per_tier = {}
    for t in fed.tiers():
        broadcast = fed.method.tier(fed.state, t)
        LoraAdapter(session.model).apply_broadcast(broadcast, adapter_rank(broadcast.adapter))
        per_tier[str(t)] = perplexity(session.model, examples, cfg.eval.batch_size, pad)
    score = sum(math.log(p) for p in per_tier.values()) / len(per_tier)
    result = {
        "lr": cfg.train.lr,
        "perplexity_per_tier": per_tier,
        "score_mean_log_ppl": score,
        "n": len(examples),
        "wall_seconds": round(time.perf_counter() - t0, 1),
    }
    write_json(marker, result)
    return result


# ------------------------------------------------------------------------------------------ summary


def _clean(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


def stats(values: list[float]) -> dict[str, Any]:
    mean, std = mean_std(values)
    return {"mean": _clean(mean), "std": _clean(std), "values": [_clean(v) for v in values]}


def summarise_method(run_dirs: list[Path]) -> dict[str, Any]:
    """Final-round tiers and the truncation curve of one method over its seeds."""
    tiers: dict[int, dict[str, list[float]]] = {}
    curve: dict[int, dict[str, list[float]]] = {}
    for d in run_dirs:
        run = read_run(d)
        for rec in run.final_tiers():
            for m in METRICS:
                tiers.setdefault(int(rec.rank), {k: [] for k in METRICS})[m].append(rec.metric(m))
        for rec in run.truncation()[0]:
            for m in METRICS:
                curve.setdefault(int(rec.rank), {k: [] for k in METRICS})[m].append(rec.metric(m))
    return {
        "tiers": {str(t): {m: stats(v[m]) for m in METRICS} for t, v in sorted(tiers.items())},
        "curve": {str(t): {m: stats(v[m]) for m in METRICS} for t, v in sorted(curve.items())},
    }


def summarise_base(run_dirs: list[Path]) -> dict[str, Any]:
    per_seed: dict[int, dict[str, float]] = {}
    for d in run_dirs:
        base = read_run(d).base
        if base is not None and base.seed not in per_seed:
            per_seed[int(base.seed)] = {m: base.metric(m) for m in METRICS} | {"n": base.n}
    seeds = sorted(per_seed)
    return {
        "per_seed": {str(s): per_seed[s] for s in seeds},
        **{m: stats([per_seed[s][m] for s in seeds]) for m in METRICS},
    }


# ------------------------------------------------------------------------------------------ main


def parse_list(text: str, flag: str, cast: type) -> list:
    try:
        values = [cast(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise SystemExit(f"{flag}: expected a comma-separated list of {cast.__name__}, got {text!r}") from None
    if not values:
        raise SystemExit(f"{flag}: empty list")
    return values


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--models",
        default="smollm2-135m-instruct",
        help="comma list of model aliases/paths (smollm2-135m-instruct, qwen2.5-coder-0.5b-instruct, tiny-llama)",
    )
    p.add_argument("--methods", default=",".join(METHODS), help="comma list (default: all six)")
    p.add_argument("--seeds", default=None, help="comma list of seeds (default 0,1,2; --quick: 0)")
    p.add_argument("--rounds", type=int, default=None, help="rounds for every model (default: per model, see PROFILES)")
    p.add_argument("--lrs", default=None, help="learning-rate grid (default 3e-3,1e-2; --quick: 1e-3,3e-3)")
    p.add_argument("--select-seed", type=int, default=1000, help="seed of the lr-selection runs (not a reported seed)")
    p.add_argument(
        "--select-rounds",
        type=int,
        default=None,
        help="rounds of each lr-selection run (default: the reported runs' rounds)",
    )
    p.add_argument(
        "--merge",
        action="store_true",
        help="keep the other models already recorded in the --json file (add or replace these)",
    )
    p.add_argument(
        "--lr-from",
        default=None,
        metavar="MODEL",
        help="no lr selection: reuse each method's lr chosen for MODEL in the --json file",
    )
    p.add_argument("--quick", action="store_true", help="1 seed, 2 rounds, 4 clients x 2 steps, 16 eval examples")
    p.add_argument("--runs-dir", type=Path, default=None, help="run directories (default results/runs/quality[-quick])")
    p.add_argument("--json", type=Path, default=None, help="summary JSON (default results/quality[-quick].json)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override applied to every run (recorded in the JSON)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: torch's choice; 1 avoids thrashing on cores shared with other jobs)",
    )
    p.add_argument("--estimate-only", action="store_true", help="print the time estimate and exit")
    args = p.parse_args(argv)
    args.models = parse_list(args.models, "--models", str)
    args.methods = parse_list(args.methods, "--methods", str)
    unknown = [m for m in args.methods if m not in available()]
    if unknown:
        raise SystemExit(f"--methods: unknown method(s) {', '.join(unknown)}; known: {', '.join(sorted(available()))}")
    args.seeds = parse_list(args.seeds or ("0" if args.quick else "0,1,2"), "--seeds", int)
    args.lrs = parse_list(args.lrs or ("1e-3,3e-3" if args.quick else "3e-3,1e-2"), "--lrs", float)
    if any(lr <= 0 for lr in args.lrs):
        raise SystemExit(f"--lrs: learning rates must be positive, got {args.lrs}")
    if args.threads is not None and args.threads < 1:
        raise SystemExit(f"--threads: must be >= 1, got {args.threads}")
    if args.rounds is not None and args.rounds < 1:
        raise SystemExit(f"--rounds: must be >= 1, got {args.rounds}")
    if args.select_rounds is not None and args.select_rounds < 1:
        raise SystemExit(f"--select-rounds: must be >= 1, got {args.select_rounds}")
    if args.select_seed in args.seeds:
        raise SystemExit(
            f"--select-seed {args.select_seed} is also a reported seed; lr selection must not see "
            "the reported seeds' test sets"
        )
    suffix = "-quick" if args.quick else ""
    args.runs_dir = args.runs_dir or ROOT / "results" / "runs" / f"quality{suffix}"
    args.json = args.json or ROOT / "results" / f"quality{suffix}.json"
    args.previous = None
    if args.merge or args.lr_from:
        try:
            args.previous = json.loads(args.json.read_text())
        except (OSError, ValueError) as e:
            raise SystemExit(f"--merge/--lr-from need a readable {args.json}: {e}") from None
    if args.lr_from:
        chosen = (args.previous.get("models", {}).get(args.lr_from) or {}).get("methods", {})
        missing = [m for m in args.methods if (chosen.get(m) or {}).get("lr") is None]
        if missing:
            raise SystemExit(f"--lr-from {args.lr_from}: {args.json} records no lr for {', '.join(missing)}")
        args.transferred_lrs = {m: float(chosen[m]["lr"]) for m in args.methods}
    return args


def rounds_for(model: str, args: argparse.Namespace) -> int:
    if args.rounds is not None:
        return args.rounds
    return 2 if args.quick else PROFILES.get(model, DEFAULT_PROFILE).rounds


def select_rounds_for(model: str, args: argparse.Namespace) -> int:
    return args.select_rounds if args.select_rounds is not None else rounds_for(model, args)


def estimate_seconds(model: str, args: argparse.Namespace) -> dict[str, float]:
    """Wall-time estimate on 2 free CPU cores from the per-model profile (measured on this machine)."""
    prof = PROFILES.get(model, DEFAULT_PROFILE)
    s = base_settings(model, args.quick)
    steps_per_round = s["clients"]["per_round"] * s["train"]["local_steps"]
    batch_factor = s["train"]["batch_size"] / 8
    ranks = s["clients"]["ranks"]
    n_eval = s["eval"]["max_examples"]
    select = (
        0.0
        if args.lr_from
        else len(args.methods)
        * len(args.lrs)
        * (
            prof.load_seconds
            + select_rounds_for(model, args) * steps_per_round * prof.step_seconds * batch_factor
            + len(set(ranks)) * n_eval * prof.eval_seconds_per_example * 0.3
        )
    )  # perplexity only
    train = (
        len(args.methods)
        * len(args.seeds)
        * (prof.load_seconds + rounds_for(model, args) * steps_per_round * prof.step_seconds * batch_factor)
    )
    evals = (
        len(args.seeds)
        * (1 + sum(distinct_evaluations(m, ranks) for m in args.methods))
        * n_eval
        * prof.eval_seconds_per_example
    )
    return {"lr_selection": select, "training": train, "evaluation": evals, "total": select + train + evals}


def run_model(model: str, args: argparse.Namespace, summary_dir: Path) -> dict[str, Any]:
    t_model = time.perf_counter()
    settings = base_settings(model, args.quick)
    rounds = rounds_for(model, args)
    model_dir = args.runs_dir / model.replace("/", "_")
    # -- learning rate, one procedure for every method
    selection: dict[str, Any] = {}
    for method in args.methods if args.lr_from else ():
        selection[method] = {
            "chosen_lr": args.transferred_lrs[method],
            "at_grid_edge": False,
            "transferred_from": args.lr_from,
            "grid": [],
        }
    for method in () if args.lr_from else args.methods:
        scores = []
        for lr in args.lrs:
            select_rounds = select_rounds_for(model, args)
            cfg = make_config(
                settings, method, args.select_seed, select_rounds, lr, base_eval=False, overrides=args.overrides
            )
            res = selection_score(cfg, model_dir / "lr-select" / method / f"lr-{lr:g}-rounds-{select_rounds}")
            scores.append(res)
            print(
                f"  [{model}] lr-select {method:<8} lr={lr:<8g} mean log-ppl {res['score_mean_log_ppl']:.4f} "
                f"({res['wall_seconds']:.0f} s)",
                flush=True,
            )
        best = min(scores, key=lambda r: r["score_mean_log_ppl"])
        # a choice at the end of the grid may mean the best lr lies beyond it: flagged, not hidden
        edge = len(args.lrs) > 1 and best["lr"] in (min(args.lrs), max(args.lrs))
        if edge:
            print(f"  [{model}] note: {method}'s chosen lr {best['lr']:g} is at the edge of the grid", flush=True)
        selection[method] = {"chosen_lr": best["lr"], "at_grid_edge": edge, "grid": scores}
    # -- the reported runs; the first run of a seed evaluates the shared zero-shot base model
    runs: dict[str, list[Path]] = {m: [] for m in args.methods}
    records = []
    for seed in args.seeds:
        for method in args.methods:
            run_dir = model_dir / method / f"seed-{seed}"
            base_owner = method == args.methods[0]
            cfg = make_config(
                settings,
                method,
                seed,
                rounds,
                selection[method]["chosen_lr"],
                base_eval=base_owner,
                overrides=args.overrides,
            )
            rec = run_federation(cfg, run_dir)
            records.append(rec)
            runs[method].append(run_dir)
            final = {r.rank: r for r in read_run(run_dir).final_tiers()}
            top = final.get(max(final)) if final else None
            print(
                f"  [{model}] {method:<8} seed {seed} lr={cfg.train.lr:g}: {rec['wall_seconds']:.0f} s"
                + (
                    f", rank {top.rank}: acc {top.accuracy:.3f} rougeL {top.rougeL:.3f} ppl {top.perplexity:.2f}"
                    if top
                    else ""
                ),
                flush=True,
            )
    all_dirs = [d for m in args.methods for d in runs[m]]
    out_dir = summary_dir / model.replace("/", "_")
    table = compare_runs(all_dirs, out_dir)
    resolved = make_config(
        settings,
        args.methods[0],
        args.seeds[0],
        rounds,
        selection[args.methods[0]]["chosen_lr"],
        base_eval=True,
        overrides=args.overrides,
    ).to_dict()
    resolved.update(method="<per run>", seed="<per run>")
    resolved["train"]["lr"] = "<selected per method>"
    return {
        "seeds": args.seeds,
        "rounds": rounds,
        "select_rounds": None if args.lr_from else select_rounds_for(model, args),
        "lr_transferred_from": args.lr_from,
        "rounds_note": PROFILES.get(model, DEFAULT_PROFILE).note,
        "config": resolved,
        "lr_selection": selection,
        "base": summarise_base(all_dirs),
        "methods": {m: {"lr": selection[m]["chosen_lr"], **summarise_method(runs[m])} for m in args.methods},
        "runs": records,
        "comparison_markdown": table,
        "comparison_dir": repo_relative(out_dir),
        "plots": sorted(repo_relative(p) for p in (out_dir / "plots").glob("*.png")),
        "wall_seconds": round(time.perf_counter() - t_model, 1),
        # the time the runs took when they ran (a resumed benchmark's wall_seconds leaves out skipped runs)
        "compute_seconds": round(
            sum(g["wall_seconds"] for sel in selection.values() for g in sel["grid"])
            + sum(r["wall_seconds"] for r in records),
            1,
        ),
    }


PROTOCOL = {
    "budget": "every method: the same federation (clients, ranks, sampling, data split), rounds, local steps, "
    "batch size and schedule; one forward/backward pass per local step (PreLort: nested=sample)",
    "lr_selection": "per method, the lr in the grid with the lowest mean over rank tiers of log held-out "
    "perplexity after a run of select_rounds rounds (default: the full budget) on the "
    "selection seed; the reported seeds "
    "are never used for selection",
    "evaluation": "after the last round only: every rank tier (final round) and the truncation curve "
    "t = 1, 2, 4, ..., R on a fixed subset of the held-out split; identical models are "
    "evaluated once",
    "base": "the zero-shot base model, evaluated once per seed (in that seed's first method run) and shared",
    "statistics": "mean and sample standard deviation (ddof=1) over seeds; std is null with one seed",
}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    command = "python -m bench.quality " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    print(
        f"Quality benchmark: models {args.models}; methods {args.methods}; seeds {args.seeds}; "
        f"lr grid {args.lrs} (selection seed {args.select_seed}, "
        f"{args.select_rounds or 'the full budget of'} round(s))"
    )
    estimates = {}
    for model in args.models:
        est = estimates[model] = estimate_seconds(model, args)
        print(
            f"  estimate for {model} ({rounds_for(model, args)} rounds) on 2 free CPU cores: "
            f"{est['total'] / 60:.0f} min (lr selection {est['lr_selection'] / 60:.0f}, training "
            f"{est['training'] / 60:.0f}, evaluation {est['evaluation'] / 60:.0f}); finished runs are skipped",
            flush=True,
        )
    if args.estimate_only:
        return {"estimates": estimates}
    payload: dict[str, Any] = {
        "benchmark": "quality",
        "command": command,
        "quick": args.quick,
        "settings": {
            "models": args.models,
            "methods": args.methods,
            "seeds": args.seeds,
            "lr_grid": args.lrs,
            "select_seed": args.select_seed,
            "select_rounds": args.select_rounds,
            "overrides": args.overrides,
            "runs_dir": repo_relative(args.runs_dir),
            "threads": torch.get_num_threads(),
        },
        "protocol": PROTOCOL,
        "environment": environment(),
        "estimate_seconds": estimates,
        "models": {},
    }
    summary_dir = args.json.with_suffix("")
    if args.merge:
        # the file's own command/settings describe its first models; each merged model carries its own
        payload = {**args.previous, "models": dict(args.previous.get("models", {}))}
    for model in args.models:
        payload["models"][model] = run_model(model, args, summary_dir)
        if args.merge:
            payload["models"][model].update(
                command=command,
                environment=environment(),
                settings={"lr_grid": None if args.lr_from else args.lrs, "overrides": args.overrides},
            )
        print(f"\n{model}:\n{payload['models'][model]['comparison_markdown']}\n", flush=True)
    if not args.merge:
        payload["wall_seconds"] = round(time.perf_counter() - started, 1)
    print(f"wall time {(time.perf_counter() - started) / 60:.1f} min; wrote {write_json(args.json, payload)}")
    return payload


if __name__ == "__main__":
    main()
