"""Communication benchmark: bytes down and up per client per round for each method (issue 6, item 4).

Measured from what the methods actually produce, at a real model's attention shapes (random
tensors, shapes only):

* download = ``method.broadcast(state, r)``: the adapter tensors plus ``base_delta`` (FLoRA's
  merged dense delta), raw bytes (sum of ``nbytes``) and safetensors-encoded bytes;
* upload = the client's update at the rank it trains (``method.plan(r).rank``; FedIT trains the
  smallest rank whatever its own), encoded with the project's wire encoder
  (``prelort.updates.encode_update``: safetensors bytes + the JSON metadata);
* FLoRA's stacked LoRA of a round (``flora.stack_factors`` over N clients' updates): its rank is
  the sum of the clients' ranks, so it grows with N; shown for each N next to the dense delta that
  this implementation broadcasts instead (whose size does not depend on N);
* per-round server totals for N clients with ranks drawn (seeded) from {2, ..., 64}.

Run:  python -m bench.communication [--quick] [--json results/communication.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from safetensors.torch import save as safetensors_save

from prelort.methods import ClientUpdate, FederationSpec, build, key
from prelort.methods.flora import stack_factors
from prelort.updates import encode_update

from ._common import (
    ALPHA,
    MODELS,
    RANK_CHOICES,
    ModelShape,
    draw_ranks,
    environment,
    fmt_bytes,
    method_order,
    parse_ints,
    parse_methods,
    parse_models,
    table,
    write_json,
)

NOTES = {
    "download": "method.broadcast(state, r) at round 0 (state = method.init_state): adapter tensors + base_delta; "
    "raw = sum of nbytes, safetensors = len(safetensors.torch.save(tensors)) (float32, contiguous). The shapes "
    "a method sends do not change with the round (checked by tests/bench/test_bench_smoke.py).",
    "upload": "the client's update at the rank it trains (method.plan(r).rank), encoded with "
    "prelort.updates.encode_update: safetensors bytes, plus the JSON metadata (meta_json_bytes).",
    "flora": "this implementation's FLoRA broadcasts the accumulated merged delta (dense, d_out x d_in per "
    "module) plus a fresh rank-r LoRA init, whatever N. The stacked LoRA of one round, as FLoRA's paper "
    "ships it, has rank sum_k r_k (it grows with the number of clients); its size is measured from "
    "flora.stack_factors on the drawn clients' updates and sent as float32. Either way the base-weight "
    "update has to reach every client each round.",
    "totals": "per-round server egress / ingress for N clients with ranks drawn (seeded) from the rank choices: "
    "sum over clients of download / upload (safetensors bytes).",
}


def _encoded_size(tensors: dict[str, torch.Tensor]) -> int:
    plain = {name: t.detach().to(torch.float32).contiguous() for name, t in tensors.items()}
    return len(safetensors_save(plain))


def _raw_size(tensors: dict[str, torch.Tensor]) -> int:
    # What goes on the wire is float32 whatever the in-memory dtype.
    return sum(t.numel() * 4 for t in tensors.values())


def measure_method(model: ModelShape, name: str, seed: int) -> dict:
    """Download / upload sizes of one method at every rank choice."""
    modules = model.module_shapes()
    spec = FederationSpec(modules=modules, client_ranks=tuple(RANK_CHOICES), alpha=ALPHA)
    method = build(name, spec)
    state = method.init_state(torch.Generator().manual_seed(seed))
    rows = []
    for r in RANK_CHOICES:
        sent = method.broadcast(state, r, generator=torch.Generator().manual_seed(seed + r))
        down = dict(sent.adapter)
        if sent.base_delta:
            down.update(sent.base_delta)
        trained = method.plan(r).rank
        update_tensors = {}
        for module, (d_out, d_in) in modules.items():
            a, b = sent.adapter[key(module, "lora_A")], sent.adapter[key(module, "lora_B")]
            if tuple(a.shape) != (trained, d_in) or tuple(b.shape) != (d_out, trained):
                raise RuntimeError(
                    f"{name}: broadcast at rank {r} gives {module} factors {tuple(a.shape)}, {tuple(b.shape)}; "
                    f"the client trains rank {trained}"
                )
            update_tensors[key(module, "lora_A")] = a
            update_tensors[key(module, "lora_B")] = b
        update = ClientUpdate(client=0, rank=trained, num_examples=100, tensors=update_tensors, round=1, method=name)
        payload, meta = encode_update(update)
        rows.append(
            {
                "rank": r,
                "trained_rank": trained,
                "download_raw_bytes": _raw_size(down),
                "download_safetensors_bytes": _encoded_size(down),
                "download_base_delta_raw_bytes": _raw_size(sent.base_delta) if sent.base_delta else 0,
                "upload_raw_bytes": _raw_size(update_tensors),
                "upload_safetensors_bytes": len(payload),
                "upload_meta_json_bytes": len(json.dumps(meta).encode()),
            }
        )
        del sent, down, update_tensors, update, payload
    return {"method": name, "dense_state": method.dense_state, "ranks": rows}


def flora_stacked(model: ModelShape, n_clients: int, seed: int) -> dict:
    """Size of FLoRA's stacked LoRA for one round of ``n_clients`` (ranks drawn), via stack_factors."""
    ranks = draw_ranks(n_clients, seed)
    weights = [1.0] * n_clients
    stacked: dict[str, torch.Tensor] = {}
    for module, (d_out, d_in) in model.module_shapes().items():
        factors = [(torch.ones(r, d_in), torch.ones(d_out, r)) for r in ranks]
        a_stack, b_stack = stack_factors(factors, weights)
        stacked[key(module, "lora_A")] = a_stack.to(torch.float32)
        stacked[key(module, "lora_B")] = b_stack.to(torch.float32)
        del factors, a_stack, b_stack
    stacked_rank = next(iter(stacked.values())).shape[0]
    out = {
        "n_clients": n_clients,
        "stacked_rank": stacked_rank,
        "sum_of_ranks": sum(ranks),
        "stacked_raw_bytes": _raw_size(stacked),
        "stacked_safetensors_bytes": _encoded_size(stacked),
        "dense_delta_raw_bytes": model.dense_floats() * 4,
    }
    out["stacked_over_dense"] = out["stacked_raw_bytes"] / out["dense_delta_raw_bytes"]
    return out


def round_totals(per_method: list[dict], n_clients: int, seed: int) -> list[dict]:
    ranks = draw_ranks(n_clients, seed)
    out = []
    for m in per_method:
        by_rank = {row["rank"]: row for row in m["ranks"]}
        out.append(
            {
                "method": m["method"],
                "n_clients": n_clients,
                "server_egress_bytes": sum(by_rank[r]["download_safetensors_bytes"] for r in ranks),
                "server_ingress_bytes": sum(by_rank[r]["upload_safetensors_bytes"] for r in ranks),
            }
        )
    return out


def print_model_report(model: ModelShape, entry: dict) -> None:
    print(f"\n=== {model.describe()}; {len(model.module_shapes())} modules")
    print(
        f"    one rank dimension = {fmt_bytes(model.lora_floats_per_rank() * 4)} of float32 factors; "
        f"dense deltas of the adapted modules = {fmt_bytes(model.dense_floats() * 4)}"
    )
    rows = []
    for m in entry["methods"]:
        for row in m["ranks"]:
            rows.append(
                [
                    m["method"],
                    row["rank"],
                    row["trained_rank"],
                    fmt_bytes(row["download_raw_bytes"]),
                    fmt_bytes(row["download_safetensors_bytes"]),
                    fmt_bytes(row["upload_raw_bytes"]),
                    fmt_bytes(row["upload_safetensors_bytes"]),
                    f"{row['upload_meta_json_bytes']} B",
                ]
            )
    print("  Per client per round (download = what broadcast() returns; upload = the update at the trained rank)")
    print(
        table(
            [
                "method",
                "client rank",
                "trains",
                "down raw",
                "down safetensors",
                "up raw",
                "up safetensors",
                "+ meta JSON",
            ],
            rows,
        )
    )
    if entry["flora_stacked"]:
        print("\n  FLoRA: stacked LoRA of one round (rank = sum of the clients' ranks) vs the dense delta it replaces")
        rows = [
            [
                s["n_clients"],
                s["stacked_rank"],
                fmt_bytes(s["stacked_raw_bytes"]),
                fmt_bytes(s["stacked_safetensors_bytes"]),
                fmt_bytes(s["dense_delta_raw_bytes"]),
                f"{s['stacked_over_dense']:.2f}x",
            ]
            for s in entry["flora_stacked"]
        ]
        print(
            table(
                ["N", "stacked rank", "stacked raw", "stacked safetensors", "dense delta (sent here)", "stacked/dense"],
                rows,
            )
        )
    print("\n  Per round, N clients with drawn ranks: server egress (down) / ingress (up), safetensors bytes")
    rows = [
        [t["method"], t["n_clients"], fmt_bytes(t["server_egress_bytes"]), fmt_bytes(t["server_ingress_bytes"])]
        for t in entry["round_totals"]
    ]
    print(table(["method", "N", "egress", "ingress"], rows))
    if "ratios_at_rank" in entry:
        print("\n  Download / upload per client relative to PreLort at the same client rank (safetensors bytes)")
        rows = [
            [
                m,
                *[
                    f"{entry['ratios_at_rank'][m][str(r)]['down']:.2f} / {entry['ratios_at_rank'][m][str(r)]['up']:.2f}"
                    for r in RANK_CHOICES
                ],
            ]
            for m in entry["ratios_at_rank"]
        ]
        print(table(["method"] + [f"r={r}" for r in RANK_CHOICES], rows))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small shapes and N (a check, seconds)")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON here")
    p.add_argument("--models", default=None, help="comma list of: " + ", ".join(MODELS) + " (default smollm2,1b)")
    p.add_argument(
        "--clients", default=None, help="comma list of N for FLoRA's stacking and round totals (default 10,100)"
    )
    p.add_argument(
        "--methods", default=",".join(method_order()), help="comma list of methods (default: all registered)"
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.models is None:
        args.models = "tiny" if args.quick else "smollm2,1b"
    if args.clients is None:
        args.clients = "4,16" if args.quick else "10,100"
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    models = parse_models(args.models)
    n_list = parse_ints(args.clients, "--clients")
    methods = parse_methods(args.methods)
    started = time.perf_counter()
    payload: dict = {
        "benchmark": "communication",
        "settings": {
            "models": [m.key for m in models],
            "clients": n_list,
            "methods": methods,
            "rank_choices": list(RANK_CHOICES),
            "seed": args.seed,
            "alpha": ALPHA,
            "quick": args.quick,
            "argv": sys.argv[1:] if argv is None else list(argv),
        },
        "environment": environment(),
        "notes": NOTES,
        "models": {},
    }
    print(f"Communication benchmark: bytes per client per round; ranks {list(RANK_CHOICES)}; N = {n_list}")
    for model in models:
        per_method = [measure_method(model, name, args.seed) for name in methods]
        entry: dict = {
            "label": model.label,
            "modules": len(model.module_shapes()),
            "lora_bytes_per_rank": model.lora_floats_per_rank() * 4,
            "dense_delta_bytes": model.dense_floats() * 4,
            "methods": per_method,
            "flora_stacked": [flora_stacked(model, n, args.seed) for n in n_list] if "flora" in methods else [],
            "round_totals": [t for n in n_list for t in round_totals(per_method, n, args.seed)],
        }
        if "prelort" in methods:
            ref = {row["rank"]: row for row in next(m for m in per_method if m["method"] == "prelort")["ranks"]}
            entry["ratios_at_rank"] = {
                m["method"]: {
                    str(row["rank"]): {
                        "down": row["download_safetensors_bytes"] / ref[row["rank"]]["download_safetensors_bytes"],
                        "up": row["upload_safetensors_bytes"] / ref[row["rank"]]["upload_safetensors_bytes"],
                    }
                    for row in m["ranks"]
                }
                for m in per_method
            }
        payload["models"][model.key] = entry
        print_model_report(model, entry)
    payload["elapsed_s"] = time.perf_counter() - started
    print("\nnotes:")
    for k, v in NOTES.items():
        print(f"  {k}: {v}")
    print(f"elapsed {payload['elapsed_s']:.0f} s")
    if args.json:
        print(f"wrote {write_json(args.json, payload)}")
    return payload


if __name__ == "__main__":
    main()
