"""Privacy-utility table: accounted epsilon vs accuracy / perplexity per rank tier, prelort vs zeropad.

Client-level DP adds noise of std z C to the numerator sums; PreLort's segment rule divides dimension i by
D_i (the clients covering it), zero-padding divides every dimension by K. So under the same noise the
dimensions only high-rank clients cover are noisier in prelort's state, and the high tiers feel it first:
this measures by how much, per tier, at a few noise multipliers (the same z, hence the same epsilon, for
both methods), plus the run without DP.

Every run: ``clients.num`` clients all sampled each round (q = 1), ranks cycled from --ranks, the same seed,
data, learning rate and clip norm; evaluation of every tier after the last round only. Epsilon is the
run's own accounted ``dp_epsilon`` (metrics.jsonl) at delta = min(1e-5, N**-1.1).

    python -m bench.privacy_utility                                   # tiny model, z in 0 (no DP), 0.01, 0.05, 0.2, 1
    python -m bench.privacy_utility --model smollm2-135m-instruct --noise 0,0.01,0.1 --rounds 2
    python -m bench.privacy_utility --json results/privacy_utility.json

Resumable: a run directory with ``bench-complete.json`` under --runs-dir is reused.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from prelort import config as config_mod
from prelort import runner

from ._common import environment, write_json

COMPLETE = "bench-complete.json"


def settings(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "engine": "inprocess",
        "audit": False,
        "seed": args.seed,
        "rounds": args.rounds,
        "model": {"name": args.model},
        "lora": {"alpha": 16},
        "clients": {"num": args.clients, "per_round": args.clients, "ranks": args.ranks},
        "prelort": {"nested": "all"},
        "data": {
            "source": "builtin",
            "num_train": args.num_train,
            "num_test": args.eval_examples,
            "max_length": 64,
            "partition": {"kind": "iid"},
        },
        "train": {"local_steps": args.local_steps, "batch_size": 4, "lr": args.lr},
        "eval": {
            "every": args.rounds,
            "max_examples": args.eval_examples,
            "batch_size": 16,
            "max_new_tokens": 8,
            "truncation_curve": False,
            "base": False,
        },
    }


def config_for(args: argparse.Namespace, method: str, z: float) -> config_mod.Config:
    data = settings(args)
    data["method"] = method
    if z > 0:
        data["privacy"] = {"dp": True, "clip_norm": args.clip_norm, "noise_multiplier": z}
    return config_mod.from_dict(data)


def run_one(cfg: config_mod.Config, run_dir: Path) -> dict[str, Any]:
    marker = run_dir / COMPLETE
    if marker.exists():
        return json.loads(marker.read_text())
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    t0 = time.perf_counter()
    runner.run(cfg, run_dir, verbose=False)
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    last = max(r["round"] for r in records)
    trains = [r for r in records if r.get("kind") == "train"]
    tiers = {
        str(r["rank"]): {"accuracy": r["accuracy"], "perplexity": r["perplexity"]}
        for r in records
        if r.get("kind") == "tier" and r["round"] == last
    }
    out = {
        "dp_epsilon": trains[-1].get("dp_epsilon"),
        "dp_delta": trains[-1].get("dp_delta"),
        "noise_multiplier": trains[-1].get("dp_noise_multiplier"),
        "tiers": tiers,
        "train_loss": [t["train_loss"] for t in trains],
        "seconds": round(time.perf_counter() - t0, 1),
    }
    write_json(marker, out)
    return out


def markdown(results: dict[str, Any], tiers: list[str]) -> str:
    head = ["method", "z", "epsilon"] + [f"r{t} ppl" for t in tiers] + [f"r{t} acc" for t in tiers]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in results["rows"]:
        eps = row["dp_epsilon"]
        eps_text = "no DP" if row["z"] == 0 else ("inf" if eps is None else f"{eps:.3g}")
        cells = [row["method"], f"{row['z']:g}", eps_text]
        cells += [f"{row['tiers'][t]['perplexity']:.4g}" for t in tiers]
        cells += [f"{row['tiers'][t]['accuracy']:.3f}" for t in tiers]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny-llama")
    p.add_argument("--methods", default="prelort,zeropad")
    p.add_argument("--noise", default="0,0.01,0.05,0.2,1", help="noise multipliers z; 0 = a run without DP")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--ranks", default="2,4,8,16")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--local-steps", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--clip-norm", type=float, default=1.0)
    p.add_argument("--num-train", type=int, default=512)
    p.add_argument("--eval-examples", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs-dir", default="/tmp/prelort-bench/privacy_utility")
    p.add_argument("--json", default="results/privacy_utility.json")
    args = p.parse_args(argv)
    args.ranks = [int(x) for x in args.ranks.split(",")]
    args.noise_list = [float(x) for x in args.noise.split(",")]
    args.method_list = [m.strip() for m in args.methods.split(",") if m.strip()]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runs = Path(args.runs_dir) / args.model
    rows = []
    t0 = time.perf_counter()
    for z in args.noise_list:
        for method in args.method_list:
            cfg = config_for(args, method, z)
            res = run_one(cfg, runs / f"{method}-z{z:g}")
            rows.append({"method": method, "z": z, **res})
            print(
                f"{method} z={z:g}: epsilon={res['dp_epsilon']} tiers={res['tiers']} ({res['seconds']} s)", flush=True
            )
    tiers = [str(t) for t in sorted(set(args.ranks))]
    results = {
        "command": "python -m bench.privacy_utility " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "settings": settings(args),
        "clip_norm": args.clip_norm,
        "environment": environment(),
        "seconds": round(time.perf_counter() - t0, 1),
        "rows": rows,
    }
    results["markdown"] = markdown(results, tiers)
    write_json(args.json, results)
    print(results["markdown"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
