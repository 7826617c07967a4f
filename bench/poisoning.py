"""Poisoning: one hostile client of 8 against every method, with and without the defences (issue 26).

The demo-sized federation (8 clients of ranks 2/4/8/16, all sampled every round; the tiny model by default,
SmolLM2-135M with ``--full``) runs once honestly and once per attack, in which client 7 (rank 16: it shares the
top segment, dimensions 8-15, with client 3 only) alters its reply in flight every round, as a client could:

* ``spike``: the whole root-mean-square budget of ``validation.max_update_rms`` (0.99 x 10 x sqrt(entries / 2))
  put into one entry of the first lora_A and one of the first lora_B (the issue's 592.7 on the tiny model);
* ``sign_flip``: its genuine factors sign-flipped and scaled to a root-mean-square entry of 9.9;
* ``max_weight``: its genuine factors sign-flipped, claiming num_examples = 10**9;
* ``under_bound``: the adaptive attack on the defaults: its change sign-flipped and scaled to 3.9 x its own norm
  (under the 4 x median clip when its norm is typical), every entry within 0.99 x validation.max_change_entry,
  claiming 3.9 x its own examples (under the 4 x median cap).

Arms: ``off`` (the bounds before issue 26: only validation.max_update_rms), ``defaults`` (max_change_entry,
clip_to_median, max_examples_ratio as shipped) and ``median`` (the defaults plus ``robust.aggregator: median``;
methods with a sum rule). Reported per run: the global model's relative distance from the honest run of its arm,
||dW - dW_honest||_F / ||dW_honest||_F over every module at the full rank (dW = s B A, or the dense delta), the
hostile client's rejections, clips and caps from run.log, and the perplexity per tier after the last round.

    python -m bench.poisoning                       # tiny model: 6 methods x (honest + 4 attacks) x arms
    python -m bench.poisoning --full                # SmolLM2-135M at the demo's settings (hours on 2 CPU cores)
    python -m bench.poisoning --methods prelort --attacks spike --arms off,defaults --json /tmp/p.json

Resumable: a run directory with ``bench-complete.json`` under --runs-dir is reused.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import load_file
from safetensors.torch import save as st_save

from prelort import config as config_mod
from prelort import methods as methods_registry
from prelort.engines.inprocess import InProcessEngine
from prelort.protocol import ClientTask, RawUpdate
from prelort.rundir import RunDir
from prelort.runner import Session

from ._common import environment, write_json
from .make_tables import poisoning_table

COMPLETE = "bench-complete.json"
HOSTILE_CLIENT = 7
ATTACKS = ("spike", "sign_flip", "max_weight", "under_bound")
ARMS: dict[str, dict[str, Any]] = {
    "off": {
        "validation": {"max_change_entry": None},
        "robust": {"clip_to_median": None, "max_examples_ratio": None},
    },
    "defaults": {},
    "median": {"robust": {"aggregator": "median"}},
}


# -- the attacks: (payload, metadata, what the client received) -> (payload, metadata) -----------------------------
Attack = Callable[[dict[str, torch.Tensor], dict[str, Any], dict[str, torch.Tensor]], tuple[dict, dict]]


def _rms_scaled(tensors: dict[str, torch.Tensor], rms: float, sign: float) -> dict[str, torch.Tensor]:
    norm = math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors.values()))
    size = sum(t.numel() for t in tensors.values())
    return {k: (v * (sign * rms * math.sqrt(size) / norm)).contiguous() for k, v in tensors.items()}


def spike(tensors, meta, received):
    size = sum(t.numel() for t in tensors.values())
    value = 0.99 * 10.0 * math.sqrt(size / 2)
    out = {k: v.clone() for k, v in tensors.items()}
    for kind in ("lora_A", "lora_B"):
        out[min(n for n in out if n.endswith(kind))][0, 0] = value
    return out, meta


def sign_flip(tensors, meta, received):
    return _rms_scaled(tensors, 9.9, -1.0), meta


def max_weight(tensors, meta, received):
    return {k: (-v).contiguous() for k, v in tensors.items()}, dict(meta, num_examples=10**9)


def under_bound(tensors, meta, received):
    entry = 0.99 * config_mod.ValidationConfig().max_change_entry
    out = {}
    for k, v in tensors.items():
        ref = received[k].narrow(0 if k.endswith("lora_A") else 1, 0, v.shape[0 if k.endswith("lora_A") else 1])
        out[k] = (ref + (-3.9 * (v - ref)).clamp(-entry, entry)).contiguous()
    return out, dict(meta, num_examples=max(1, int(3.9 * meta["num_examples"])))


ATTACK_FUNCTIONS: dict[str, Attack] = {
    "spike": spike,
    "sign_flip": sign_flip,
    "max_weight": max_weight,
    "under_bound": under_bound,
}


class HostileEngine:
    """The in-process engine with client HOSTILE_CLIENT's wire-format reply altered by ``attack`` every round."""

    def __init__(self, inner: InProcessEngine, attack: Attack | None):
        self.inner, self.attack = inner, attack

    def execute(self, tasks: Sequence[ClientTask]) -> list:
        out = []
        for task, res in zip(tasks, self.inner.execute(tasks)):
            if self.attack is not None and task.client == HOSTILE_CLIENT and isinstance(res, RawUpdate):
                tensors, meta = self.attack(st_load(res.payload), json.loads(res.meta), task.broadcast.adapter)
                res = RawUpdate(task.client, st_save(tensors), json.dumps(meta))
            out.append(res)
        return out


# -- the federation ------------------------------------------------------------------------------------------------
def settings(args: argparse.Namespace) -> dict[str, Any]:
    full = args.full
    return {
        "engine": "inprocess",
        "seed": args.seed,
        "rounds": args.rounds or (4 if full else 2),
        "model": {"name": "smollm2-135m-instruct" if full else "tiny-llama"},
        "lora": {"alpha": 32 if full else 16},
        "clients": {"num": 8, "per_round": 8, "ranks": [2, 4, 8, 16]},
        "prelort": {"nested": "sample"},
        "data": {
            "source": "builtin",
            "num_train": 2000 if full else 128,
            "num_test": 200 if full else 32,
            "max_length": 96 if full else 48,
            "partition": {"kind": "dirichlet", "by": "category", "alpha": 0.5},
        },
        "train": {"local_steps": 4 if full else 1, "batch_size": 8 if full else 4, "lr": 1e-3, "schedule": "constant"},
        "eval": {
            "every": 100,
            "max_examples": 48 if full else 8,
            "batch_size": 16,
            "max_new_tokens": 12 if full else 4,
            "truncation_curve": False,
            "base": False,
        },
    }


def config_for(args: argparse.Namespace, method: str, arm: str) -> config_mod.Config:
    data = settings(args)
    data["method"] = method
    for section, values in ARMS[arm].items():
        data[section] = dict(values)
    return config_mod.from_dict(data)


def full_rank_deltas(state: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """dW per module: s B A of a LoRA state (at its full rank R), or the dense ``<module>.delta``."""
    out = {}
    for name, t in state.items():
        module, _, kind = name.rpartition(".")
        if kind == "delta":
            out[module] = t.double()
        elif kind == "lora_A":
            out[module] = scale * state[f"{module}.lora_B"].double() @ t.double()
    return out


def relative_distance(x: dict[str, torch.Tensor], honest: dict[str, torch.Tensor]) -> float:
    num = sum(float((x[k] - honest[k]).pow(2).sum()) for k in honest)
    den = sum(float(honest[k].pow(2).sum()) for k in honest)
    return math.sqrt(num / den) if den > 0 else float("inf")


def run_one(cfg: config_mod.Config, run_dir: Path, attack: str | None) -> dict[str, Any]:
    marker = run_dir / COMPLETE
    if marker.exists():
        return json.loads(marker.read_text())
    if run_dir.exists():
        shutil.rmtree(run_dir)
    t0 = time.perf_counter()
    session = Session(cfg, run_dir, verbose=False)
    session.run(HostileEngine(InProcessEngine(session, progress=False), ATTACK_FUNCTIONS.get(attack or "")))
    records = RunDir(run_dir).metrics.records()
    last = max(r["round"] for r in records)
    log = RunDir(run_dir).log_file.read_text()
    who = str(HOSTILE_CLIENT) if attack else r"\d+"  # honest runs: any client
    out = {
        "tiers": {
            str(r["rank"]): {"perplexity": r["perplexity"], "accuracy": r["accuracy"]}
            for r in records
            if r.get("kind") == "tier" and r["round"] == last
        },
        "rejected": len(re.findall(rf"rejected update from client {who}:", log)),
        "clipped": len(re.findall(rf"clipped client {who}'s change", log)),
        "capped": len(re.findall(rf"capped client {who}'s num_examples", log)),
        "rounds": last,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    write_json(marker, out)
    return out


def final_deltas(run_dir: Path, rounds: int, scale: float) -> dict[str, torch.Tensor]:
    """:func:`full_rank_deltas` of the run's last checkpoint."""
    return full_rank_deltas(load_file(str(run_dir / f"checkpoints/round-{rounds}/adapter.safetensors")), scale)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--full", action="store_true", help="SmolLM2-135M at the demo's settings (default: tiny model)")
    p.add_argument("--methods", default=",".join(methods_registry.available()))
    p.add_argument("--attacks", default=",".join(ATTACKS))
    p.add_argument("--arms", default="off,defaults,median", help="median: methods with a sum rule only")
    p.add_argument("--median-methods", default="prelort", help="methods run in the median arm")
    p.add_argument("--rounds", type=int, default=None, help="default: 2 (tiny), 4 (--full)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs-dir", default="/tmp/prelort-bench/poisoning")
    p.add_argument("--json", default=None, help="default: results/poisoning.json (results/poisoning-full.json)")
    args = p.parse_args(argv)
    args.method_list = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.attack_list = [a.strip() for a in args.attacks.split(",") if a.strip()]
    args.arm_list = [a.strip() for a in args.arms.split(",") if a.strip()]
    args.median_list = [m.strip() for m in args.median_methods.split(",") if m.strip()]
    for name, given, known in (("attack", args.attack_list, ATTACKS), ("arm", args.arm_list, ARMS)):
        unknown = sorted(set(given) - set(known))
        if unknown:
            p.error(f"unknown {name}(s) {unknown}; known: {', '.join(known)}")
    args.json = args.json or ("results/poisoning-full.json" if args.full else "results/poisoning.json")
    return args


def honest_arm(arm: str) -> str:
    """The arm whose honest run is ``arm``'s reference: the defaults never clip or cap an honest client (the
    honest row says so), so ``off`` shares the honest run of ``defaults``."""
    return "defaults" if arm == "off" else arm


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runs = Path(args.runs_dir) / ("smollm2" if args.full else "tiny")
    t0 = time.perf_counter()
    tiers = [str(t) for t in sorted(set(settings(args)["clients"]["ranks"]))]
    results = {
        "command": "python -m bench.poisoning "
        + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "settings": settings(args),
        "hostile_client": HOSTILE_CLIENT,
        "arms": ARMS,
        "environment": environment(),
        "rows": [],
    }
    rows: list[dict[str, Any]] = results["rows"]
    for method in args.method_list:
        cls = methods_registry.get(method)
        arms = [a for a in args.arm_list if a != "median" or (cls.sum_aggregatable and method in args.median_list)]
        references: dict[str, dict[str, torch.Tensor]] = {}
        for arm in arms:
            cfg = config_for(args, method, arm)
            scale = cfg.lora.alpha / max(cfg.clients.ranks)
            base = honest_arm(arm)
            if base not in references:
                honest = run_one(config_for(args, method, base), runs / f"{method}-{base}-none", None)
                references[base] = final_deltas(runs / f"{method}-{base}-none", honest["rounds"], scale)
                rows.append({"method": method, "attack": "none", "arm": base, "distance": 0.0, **honest})
            for attack in args.attack_list:
                res = run_one(cfg, runs / f"{method}-{arm}-{attack}", attack)
                attacked = final_deltas(runs / f"{method}-{arm}-{attack}", res["rounds"], scale)
                rows.append(
                    {
                        "method": method,
                        "attack": attack,
                        "arm": arm,
                        **res,
                        "distance": relative_distance(attacked, references[base]),
                    }
                )
                print(
                    f"{method} {arm} {attack}: distance {rows[-1]['distance']:.3g}, refused/clipped/capped "
                    f"{res['rejected']}/{res['clipped']}/{res['capped']} ({res['seconds']} s)",
                    flush=True,
                )
                # written after every run: an interrupted benchmark leaves the rows it has
                results["seconds"] = round(time.perf_counter() - t0, 1)
                results["markdown"] = poisoning_table(rows, tiers)
                write_json(args.json, results)
    print(results["markdown"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
