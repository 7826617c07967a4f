"""Cost of the prefix-nested objective: local-step time of each nested mode relative to plain LoRA.

A client of rank 16 in a federation with ranks [2, 4, 8, 16] has T_k = {2, 4, 8, 16} (|T_k| = 4).
Each mode runs the real ``prelort.train.train_client`` on the same batch (default 8 x 128 tokens of
SmolLM2-135M-Instruct); modes are interleaved round by round (rotating their order) after a warmup,
and each mode's median seconds per optimizer step is divided by that of `off` (plain LoRA at rank 16).

Expected: sample ~ 1.0x (one pass, plus a mask multiply), sandwich ~ 2x, all ~ |T_k|x.

    python -m bench.train_step                 # SmolLM2, 8 x 128 tokens, 3 rounds x 2 steps
    python -m bench.train_step --quick         # smaller batch, 2 rounds x 1 step
    python -m bench.train_step --model tiny-llama --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from prelort import adapters, rank_geometry
from prelort.adapters import LoraAdapter
from prelort.config import ModelConfig, TrainConfig
from prelort.methods.base import FederationSpec, TrainPlan, lora_init
from prelort.models import load_model
from prelort.train import train_client

MODES = ("off", "sample", "sandwich", "all")
EXPECTED_PASSES = {"off": 1, "sample": 1, "sandwich": 2}  # all: |T_k|


def make_batch(n: int, length: int, vocab: int, seed: int) -> list[dict]:
    """n random sequences of ``length`` tokens; the loss is on the second half (the "response")."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(100, vocab, (n, length), generator=g).tolist()
    half = length // 2
    return [{"input_ids": row, "labels": [-100] * half + row[half:]} for row in ids]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="model alias, directory, .gguf or hub id")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--ranks", default="2,4,8,16", help="federation ranks; the client has the largest")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved measurement rounds per mode")
    ap.add_argument("--steps", type=int, default=2, help="optimizer steps per measurement")
    ap.add_argument(
        "--warmup",
        choices=["off", "all"],
        default="all",
        help="warm up with one step of every mode (all) or of plain LoRA only (off: cheaper on CPU)",
    )
    ap.add_argument("--quick", action="store_true", help="batch 4 x 64, 2 rounds x 1 step")
    ap.add_argument("--json", type=Path, help="write the figures to this JSON file")
    args = ap.parse_args(argv)
    if args.quick:
        args.batch_size, args.seq_len, args.rounds, args.steps = 4, 64, 2, 1

    ranks = sorted({int(r) for r in args.ranks.split(",")})
    rank = ranks[-1]
    truncations = rank_geometry.nested_truncations(rank, ranks)
    t0 = time.perf_counter()
    base, tok = load_model(ModelConfig(name=args.model, device=args.device))
    load_s = time.perf_counter() - t0
    model = adapters.attach_lora(base, ["q_proj", "k_proj", "v_proj", "o_proj"], rank, alpha=2.0 * rank)
    spec = FederationSpec(modules=LoraAdapter(model).modules, client_ranks=tuple(ranks), alpha=2.0 * rank)
    start = lora_init(spec, rank, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    for k in start:  # nonzero B, as in any round after the first
        if k.endswith("lora_B"):
            start[k] = torch.randn(start[k].shape, generator=g) * 0.01
    examples = make_batch(args.batch_size, args.seq_len, len(tok), seed=0)
    device = next(model.parameters()).device

    def measure(mode: str, steps: int) -> tuple[float, float]:
        """(wall, process CPU) seconds per optimizer step of one train_client call."""
        LoraAdapter(model).load_state(start, rank)
        cfg = TrainConfig(local_steps=steps, batch_size=args.batch_size, lr=1e-4)
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter(), time.process_time()
        train_client(model, examples, TrainPlan(rank=rank, truncations=tuple(truncations), mode=mode), cfg, seed=0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps

    print(
        f"model {args.model} on {device} ({torch.get_num_threads()} threads), loaded in {load_s:.1f}s; "
        f"batch {args.batch_size} x {args.seq_len}, ranks {ranks}, client rank {rank}, T_k = {truncations}",
        flush=True,
    )
    for mode in MODES if args.warmup == "all" else ("off",):  # warmup: allocator, kernels, caches
        measure(mode, 1)
    times: dict[str, list[float]] = {m: [] for m in MODES}
    cpu_times: dict[str, list[float]] = {m: [] for m in MODES}
    for r in range(args.rounds):
        order = MODES[r % len(MODES) :] + MODES[: r % len(MODES)]
        for mode in order:
            wall, cpu = measure(mode, args.steps)
            times[mode].append(wall)
            cpu_times[mode].append(cpu)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{m} {times[m][-1]:.3f}s" for m in MODES), flush=True)

    median = {m: statistics.median(v) for m, v in times.items()}
    ratio = {m: median[m] / median["off"] for m in MODES}
    # process CPU time is less disturbed by other processes sharing the cores than wall time
    cpu_median = {m: statistics.median(v) for m, v in cpu_times.items()}
    cpu_ratio = {m: cpu_median[m] / cpu_median["off"] for m in MODES}
    passes = {**EXPECTED_PASSES, "all": len(truncations)}
    print(f"\n{'mode':<9} {'passes/step':>11} {'s/step':>9} {'x off':>7} {'cpu s/step':>11} {'cpu x off':>10}")
    for m in MODES:
        print(f"{m:<9} {passes[m]:>11} {median[m]:>9.3f} {ratio[m]:>7.2f} {cpu_median[m]:>11.3f} {cpu_ratio[m]:>10.2f}")
    print(f"|T_k| = {len(truncations)}; goal: sample <= 1.05x, all ~ {len(truncations)}x")
    result = {
        "command": " ".join(["python", "-m", "bench.train_step", *(sys.argv[1:] if argv is None else argv)]),
        "environment": {
            "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "platform": platform.platform(),
        },
        "model": args.model,
        "device": str(device),
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "ranks": ranks,
        "client_rank": rank,
        "truncations": truncations,
        "num_truncations": len(truncations),
        "rounds": args.rounds,
        "steps_per_measurement": args.steps,
        "passes_per_step": passes,
        "seconds_per_step": median,
        "all_seconds_per_step": times,
        "ratio_to_off": ratio,
        "cpu_seconds_per_step": cpu_median,
        "cpu_ratio_to_off": cpu_ratio,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
