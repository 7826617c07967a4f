"""Teacher-forced vs generation-based exact match: agreement per example, and the speed-up (issue 12).

For the zero-shot base model and for the model after a short centralised LoRA run (one client, plain
LoRA), the same held-out examples are evaluated with ``eval.mode: teacher_forced`` (one forward pass per
batch) and ``eval.mode: generate`` (greedy decoding, exact match after normalize_answer's folding). Reported:
the share of examples on which the two verdicts agree, the disagreements by direction, and the wall-clock and CPU seconds
each evaluation took (generate mode = generation + the teacher-forced pass that gives the log-likelihoods,
so the speed-up is what a user saves per evaluation).

    python -m bench.eval_agreement                                   # builtin multitask suite, SmolLM2
    python -m bench.eval_agreement --suite facts --json results/eval_agreement.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from prelort import config as config_mod
from prelort.engines.inprocess import InProcessEngine
from prelort.runner import Session

from ._common import environment, write_json


def compare(session: Session, evaluate) -> dict[str, Any]:
    """Evaluate in both modes with ``evaluate()`` (a no-argument call returning (metrics, examples))."""
    out: dict[str, Any] = {}
    verdicts = {}
    for mode in ("teacher_forced", "generate"):
        session.cfg.eval.mode = mode
        t0, c0 = time.perf_counter(), time.process_time()
        metrics, examples = evaluate()
        out[f"{mode}_seconds"] = round(time.perf_counter() - t0, 2)
        out[f"{mode}_cpu_seconds"] = round(time.process_time() - c0, 2)  # less sensitive to other load
        out[f"{mode}_accuracy"] = metrics["accuracy"]
        verdicts[mode] = [ex["correct"] for ex in examples]
        if mode == "generate":
            preds = [ex["prediction"] for ex in examples]
    tf, gen = verdicts["teacher_forced"], verdicts["generate"]
    n = len(tf)
    out["n"] = n
    out["agreement"] = sum(a == b for a, b in zip(tf, gen)) / n
    out["generate_only_correct"] = sum(1 for a, b in zip(tf, gen) if b and not a)
    out["teacher_forced_only_correct"] = sum(1 for a, b in zip(tf, gen) if a and not b)
    out["speedup"] = round(out["generate_seconds"] / out["teacher_forced_seconds"], 2)
    out["speedup_cpu"] = round(out["generate_cpu_seconds"] / out["teacher_forced_cpu_seconds"], 2)
    out["disagreeing_predictions"] = [p for p, a, b in zip(preds, tf, gen) if a != b][:20]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--suite", default="multitask", choices=["multitask", "facts"])
    ap.add_argument("--examples", type=int, default=256)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--json", default="results/eval_agreement.json")
    args = ap.parse_args(argv)

    data: dict[str, Any] = {
        "source": "builtin",
        "suite": args.suite,
        "max_length": 64,
        "num_train": 400,
        "num_test": args.examples,
    }
    if args.suite == "facts":
        data["facts"] = {"num_entities": max(1, args.examples // 3), "attributes": 3, "groups": 1}
    cfg = config_mod.from_dict(
        {
            "method": "prelort",
            "seed": 0,
            "rounds": args.rounds,
            "model": {"name": args.model},
            "clients": {"num": 1, "per_round": 1, "ranks": [args.rank]},
            "prelort": {"nested": "off"},
            "lora": {"alpha": float(args.rank)},
            "data": data,
            "train": {"local_steps": args.steps, "batch_size": 8, "lr": args.lr},
            "eval": {
                "every": args.rounds,
                "max_examples": args.examples,
                "batch_size": 32,
                "max_new_tokens": 8,
                "mode": "teacher_forced",
                "truncation_curve": False,
                "base": False,
            },
        }
    )
    with tempfile.TemporaryDirectory(prefix="eval-agreement-") as tmp:
        session = Session(cfg, Path(tmp) / "run", verbose=False)
        zero_shot = compare(session, session.evaluate_base_examples)
        print(
            "zero-shot:", json.dumps({k: v for k, v in zero_shot.items() if k != "disagreeing_predictions"}), flush=True
        )
        cfg_before = session.cfg.eval.mode
        session.run(InProcessEngine(session, progress=False))
        session.cfg.eval.mode = cfg_before
        trained = compare(session, lambda: session.evaluate_tier_examples(args.rank))
        print("trained:", json.dumps({k: v for k, v in trained.items() if k != "disagreeing_predictions"}), flush=True)
    out_path = Path(args.json)
    results = json.loads(out_path.read_text()) if out_path.is_file() else {}
    results[f"{args.model}/{args.suite}"] = {
        "command": " ".join(["python", "-m", "bench.eval_agreement", *(argv if argv is not None else sys.argv[1:])]),
        "training": {
            "rank": args.rank,
            "rounds": args.rounds,
            "local_steps": args.steps,
            "batch_size": 8,
            "lr": args.lr,
            "clients": 1,
        },
        "zero_shot": zero_shot,
        "trained": trained,
        "environment": environment(),
    }
    write_json(out_path, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
