"""Rewrite the README's results section from the benchmarks' JSON files.

Reads ``quality.json``, ``quality_pilot.json``, ``quality_study.json``, ``quality_study_2.json``,
``aggregation.json``, ``communication.json``, ``train_step.json``, ``quantization.json``,
``quantization_demo.json`` and ``poisoning.json`` from the results directory (each written by its
bench script with ``--json``; a missing one is named as not run yet) and replaces the text between
``<!-- results:begin -->`` and ``<!-- results:end -->`` in the README with Markdown tables, each with the
command that made it and the machine it ran on. Without the markers, a
``## Results`` section holding them is appended. The output depends only on the JSON files, so
``--check`` can tell whether the README is up to date.

    python -m bench.make_tables            # rewrite README.md from results/
    python -m bench.make_tables --check    # exit 1 if README.md's section is out of date
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import _common  # the size/time formatting the benchmarks print with

ROOT = Path(__file__).resolve().parents[1]
BEGIN = "<!-- results:begin -->"
END = "<!-- results:end -->"


class TablesError(ValueError):
    """A results file or the README cannot be used; the message names the file and the problem."""


# ------------------------------------------------------------------------------------------ formatting


def markdown(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _num(x: Any, digits: int) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.{digits}f}"


def mean_std(stat: dict[str, Any] | None, digits: int) -> str:
    """``mean ± std`` (std left out when null, e.g. a single seed)."""
    if not stat or stat.get("mean") is None:
        return "n/a"
    if stat.get("std") is None:
        return _num(stat["mean"], digits)
    return f"{_num(stat['mean'], digits)} ± {_num(stat['std'], digits)}"


def fmt_bytes(n: float | None) -> str:
    return "n/a" if n is None else _common.fmt_bytes(n)


def fmt_seconds(s: float | None) -> str:
    return "n/a" if s is None else _common.fmt_seconds(s)


def machine(env: dict[str, Any] | None) -> str:
    if not env:
        return "not recorded"
    parts = [str(env.get("cpu", "unknown CPU"))]
    if env.get("cpu_count") is not None:
        parts[0] += f" ({env['cpu_count']} cores)"
    if env.get("torch_threads") is not None:
        parts.append(f"{env['torch_threads']} torch thread(s)")
    if env.get("torch"):
        parts.append(f"torch {env['torch']}")
    if env.get("platform"):
        parts.append(str(env["platform"]))
    return ", ".join(parts)


def runnable(command: str) -> str:
    """A recorded command as it runs today: the JSON keeps what was typed, ``python bench/NAME.py ...`` before
    bench/ became a package; that is ``python -m bench.NAME ...`` now."""
    match = re.match(r"python bench/(\w+)\.py\b", command)
    return f"python -m bench.{match[1]}{command[match.end() :]}" if match else command


def command_of(data: dict[str, Any], script: str) -> str:
    if data.get("command"):
        return runnable(str(data["command"]))
    argv = (data.get("settings") or {}).get("argv")
    if argv is not None:
        return " ".join(["python", "-m", f"bench.{script}", *map(str, argv)])
    return f"python -m bench.{script} (arguments not recorded in the JSON)"


def stage_machines(stage: dict[str, Any]) -> str:
    """The machine line of a study-2 stage: the environment of the process that wrote it last, and how many runs
    each CPU ran (runs record their CPU since stage C's phase 1; the older ones say nothing)."""
    line = f"Machine (the last process to write the stage): {machine(stage.get('environment'))}"
    counts = Counter(str(r.get("cpu") or "not recorded") for r in (stage.get("runs") or {}).values())
    if counts and set(counts) != {"not recorded"}:
        per_cpu = sorted(counts.items(), key=lambda kv: (kv[0] == "not recorded", -kv[1], kv[0]))
        line += ". Runs per CPU: " + ", ".join(f"{cpu} {n}" for cpu, n in per_cpu)
        line += "; wall seconds compare only within one CPU (passes compare everywhere)"
    return line


def provenance(data: dict[str, Any], script: str, env: dict[str, Any] | None = None) -> str:
    return f"Command: `{command_of(data, script)}`  \nMachine: {machine(env or data.get('environment'))}"


def _ordered(names: Sequence[str]) -> list[str]:
    return sorted(names, key=_common.method_sort_key)


# ------------------------------------------------------------------------------------------ sections


def quality_section(data: dict[str, Any], results_dir: Path, readme_dir: Path) -> str:
    out = ["### Quality (accuracy, ROUGE-L, perplexity per rank tier)", ""]
    settings = data.get("settings", {})
    seeds = settings.get("seeds", [])
    out.append(
        f"Mean ± sample std over seeds {seeds}; learning rate chosen per method from "
        f"{settings.get('lr_grid')} by the same procedure: "
        f"{(data.get('protocol') or {}).get('lr_selection', 'see quality.json')}."
    )
    out.append("")
    for model, m in data.get("models", {}).items():
        cfg = m.get("config", {})
        clients = cfg.get("clients", {})
        train = cfg.get("train", {})
        partition = (cfg.get("data") or {}).get("partition", {})
        out.append(
            f"**{model}**: {m.get('rounds')} rounds x {clients.get('per_round')} of {clients.get('num')} "
            f"clients (ranks {clients.get('ranks')}) x {train.get('local_steps')} local steps of batch "
            f"{train.get('batch_size')}; {partition.get('kind')} non-IID (alpha {partition.get('alpha')}) over "
            f"task categories; {(cfg.get('eval') or {}).get('max_examples')} held-out examples; "
            f"compute time {(m.get('compute_seconds') or m.get('wall_seconds') or 0) / 60:.0f} min."
            + (f" {m['rounds_note']}." if m.get("rounds_note") else "")
        )
        notes = []
        if m.get("select_rounds"):
            notes.append(
                f"Learning rates selected with {m['select_rounds']}-round runs on seed {settings.get('select_seed')}."
            )
        if m.get("seeds") and m["seeds"] != seeds:
            notes.append(f"Seeds {m['seeds']}" + (" (one seed: no std)." if len(m["seeds"]) == 1 else "."))
        if m.get("lr_transferred_from"):
            notes.append(
                f"No learning-rate selection for this model: each method uses the lr selected for "
                f"{m['lr_transferred_from']}."
            )
        if m.get("command"):
            notes.append(f"Command: `{runnable(m['command'])}`.")
        if notes:
            out[-1] += " " + " ".join(notes)
        out.append("")
        base = m.get("base", {})
        rows = [
            [
                "base (zero-shot)",
                "-",
                "-",
                mean_std(base.get("accuracy"), 3),
                mean_std(base.get("rougeL"), 3),
                mean_std(base.get("perplexity"), 2),
            ]
        ]
        methods = m.get("methods", {})
        edge = {name for name, sel in (m.get("lr_selection") or {}).items() if sel.get("at_grid_edge")}
        for name in _ordered(list(methods)):
            meth = methods[name]
            lr = "n/a" if meth.get("lr") is None else f"{meth['lr']:g}" + (" †" if name in edge else "")
            for tier, st in sorted(meth.get("tiers", {}).items(), key=lambda kv: int(kv[0])):
                rows.append(
                    [
                        name,
                        lr,
                        tier,
                        mean_std(st.get("accuracy"), 3),
                        mean_std(st.get("rougeL"), 3),
                        mean_std(st.get("perplexity"), 2),
                    ]
                )
        out.append(markdown(["method", "lr", "rank tier", "accuracy", "ROUGE-L", "perplexity"], rows))
        out.append("")
        if edge:
            out.append("† the selected learning rate is at the edge of the grid.")
            out.append("")
        ts = sorted({int(t) for meth in methods.values() for t in meth.get("curve", {})})
        if ts:
            out.append("Truncation curve (accuracy of the global model truncated to its first t dimensions):")
            out.append("")
            curve_rows = [
                [name] + [mean_std(methods[name].get("curve", {}).get(str(t), {}).get("accuracy"), 3) for t in ts]
                for name in _ordered(list(methods))
            ]
            out.append(markdown(["method"] + [f"t={t}" for t in ts], curve_rows))
            out.append("")
        plot = next((p for p in m.get("plots", []) if p.endswith("comparison_truncation.png")), None)
        if plot:
            path = Path(plot) if Path(plot).is_absolute() else ROOT / plot
            try:
                rel = os.path.relpath(path, readme_dir)
            except ValueError:
                rel = str(path)
            out.append(f"![truncation curves, {model}]({Path(rel).as_posix()})")
            out.append("")
    out.append(provenance(data, "quality"))
    return "\n".join(out)


def aggregation_section(data: dict[str, Any], results_dir: Path, readme_dir: Path) -> str:
    out = ["### Server aggregation time", ""]
    out.append(
        "CPU seconds per round of the server's aggregation of N client updates (ranks drawn from "
        f"{(data.get('settings') or {}).get('rank_choices')}); `*` = measured on a subset of the clients "
        "and scaled (see aggregation.json)."
    )
    out.append("")
    for model, m in data.get("models", {}).items():
        cases = [c for c in m.get("cases", []) if "error" not in c]
        methods = _ordered(list(dict.fromkeys(c["method"] for c in cases)))
        ns = sorted({c["n_clients"] for c in cases})
        by = {(c["method"], c["n_clients"]): c for c in cases}
        rows = []
        for n in ns:
            row = [str(n)]
            for meth in methods:
                c = by.get((meth, n))
                if c is None:
                    row.append("n/a")
                    continue
                per_client = c.get("aggregate_cpu_per_client_s")
                total = per_client * n if per_client is not None else c.get("aggregate_cpu_s")
                row.append(fmt_seconds(total) + ("*" if c.get("subset") else ""))
            rows.append(row)
        out.append(f"**{m.get('label', model)}**")
        out.append("")
        out.append(markdown(["N clients"] + methods, rows))
        out.append("")
        speed = (m.get("summary") or {}).get("speedup_vs_flexlora") or []
        if speed:
            out.append(
                "PreLort's speed-up over FlexLoRA (aggregation CPU time per client; goal >= 100x): "
                + ", ".join(f"N={s['n_clients']}: {s['aggregate_speedup']:.1f}x" for s in speed)
                + "."
            )
            out.append("")
        bandwidth = (m.get("summary") or {}).get("bandwidth_vs_memcpy") or []
        if bandwidth:
            parts = []
            for b in bandwidth:
                part = f"N={b['n_clients']}: {100 * b['fraction']:.0f}%"
                if "streaming_fraction" in b:
                    part += (
                        f" (fixed round cost {fmt_seconds(b['fixed_round_cpu_s'])}; per-client work alone "
                        f"{100 * b['streaming_fraction']:.0f}%)"
                    )
                parts.append(part)
            out.append(
                "PreLort's bandwidth (bytes of the updates / aggregation CPU time) as a fraction of a memcpy of "
                "the same tensors (goal >= 30%): " + ", ".join(parts) + "."
            )
            out.append("")
        memory = ((m.get("summary") or {}).get("peak_memory") or {}).get("prelort")
        if memory:
            out.append(
                "PreLort's peak server memory during aggregation (rise of the resident set; goal: flat in N): "
                + ", ".join(f"N={n}: {fmt_bytes(v)}" for n, v in memory["by_clients_measured"].items())
                + "."
            )
            out.append("")
    out.append(provenance(data, "aggregation"))
    return "\n".join(out)


def communication_section(data: dict[str, Any], results_dir: Path, readme_dir: Path) -> str:
    out = ["### Communication per client per round", ""]
    out.append("Upload / download bytes of one client (safetensors payload) by client rank.")
    out.append("")
    for model, m in data.get("models", {}).items():
        per_method = {x["method"]: {row["rank"]: row for row in x.get("ranks", [])} for x in m.get("methods", [])}
        ranks = sorted({r for rows in per_method.values() for r in rows})
        rows = []
        for meth in _ordered(list(per_method)):
            cells = [meth]
            for r in ranks:
                row = per_method[meth].get(r)
                cells.append(
                    "n/a"
                    if row is None
                    else f"{fmt_bytes(row.get('upload_safetensors_bytes'))} / "
                    f"{fmt_bytes(row.get('download_safetensors_bytes'))}"
                )
            rows.append(cells)
        out.append(f"**{m.get('label', model)}**")
        out.append("")
        out.append(markdown(["method"] + [f"rank {r} (up / down)" for r in ranks], rows))
        out.append("")
    out.append(provenance(data, "communication"))
    return "\n".join(out)


def train_step_section(data: dict[str, Any], results_dir: Path, readme_dir: Path) -> str:
    out = ["### Cost of the prefix-nested objective (local training step)", ""]
    out.append(
        f"{data.get('model')}, batch {data.get('batch_size')} x {data.get('seq_len')} tokens, a client of "
        f"rank {data.get('client_rank')} with truncations {data.get('truncations')}; median over "
        f"{data.get('rounds')} rounds."
    )
    out.append("")
    rows = []
    passes = data.get("passes_per_step", {})
    for mode in data.get("seconds_per_step", {}):
        rows.append(
            [
                mode,
                passes.get(mode, "n/a"),
                fmt_seconds(data["seconds_per_step"].get(mode)),
                _num((data.get("ratio_to_off") or {}).get(mode), 2),
                fmt_seconds((data.get("cpu_seconds_per_step") or {}).get(mode)),
                _num((data.get("cpu_ratio_to_off") or {}).get(mode), 2),
            ]
        )
    out.append(markdown(["mode", "passes/step", "s/step", "x off", "CPU s/step", "CPU x off"], rows))
    out.append("")
    env = data.get("environment") or {k: data[k] for k in ("cpu", "torch_threads") if k in data}
    if data.get("device") and "device" not in env:
        env = {**env, "platform": f"device {data['device']}"}
    out.append(provenance(data, "train_step", env))
    return "\n".join(out)


QUANT_LABELS = {"none": "float32", "int8": "int8", "nf4": "nf4"}


def _quantization_demo(demo: dict[str, Any]) -> list[str]:
    """The demo runs of bench/quantization.py (float32 and the quantised bases, same seed): tiers, wall time, peak
    RSS."""
    out: list[str] = []
    runs = demo.get("runs") or {}
    bases = [q for q in QUANT_LABELS if q in runs] + [q for q in runs if q not in QUANT_LABELS]
    labels = [QUANT_LABELS.get(q, q) for q in bases]
    overrides = ", ".join(f"`{o}`" for o in demo.get("overrides") or []) or "none (the demo as shipped)"
    out.append(
        f"`prelort run {demo.get('config')}` with `model.quantization` {', '.join(bases)}, same seed; budget "
        f"overrides: {overrides}. Tiers after round {max((r.get('round', 0) for r in runs.values()), default=0)}."
    )
    out.append("")
    tiers = {q: runs[q].get("tiers") or {} for q in bases}
    ranks = sorted({t for ts in tiers.values() for t in ts}, key=int)
    rows = []
    for t in ranks:
        cells = [tiers[q].get(t) or {} for q in bases]
        n = next((c["n"] for c in cells if "n" in c), "n/a")
        rows.append(
            [t, *(_num(c.get("accuracy"), 3) for c in cells), *(_num(c.get("perplexity"), 2) for c in cells), n]
        )
    header = ["tier", *(f"accuracy {label}" for label in labels), *(f"perplexity {label}" for label in labels), "n"]
    out.append(markdown(header, rows))
    out.append("")
    out.append(
        "Whole run: "
        + "; ".join(
            f"{QUANT_LABELS.get(q, q)} {fmt_seconds(runs[q].get('seconds'))}, peak RSS "
            f"{fmt_bytes(runs[q].get('peak_rss_bytes'))}"
            for q in bases
        )
        + "."
    )
    out.append("")
    return out


def _quantization_load(rows: list[dict[str, Any]], model: str) -> list[str]:
    """Part 0 of bench/quantization.py: what loading each base costs, quantised while loading or after."""
    ways = {
        "float32": "-",
        "streamed": "while loading",
        "streamed-default-malloc": "while loading, glibc's default malloc",
        "after": "after loading in float32 (before)",
    }
    out = [
        f"Loading (part 0): {model}, loaded from a checkpoint of each dtype. Anonymous memory is what the OS cannot take back (VmHWM also counts the pages of the "
        "memory-mapped checkpoint file, which it can drop); each row one fresh process, its libraries imported "
        "before the peak is taken.",
        "",
    ]
    table = []
    for r in rows:
        before = r.get("anon_before_load_bytes") or 0
        table.append(
            [
                r.get("checkpoint_dtype", "float32"),
                QUANT_LABELS.get(r["quantization"], r["quantization"]),
                ways.get(r["way"], r["way"]),
                fmt_seconds(r.get("load_seconds")),
                fmt_bytes((r.get("peak_anon_bytes") or 0) - before),
                fmt_bytes((r.get("anon_after_load_bytes") or 0) - before),
                fmt_bytes(r.get("peak_rss_bytes")),
            ]
        )
    header = ["checkpoint", "base", "quantised", "load time", "peak anon. memory of the load", "kept after load"]
    out.append(markdown([*header, "VmHWM"], table))
    out.append("")
    return out


def _gguf_conversion(rows: list[dict[str, Any]]) -> list[str]:
    """Part 0's conversion rows: the offline GGUF's one-off conversion, prelort's way and transformers'."""
    ways = {"streamed": "prelort (tensor by tensor into shards)", "transformers": "transformers (whole file)"}
    table = [
        [
            r.get("gguf", "n/a"),
            ways.get(r["way"], r["way"]),
            fmt_seconds(r.get("seconds")),
            fmt_bytes((r.get("peak_anon_bytes") or 0) - (r.get("anon_before_bytes") or 0)),
        ]
        for r in rows
    ]
    out = ["The first load of an offline GGUF converts it once to a float32 Hugging Face directory (the cache):", ""]
    out.append(markdown(["GGUF", "converted by", "time", "peak anon. memory"], table))
    out.append("")
    return out


def quantization_demo_section(data: dict[str, Any], results_dir: Path, readme_dir: Path) -> str:
    """bench/quantization.py --demo-only: the quality cost of a quantised base on the demo config."""
    out = ["### Quality cost of a quantised base (int8, nf4) on the demo config", ""]
    out += _quantization_demo(data.get("demo") or {})
    out.append(provenance(data, "quantization"))
    return "\n".join(out)


def _quantization_steps(data: dict[str, Any]) -> list[str]:
    """Part 1 of bench/quantization.py: step time and memory per base, checkpointing and rank."""
    steps = data.get("steps") or []
    out: list[str] = []
    out.append(
        f"Training steps (part 1): {data.get('model')}, LoRA on {', '.join(data.get('target_modules') or [])}, batch {data.get('batch_size')} "
        f"x {data.get('seq_len')} tokens, plain LoRA steps; each row one fresh process (`model.quantization`, "
        "`train.gradient_checkpointing`). Peak RSS while training: after loading, the peak of the training steps; "
        "whole process: loading included. Compare CPU seconds: the wall times of a shared machine depend on what "
        "else ran at that moment."
    )
    out.append("")

    def per_float32(field: str) -> dict[int, float | None]:
        """Row index -> the row's ``field`` over that of float32 at the same checkpointing and rank."""
        ref = {(r["gradient_checkpointing"], r["rank"]): r.get(field) for r in steps if r["quantization"] == "none"}
        out = {}
        for i, r in enumerate(steps):
            base = ref.get((r["gradient_checkpointing"], r["rank"]))
            out[i] = r[field] / base if base and r.get(field) is not None else None
        return out

    # no wall-time ratio: on a shared machine the rows' wall times are taken under different loads
    cpu_ratio = per_float32("cpu_seconds_per_step")
    rows = []
    for i, r in enumerate(steps):
        rows.append(
            [
                QUANT_LABELS.get(r["quantization"], r["quantization"]),
                "yes" if r["gradient_checkpointing"] else "no",
                r["rank"],
                fmt_seconds(r["seconds_per_step"]),
                fmt_seconds(r.get("cpu_seconds_per_step")),
                _num(cpu_ratio[i], 2),
                fmt_bytes(r.get("peak_rss_training_bytes")),
                fmt_bytes(r.get("peak_rss_bytes")),
                fmt_bytes(r.get("rss_after_load_bytes")),
            ]
        )
    if data.get("complete") is False:
        out.append(
            f"_Partial: the run stopped after {len(steps)} of the {3 * 2 * 2} configurations; the command below "
            "measures them all._"
        )
        out.append("")
    header = ["base", "checkpointing", "rank", "wall s/step", "CPU s/step", "CPU x float32"]
    out.append(markdown([*header, "peak RSS training", "peak RSS process", "RSS after load"], rows))
    out.append("")
    for q in ("int8", "nf4"):
        ratios = sorted(cpu_ratio[i] for i, r in enumerate(steps) if r["quantization"] == q and cpu_ratio[i])
        if ratios and ratios[len(ratios) // 2] > 1.05:
            span = (
                f"{ratios[0]:.1f}" if f"{ratios[0]:.1f}" == f"{ratios[-1]:.1f}" else f"{ratios[0]:.1f}-{ratios[-1]:.1f}"
            )
            out.append(
                f"**{q} training is slower than float32 here**: {span}x its CPU time "
                "per step (CPU time: less disturbed than wall time by other processes on the machine). "
                "bitsandbytes' CPU backend dequantises every weight in every forward and backward pass."
            )
            out.append("")
    return out


def quantization_section(data: dict[str, Any], results_dir: Path, readme_dir: Path) -> str:
    """bench/quantization.py: step time and memory per base and checkpointing, then nf4's quality cost."""
    out = ["### Quantised base and gradient checkpointing (memory, step time, quality)", ""]
    steps = data.get("steps") or []
    if data.get("load"):
        out += _quantization_load(data["load"], str(data.get("model")))
    if data.get("conversion"):
        out += _gguf_conversion(data["conversion"])
    if steps or data.get("complete") is False:
        out += _quantization_steps(data)
    if data.get("demo"):
        out += _quantization_demo(data["demo"])
    out.append(provenance(data, "quantization"))
    measured = sorted(
        {QUANT_LABELS.get(r["quantization"], r["quantization"]) for r in steps}, key=list(QUANT_LABELS.values()).index
    )
    load_only = "--load-only" in str(data.get("command", ""))
    for earlier in data.get("earlier_commands") or []:
        if load_only:
            out.append(
                f"(The command above measured loading (part 0); the training-step rows are those of an earlier run "
                f"of `{runnable(earlier)}`, kept with `--merge`.)"
            )
            continue
        out.append(
            f"(The command above measured the bases it names with `--quantizations`, merged with `--merge` into the "
            f"rows of an earlier run of `{runnable(earlier)}`; bases in the table: {', '.join(measured)}.)"
        )
    return "\n".join(out)


def _ci_text(ci: Sequence[float] | None, signed: bool = True) -> str:
    if not ci:
        return "n/a"
    return f"[{ci[0]:+.3f}, {ci[1]:+.3f}]" if signed else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def _link(path_text: str, readme_dir: Path) -> str:
    path = Path(path_text) if Path(path_text).is_absolute() else ROOT / path_text
    try:
        return Path(os.path.relpath(path, readme_dir)).as_posix()
    except ValueError:
        return path.as_posix()


def quality_pilot_section(data: dict[str, Any], results_dir: Path, readme_dir: Path) -> str:
    """The quality study's pilot gate (docs/quality-study.md): one row per task size, budget and seed tried."""
    gate = data.get("gate") or {}
    out = ["### Quality study pilot gate: is the `facts` task rank-sensitive?", ""]
    verdict = "**holds**" if gate.get("holds") else "**does not hold** (in any configuration tried so far)"
    out.append(
        f"Gate ({gate.get('rule', 'rule not recorded')}): {verdict}. The study runs only once it holds "
        "at the study's budget on the pilot seed (docs/quality-study.md)."
    )
    out += [
        "",
        "| facts (entities x attributes), LoRA targets | optimizer steps x batch | seed | rank 16 (lr) "
        "| rank 2 (lr) | 16 - 2 | queries | gate |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for entry in data.get("configurations", {}).values():
        task, budget = entry["task"], entry["budget"]
        best = entry.get("best_by_rank") or {}

        def cell(rank: str) -> str:
            b = best.get(rank)
            if b is None:
                return "skipped" if rank == "2" and entry.get("skipped") else "-"
            return f"{b['accuracy']:.3f} ({b['lr']:g})"

        gap = entry.get("gap_16_minus_2")
        n = min((b["n"] for b in best.values()), default=0)
        passes = entry.get("passes")
        out.append(
            f"| {task['entities'] * task['attributes']} ({task['entities']} x {task['attributes']}), "
            f"{task['targets']} | {budget['optimizer_steps']} x {budget['batch_size']} | {entry['seed']} | "
            f"{cell('16')} | {cell('2')} | {'-' if gap is None else f'{gap:+.3f}'} | {n} | "
            f"{'pass' if passes else ('fail' if passes is False else 'running')} |"
        )
    out.append("")
    out.append(
        "Each row: `python -m bench.quality_pilot --entities E --attributes A --phrasings P --targets T "
        "--ranks 16,2 --lrs <grid> --rounds R --steps S --batch B --seed SEED` (centralised LoRA: one client "
        "holding all the training data; best lr per rank; teacher-forced exact match on every held-out "
        "query)."
    )
    if data.get("note"):
        out += ["", str(data["note"])]
    out += ["", f"Machine: {machine(data.get('environment'))}"]
    return "\n".join(out)


def _study_selection(data: dict[str, Any]) -> list[str]:
    """The learning-rate selection runs (selection seed, never reported), finished ones only: accuracy per tier,
    the selection score (mean over tiers), cost, and which lr each arm chose (flagged at the grid's edge). Every
    figure is the study's own (``arms[...].grid`` and its runs' ``accuracy``); nothing is recomputed here."""
    settings, arms, runs = data.get("settings") or {}, data.get("arms") or {}, data.get("runs") or {}
    grids = [
        (arm, g, runs.get(g.get("run")) or {})
        for arm in settings.get("arms") or []
        for g in (arms.get(arm) or {}).get("grid") or []
    ]
    if not grids:
        return []
    tiers = sorted({int(t) for _, _, run in grids for t in run.get("accuracy") or {}})
    rows = []
    for arm, g, run in grids:
        chosen = arms[arm].get("lr")
        mark = (
            ("chosen" + (" (grid edge)" if arms[arm].get("at_grid_edge") else ""))
            if chosen == g["lr"]
            else ("" if chosen is not None else "grid unfinished")
        )
        rows.append(
            [arm, f"{g['lr']:g}"]
            + [_num((run.get("accuracy") or {}).get(str(t)), 3) for t in tiers]
            + [
                _num(g.get("mean_accuracy"), 3),
                _num((run.get("cost") or {}).get("passes"), 0),
                "n/a" if run.get("wall_seconds") is None else f"{run['wall_seconds'] / 60:.1f} min",
                mark,
            ]
        )
    return [
        f"Learning-rate selection on seed {settings.get('selection_seed')} (never reported; the lr with the "
        "highest mean accuracy over the tiers is chosen per arm; wall time on a shared machine, so other work "
        "running alongside can inflate it, passes cannot):",
        "",
        markdown(["arm", "lr"] + [f"tier {t}" for t in tiers] + ["mean", "passes", "wall", ""], rows),
        "",
    ]


def quality_study_section(data: dict[str, Any], results_dir: Path, readme_dir: Path) -> str:
    """The pre-registered study (docs/quality-study.md): verdict, paired differences, cost, diagnostics."""
    settings = data.get("settings") or {}
    progress = data.get("progress") or {}
    analysis = data.get("analysis") or {}
    verdict = analysis.get("verdict") or {}
    # the verdict needs the pre-registered arms only; an extra arm still running is said, not a partial verdict
    done = progress.get("pre_registered_done", progress.get("done"))
    complete = done is not None and done == progress.get("pre_registered_total", progress.get("total"))
    out = ["### Quality study: PreLort against the baselines per rank tier", ""]
    status = "" if complete else f" **PARTIAL: {progress.get('text', 'progress not recorded')}.**"
    if complete and progress.get("done") != progress.get("total"):
        status = f" Extra arms still running: {progress.get('text')}."
    protocol = (
        f'Protocol: [docs/quality-study.md](docs/quality-study.md) (fixed before the runs); "PreLort" '
        f"is `{settings.get('verdict_arm')}`; seeds compared: {analysis.get('seeds_compared')}."
    )
    if verdict and complete:
        out.append(f"**Verdict: {str(verdict.get('verdict')).upper()}** ({verdict.get('reason')}). {protocol}{status}")
    elif verdict:
        # a partial study's reading is interim: seeds still to come can move any CI across the rule's bounds
        out.append(
            f"{status.strip()} Interim reading of the decision rule on the seeds finished so far, not the "
            f"study's verdict: **{str(verdict.get('verdict')).upper()}** ({verdict.get('reason')}). "
            f"{protocol}"
        )
    else:
        why = analysis.get("note") or (
            f"the analysis failed: {analysis['error']}" if analysis.get("error") else "no analysis"
        )
        out.append(f"**No verdict yet**: {why}.{status}")
    cfg = data.get("config") or {}
    clients, train = cfg.get("clients") or {}, cfg.get("train") or {}
    out.append("")
    out.append(
        f"{cfg.get('model', {}).get('name')}, data `{(cfg.get('data') or {}).get('source')}`; "
        f"{cfg.get('rounds')} rounds x {clients.get('per_round')} of {clients.get('num')} clients (ranks "
        f"{clients.get('ranks')}, stratified sampling) x {train.get('local_steps')} local steps of batch "
        f"{train.get('batch_size')}; reported seeds {settings.get('seeds')}, lr per arm from "
        f"{settings.get('lr_grid')} on selection seed {settings.get('selection_seed')}; compute "
        f"{(data.get('cpu_seconds') or 0) / 3600:.1f} h of run wall time."
    )
    out.append("")
    comps = analysis.get("comparisons") or []
    if comps:
        out.append(
            "Paired difference of accuracy, PreLort minus each baseline (bootstrap over seeds, then examples; "
            "Holm-corrected over all tests; ★ = the tier's best baseline, whose Holm CI the verdict uses):"
        )
        out.append("")
        rows = [
            [
                c["tier"],
                c["baseline"] + (" ★" if c.get("best") else ""),
                f"{c['diff']:+.3f}",
                _ci_text(c["ci95"]),
                _ci_text(c["ci_holm"]),
                _num(c["p_holm"], 4),
                "yes" if c.get("significant") else "no",
                _num(c.get("mdd"), 3),
            ]
            for c in sorted(comps, key=lambda c: (c["tier"], _ordered([c["baseline"]])[0]))
        ]
        out.append(
            markdown(["tier", "baseline", "difference", "95% CI", "Holm CI", "Holm p", "significant", "MDD"], rows)
        )
        out.append("")
        mdd = analysis.get("mdd") or {}
        out.append(
            f"Minimum detectable difference ({mdd.get('how')}): against the best baseline per tier "
            + ", ".join(f"tier {t}: {v:.3f}" for t, v in (mdd.get("best_baseline_per_tier") or {}).items())
            + "; strictest Holm level: "
            + ", ".join(f"tier {t}: {v:.3f}" for t, v in (mdd.get("best_baseline_per_tier_strictest") or {}).items())
            + f"; median over all tests {_num(mdd.get('median_all'), 3)}."
        )
        out.append("")
    arms = analysis.get("arms") or {}
    if arms:
        tiers = sorted({int(t) for a in arms.values() for t in a.get("tiers", {})})
        rows = []
        for name, a in arms.items():
            cost = a.get("cost") or {}
            extra = " (extra, not pre-registered)" if name in (settings.get("extra_arms") or []) else ""
            rows.append(
                [name + extra]
                + [
                    f"{a['tiers'][str(t)]['accuracy']:.3f} {_ci_text(a['tiers'][str(t)]['ci95'], False)}"
                    if str(t) in a.get("tiers", {})
                    else "n/a"
                    for t in tiers
                ]
                + [
                    len(a.get("seeds", [])),
                    _num(cost.get("passes"), 0),
                    _num(cost.get("optimizer_steps"), 0),
                    fmt_seconds(cost.get("wall_seconds")),
                ]
            )
        base = analysis.get("base_model")
        if base:  # one adapter-free model: the same value in every tier
            cell = f"{base['accuracy']:.3f} {_ci_text(base['ci95'], False)}"
            rows.append(["untrained model (reference)"] + [cell] * len(tiers) + [len(base["seeds"]), 0, 0, "-"])
        out.append(
            "Accuracy per arm and tier with 95% CI; cost per run (forward/backward passes, optimizer steps, "
            "wall time; means over seeds):"
        )
        out.append("")
        out.append(markdown(["arm"] + [f"tier {t}" for t in tiers] + ["seeds", "passes", "steps", "wall"], rows))
        out.append("")
        ts = sorted({int(t) for a in arms.values() for t in a.get("curve", {})})
        if ts:
            out.append("Truncation curve (accuracy of the global model truncated to t, 95% CI):")
            out.append("")
            out.append(
                markdown(
                    ["arm"] + [f"t={t}" for t in ts],
                    [
                        [name]
                        + [
                            f"{a['curve'][str(t)]['accuracy']:.3f} {_ci_text(a['curve'][str(t)]['ci95'], False)}"
                            if str(t) in a.get("curve", {})
                            else "n/a"
                            for t in ts
                        ]
                        for name, a in arms.items()
                    ],
                )
            )
            out.append("")
        dims = {name: a["dim_steps_mean"] for name, a in arms.items() if a.get("dim_steps_mean")}
        if dims:
            width = max(len(v) for v in dims.values())
            bounds = sorted({int(r) for r in (clients.get("ranks") or [])} | {width})
            spans, lo = [], 0
            for b in bounds:
                if b > lo:
                    spans.append((lo, b))
                    lo = b
            out.append(
                "Optimizer steps that reached each rank segment over a run (mean over its dimensions and seeds; "
                "the under-trained-top-tier diagnostic):"
            )
            out.append("")
            out.append(
                markdown(
                    ["arm"] + [f"dims {a}-{b - 1}" for a, b in spans],
                    [
                        [name] + [_num(sum(v[a:b]) / max(1, len(v[a:b])), 1) if a < len(v) else "n/a" for a, b in spans]
                        for name, v in dims.items()
                    ],
                )
            )
            out.append("")
    for key, title in (
        ("equal_steps", "at equal optimizer steps (final round)"),
        ("equal_passes", "at equal forward/backward passes (last round within prelort-sample's passes)"),
    ):
        block = analysis.get(key) or {}
        rows = []
        for name, e in block.items():
            for t, c in (e.get("tiers") or {}).items():
                rows.append(
                    [
                        name,
                        t,
                        f"{c['diff']:+.3f}",
                        _ci_text(c["ci95"]),
                        _num(e.get("passes_ratio"), 2)
                        if key == "equal_steps"
                        else ", ".join(f"seed {s}: round {r}" for s, r in (e.get("rounds") or {}).items()),
                    ]
                )
        if rows:
            out.append(f"The other PreLort arms minus `{settings.get('verdict_arm')}` {title}:")
            out.append("")
            out.append(
                markdown(
                    [
                        "arm",
                        "tier",
                        "difference",
                        "95% CI",
                        "passes ratio" if key == "equal_steps" else "rounds compared",
                    ],
                    rows,
                )
            )
            out.append("")
    rows = [
        [name, t, c["baseline"], f"{c['diff']:+.3f}", _ci_text(c["ci95"])]
        for name, e in (analysis.get("exploratory") or {}).items()
        for t, c in e.items()
    ]
    if rows:
        out.append(
            "Exploratory, after the runs (not one of the tests, not in the verdict, no multiplicity "
            "correction): the other PreLort arms minus the tier's best baseline:"
        )
        out.append("")
        out.append(markdown(["arm", "tier", "best baseline", "difference", "95% CI"], rows))
        out.append("")
    out.extend(_study_selection(data))
    for plot in data.get("plots") or []:
        out.append(f"![paired differences per tier]({_link(plot, readme_dir)})")
        out.append("")
    out.append(provenance(data, "quality_study"))
    return "\n".join(out)


def _defences_line(runs: dict[str, Any]) -> list[str]:
    """The runs where an update defence acted (the protocol expects none), as one list item; none: nothing."""
    acted = sorted(key for key, rec in runs.items() if rec.get("defence_actions"))
    if not acted:
        return []
    return [
        f"- The update defences acted in {len(acted)} run(s), which the protocol expects never: {', '.join(acted)}."
    ]


STAGE_B_NOT_RUN = (
    "Stage B (repairing PreLort's local training, `python -m bench.quality_screen`) has not run: it runs only "
    "once stage A's gate has passed."
)


STAGE_C_NOT_RUN = (
    "Stage C (the confirmatory study, `python -m bench.quality_confirm`) has not run: it runs only once stage A's "
    "gate has passed and stage B has chosen its PreLort variant."
)


def quality_study_2_section(data: dict[str, Any], results_dir: Path, readme_dir: Path) -> str:
    """Study 2 (docs/quality-study-2.md): stage A, the federated gate per ladder step with each arm's lr grid,
    stage B, the screen of PreLort's repairs, and stage C, the confirmatory study (one line each while it has
    not run)."""
    parts = [quality_study_2_stage_a(data["stage_a"]) if "stage_a" in data else "Stage A has not run yet."]
    parts.append(quality_study_2_stage_b(data["stage_b"]) if "stage_b" in data else STAGE_B_NOT_RUN)
    parts.append(quality_study_2_stage_c(data["stage_c"]) if "stage_c" in data else STAGE_C_NOT_RUN)
    return "\n\n".join(parts)


# stage A's gate checks (bench/quality_gate.gate), as a reader needs them
GATE_CHECK_TEXT = {
    "mean_gap_at_least_0.10": "gap >= 0.10",
    "positive_on_every_seed": "gap > 0 on every seed",
    "ceiling_0.15_above_constant_guess": "rank 16 >= 0.15 above the constant guess",
}


def failed_gate_checks(gate: dict[str, Any]) -> list[str]:
    """The checks a stage-A gate failed, in words."""
    return [GATE_CHECK_TEXT.get(name, name) for name, ok in gate["checks"].items() if not ok]


def quality_study_2_stage_a(stage: dict[str, Any]) -> str:
    """Study 2, stage A: the federated gate per ladder step, with each arm's lr grid."""
    progress = stage.get("progress") or {}
    out = [
        "### Quality study 2, stage A: does rank pay in this federation? (federated gate)",
        "",
        "Protocol: [docs/quality-study-2.md](docs/quality-study-2.md), fixed before the first run. FedIT with every "
        "client at rank 16 (`ceiling`) against every client at rank 2 (`floor`), same clients, data, steps and "
        "scale s = 1; each arm at its best lr (mean accuracy over the pilot seeds); the gate passes iff the "
        "ceiling beats the floor by >= 0.10 on average and on every seed, and is >= 0.15 above the constant "
        "guess. A failed gate moves one step down the pre-declared ladder.",
        "",
        f"**Status:** {progress.get('text', 'no run yet')}; {stage.get('outcome', 'running')}. "
        f"Run time so far: {stage.get('cpu_seconds', 0) / 3600:.1f} h (the runs' wall time on 2 CPU cores, shared "
        "with other work while they ran). Constant guess (most common value per attribute) on the pilot seeds "
        "so far: "
        + (", ".join(f"{v:.3f} (seed {k})" for k, v in stage.get("constant_guess", {}).items()) or "-")
        + ".",
        "",
        "| step | arm | accuracy by lr (mean over pilot seeds; * best) | best lr | per seed at the best lr |",
        "|---|---|---|---|---|",
    ]
    seeds = [str(s) for s in stage["settings"]["seeds"]]
    for step, entry in stage.get("steps", {}).items():
        for arm, a in entry["arms"].items():
            scored = {g["lr"]: g for g in a.get("grid", [])}
            partial: dict[float, list[float]] = {}
            for rec in stage["runs"].values():
                if rec["step"] == step and rec["arm"] == arm:
                    partial.setdefault(rec["lr"], []).extend(rec["accuracy"].values())
            cells = []
            for lr in a["grid_lrs"]:
                if lr in scored:
                    mark = "*" if lr == a.get("best_lr") else ""
                    cells.append(f"{lr:g}: {scored[lr]['mean_accuracy']:.3f}{mark}")
                elif lr in partial:
                    vals = partial[lr]
                    cells.append(f"{lr:g}: {sum(vals) / len(vals):.3f} ({len(vals)} of {len(seeds)} seeds)")
                else:
                    cells.append(f"{lr:g}: -")
            best = a.get("best")
            per_seed = ", ".join(f"{best['accuracy'][s]:.3f}" for s in seeds) if best else "-"
            edge = " (grid edge)" if a.get("at_grid_edge") else ""
            best_lr = f"{a['best_lr']:g}{edge}" if "best_lr" in a else "-"
            out.append(f"| {step} | {arm} | {'; '.join(cells)} | {best_lr} | {per_seed} |")
    out.append("")
    for step, entry in stage.get("steps", {}).items():
        g = entry.get("gate")
        if g is None:
            out.append(f"- **{step}**: gate not decided yet (runs missing).")
            continue
        gaps = ", ".join(f"{v:+.3f}" for v in g["gap_per_seed"].values())
        failed = failed_gate_checks(g)
        out.append(
            f"- **{step}**: gate **{'passed' if g['passed'] else 'failed'}**: ceiling {g['ceiling_accuracy']:.3f}, "
            f"floor {g['floor_accuracy']:.3f}, gap {g['mean_gap']:+.3f} (per seed {gaps}), constant guess "
            f"{g['constant_guess']:.3f}" + (f"; failed checks: {', '.join(failed)}" if failed else "") + "."
        )
    out += _defences_line(stage["runs"])
    out += ["", f"Pilot seeds {', '.join(seeds)}. Command: `{stage['command']}`.", ""]
    out.append(stage_machines(stage))
    return "\n".join(out)


def quality_study_2_stage_b(stage: dict[str, Any]) -> str:
    """Study 2, stage B: each PreLort variant at each lr (per-tier accuracy over the selection seeds, score,
    eligibility, steps per rank dimension), and the choice."""
    settings = stage["settings"]
    seeds = [str(s) for s in settings["seeds"]]
    guess = stage.get("constant_guess") or {}
    choice = stage.get("choice")
    out = [
        "### Quality study 2, stage B: repairing PreLort's local training (screen on selection seeds)",
        "",
        f"Protocol: [docs/quality-study-2.md](docs/quality-study-2.md), fixed before the first run. PreLort at stage "
        f"A's step {settings['step']} ({settings['step_source']}): the unrepaired `sample` (V0) and three one-change "
        "repairs, each at the lrs "
        + ", ".join(f"{lr:g}" for lr in settings["lrs"])
        + f" ({settings['lr_source']}). Score: the mean over the seeds of the mean accuracy over the tiers; "
        "eligible iff every tier's mean accuracy is at least the constant guess.",
        "",
        # once chosen, the outcome is the choice, said once in its own line below
        f"**Status:** {(stage.get('progress') or {}).get('text', 'no run yet')}; "
        f"{'done' if choice else stage.get('outcome', 'running')}. "
        f"Run time so far: {stage.get('cpu_seconds', 0) / 3600:.1f} h. Constant guess: "
        + (", ".join(f"{v:.3f} (seed {k})" for k, v in guess.items()) or "-")
        + ".",
        "",
    ]
    if choice:
        out += [f"**Choice:** {choice['text']}.", ""]
    runs_by: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for rec in stage["runs"].values():
        if rec["step"] == settings["step"] and str(rec["seed"]) in seeds:
            runs_by.setdefault((rec["variant"], rec["lr"]), []).append(rec)
    tiers = sorted({t for recs in runs_by.values() for r in recs for t in r["accuracy"]}, key=int)
    starts = [0, *(int(t) for t in tiers[:-1])]  # each segment's first rank dimension
    header = [
        "variant",
        "lr",
        *(f"tier {t}" for t in tiers),
        "score",
        "eligible",
        "steps of dims " + " / ".join(f"{d}" for d in starts),
    ]
    rows = []
    for variant in settings["variants"]:
        scored = {g["lr"]: g for g in (stage.get("variants") or {}).get(variant, {}).get("grid", [])}
        chosen = (stage.get("variants") or {}).get(variant, {}).get("lr")
        for lr in settings["lrs"]:
            recs = runs_by.get((variant, lr), [])
            g = scored.get(lr)
            if g is not None:
                accs = [f"{g['tiers'][t]['accuracy']:.3f}" for t in tiers]
                score = f"{g['mean_accuracy']:.3f}" + ("*" if lr == chosen else "")
                eligible = "yes" if g["eligible"] else "no (tier " + ", ".join(g["tiers_below_constant_guess"]) + ")"
            elif recs:
                accs = [f"{sum(r['accuracy'][t] for r in recs) / len(recs):.3f}" for t in tiers]
                score, eligible = f"({len(recs)} of {len(seeds)} seeds)", "-"
            else:
                accs, score, eligible = ["-"] * len(tiers), "-", "-"
            dims = [r["dim_steps"] for r in recs if r.get("dim_steps")]
            steps = (
                " / ".join(f"{sum(d[i] for d in dims) / len(dims):.0f}" for i in starts if i < len(dims[0]))
                if dims
                else "-"
            )
            rows.append([f"`{variant}`", f"{lr:g}", *accs, score, eligible, steps])
    out += [markdown(header, rows), ""]
    out.append(
        "Tier accuracies: the mean over the selection seeds (per seed, with the log-likelihoods, in the JSON); * the "
        "variant's lr; steps of a dimension: the optimizer steps that moved it, summed over the run's clients and "
        "rounds, mean over the seeds."
    )
    out += _defences_line(stage["runs"])
    out += ["", f"Selection seeds {', '.join(seeds)}. Command: `{stage['command']}`.", ""]
    out.append(stage_machines(stage))
    return "\n".join(out)


def quality_study_2_stage_c(stage: dict[str, Any]) -> str:
    """Study 2, stage C: the arms and their lrs, then the verdict and its tables (:func:`stage_c_results`)."""
    settings = stage["settings"]
    lrs = stage.get("lrs") or {}
    out = [
        "### Quality study 2, stage C: the confirmatory study",
        "",
        f"Protocol: [docs/quality-study-2.md](docs/quality-study-2.md), fixed before the first run. At stage A's step "
        f"{settings['step']} ({settings['step_source']}): the verdict arm `{settings['verdict_arm']}` "
        f"({settings['verdict_arm_source']}) against five baselines whose lr was selected on the seeds "
        f"{', '.join(map(str, settings['selection_seeds']))}, FedIT (every client at rank 2) and the ceiling (every "
        f"client at rank 16, a reference); reported seeds {', '.join(map(str, settings['seeds']))}.",
        "",
        f"**Status:** {(stage.get('progress') or {}).get('text', 'no run yet')}; {stage.get('outcome', 'running')}. "
        f"Run time so far: {stage.get('cpu_seconds', 0) / 3600:.1f} h.",
        "",
        *stage_c_selection(stage),
        "Learning rates: "
        + (
            ", ".join(
                f"`{arm}` {_lr_text(stage, arm)}" if lr is not None else f"`{arm}` not chosen yet"
                for arm, lr in lrs.items()
            )
            if lrs
            else "the selected arms' not chosen yet (phase 1 running)"
        )
        + ".",
        "",
        *stage_c_results(stage),
    ]
    out += _defences_line(stage["runs"])
    out += ["", f"Command: `{stage['command']}`.", "", stage_machines(stage)]
    return "\n".join(out)


def _lr_text(stage: dict[str, Any], arm: str) -> str:
    """An arm's lr, with its lr scaling where phase 1 chose one (``0.005, sqrt-scaled``)."""
    lr = (stage.get("lrs") or {}).get(arm)
    if lr is None:
        return "-"
    scaling = ((stage.get("selection") or {}).get(arm) or {}).get("scaling")
    return f"{lr:g}" + (f", {scaling}-scaled" if scaling not in (None, "none") else "")


def stage_c_selection(stage: dict[str, Any]) -> list[str]:
    """Phase 1 as a table: each selected baseline's mean accuracy over the tiers and selection seeds at each
    (lr scaling, lr) candidate, the chosen one starred; nothing before any candidate is scored."""
    selection = stage.get("selection") or {}
    grid = stage["settings"].get("selection_grid") or []
    scalings = list(stage["settings"].get("lr_scalings") or {"none": {}})
    cells: dict[str, dict[tuple[str, float], str]] = {}
    for arm, entry in selection.items():
        for g in entry.get("grid") or []:
            key = (g.get("scaling", "none"), g["lr"])
            star = "*" if key == (entry.get("scaling") or "none", entry.get("lr")) else ""
            cells.setdefault(arm, {})[key] = f"{g['mean_accuracy']:.3f}{star}"
    if not cells:
        return []
    header = ["arm", *(f"{sc} scaling, lr {lr:g}" for sc in scalings for lr in grid)]
    rows = [[f"`{arm}`", *(c.get((sc, lr), "-") for sc in scalings for lr in grid)] for arm, c in cells.items()]
    return [
        "Phase 1, each selected baseline's lr scaling and lr (mean accuracy over the tiers and the selection seeds; "
        "* chosen; `sqrt`: `train.lr_rank_scaling: sqrt`, a client of rank r at lr x sqrt(16 / r)):",
        "",
        markdown(header, rows),
        "",
    ]


def _interval(ci: Sequence[float] | None) -> str:
    return f"[{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "-"


def stage_c_results(stage: dict[str, Any]) -> list[str]:
    """Stage C's verdict (PARTIAL with "k of M runs done" until every run is done), the decision table (per
    tier: the best baseline, the difference, the Holm and the 95% interval, the MDD) and the secondary
    endpoints; one line while no reported seed has every arm."""
    a = stage.get("analysis") or {}
    verdict = a.get("verdict")
    if not verdict:
        return [f"No verdict yet: {(stage.get('progress') or {}).get('text', 'no run yet')}."]
    partial = f" (PARTIAL: {stage['progress']['text']})" if verdict.get("partial") else ""
    arm = verdict["verdict_arm"]
    out = [
        f"**Verdict{partial}: {verdict['verdict'].upper()}** ({verdict['reason']}), `{arm}` against the best "
        f"baseline per tier on {len(a['seeds_compared'])} reported seed(s).",
        "",
    ]
    header = ["tier", "best baseline", "difference", "Holm CI", "95% CI", "MDD (a = 0.05 / 0.0125)", "significant"]
    rows = [
        [
            str(c["tier"]),
            f"`{c['baseline']}`",
            f"{c['diff']:+.3f}",
            _interval(c["ci_holm"]),
            _interval(c["ci95"]),
            f"{c['mdd']:.3f} / {c['mdd_strictest']:.3f}",
            "yes" if c["significant"] else "no",
        ]
        for c in a["decision_family"]
    ]
    out += [markdown(header, rows), ""]
    tiers = [str(c["tier"]) for c in a["decision_family"]]
    header = [
        "arm",
        "lr",
        *(f"tier {t} accuracy (95% CI)" for t in tiers),
        "passes per run",
        "s per round",
        "wall ÷ FedIT",
    ]
    rows = []
    runnable = [x for x in a["arms"] if x != "ceiling"]  # the ceiling is a reference no federation of these ranks has
    for name, e in a["arms"].items():
        best_at = {t for t in tiers if max(runnable, key=lambda x, t=t: a["arms"][x][t]["accuracy"]) == name}
        cells = [
            ("**{}**" if t in best_at else "{}").format(f"{e[t]['accuracy']:.3f}") + f" [{e[t]['ci95'][0]:.3f}, "
            f"{e[t]['ci95'][1]:.3f}]"
            for t in tiers
        ]
        rows.append([f"`{name}`", _lr_text(stage, name), *cells, *_cost_cells(e.get("cost") or {})])
    out += [
        "Which arm is best at each tier (bold; of the arms a heterogeneous federation can run: the ceiling, every "
        "client at rank 16, is a reference), at what lr and cost (mean over the reported seeds; wall ÷ FedIT: the run's "
        "wall time over FedIT's on the same seed, which compares across the machines the seeds ran on):",
        "",
        markdown(header, rows),
        "",
    ]
    weak = [str(c["tier"]) for c in a["decision_family"] if abs(c["diff"]) < c["mdd"]]
    if weak:
        out += [f"Differences below the MDD (weak evidence either way) at tier(s) {', '.join(weak)}.", ""]
    sec = a.get("secondary") or {}
    ll = sec.get("loglik") or {}
    if ll:
        out.append(
            "- Answer log-likelihood, `"
            + arm
            + "` minus the best baseline: "
            + "; ".join(f"tier {t} {ll[t]['diff']:+.3f} {_interval(ll[t]['ci95'])}" for t in tiers if t in ll)
            + "."
        )
    own = sec.get("own_vs_others") or {}
    for name in dict.fromkeys([arm, *(c["baseline"] for c in a["decision_family"])]):
        per_tier = own.get(name) or {}
        if per_tier:
            out.append(
                f"- Own vs others' facts, `{name}`: "
                + "; ".join(
                    f"tier {t} {per_tier[t]['own']['accuracy']:.3f} vs {per_tier[t]['others']['accuracy']:.3f}"
                    for t in tiers
                    if {"own", "others"} <= set(per_tier.get(t, {}))
                )
                + "."
            )
    gap = sec.get("gap_recovered") or {}
    if gap:
        out.append(
            f"- Gap recovered g = (A - F) / (C - F), F = FedIT {sec['floor_accuracy']:.3f}, C = the ceiling "
            f"{sec['ceiling_accuracy']:.3f}: "
            + "; ".join(
                f"`{name}` "
                + ", ".join(
                    f"tier {t} {g[t]['g']:.2f}"
                    + (f" [{g[t]['ci95'][0]:+.2f}, {g[t]['ci95'][1]:+.2f}]" if g[t]["ci95"] else "")
                    for t in tiers
                    if t in g
                )
                for name, g in gap.items()
            )
            + "."
        )
    out.append(
        "- Holm CI: the Holm-adjusted percentile interval across the 4 tiers (the decision); 95% CI: plain. The "
        "24 comparisons against every baseline (Holm across the 24) are in the JSON's `stage_c.analysis`."
    )
    return out


def poisoning_table(rows: Sequence[dict[str, Any]], tiers: Sequence[str]) -> str:
    """One row per run of bench/poisoning.py: what the hostile client's updates met, the global model's relative
    distance from the honest run, the perplexity per tier."""
    body = []
    for row in rows:
        body.append(
            [
                row["method"],
                row["attack"],
                row["arm"],
                f"{row['rejected']} / {row['clipped']} / {row['capped']}",
                "0 (reference)" if row["attack"] == "none" else f"{row['distance']:.3g}",
            ]
            + [f"{row['tiers'][t]['perplexity']:.5g}" if t in row["tiers"] else "n/a" for t in tiers]
        )
    header = ["method", "attack", "defences", "refused / clipped / capped", "distance from honest"]
    return markdown(header + [f"r{t} ppl" for t in tiers], body)


def poisoning_section(data: dict[str, Any], results_dir: Path, readme_dir: Path) -> str:
    settings = data.get("settings", {})
    clients = settings.get("clients", {})
    tiers = [str(t) for t in sorted(set(clients.get("ranks", [])))]
    out = ["### Poisoning: one hostile client of 8", ""]
    out.append(
        f"{(settings.get('model') or {}).get('name')}, {clients.get('num')} clients of ranks {clients.get('ranks')} "
        f"(all sampled), {settings.get('rounds')} rounds; client {data.get('hostile_client')} (rank 16, sharing "
        "dimensions 8-15 with one honest client) sends the attack every round. Defences `off`: only "
        "`validation.max_update_rms` (the bounds before issue 26); `defaults`: as shipped; `median`: the defaults "
        "plus `robust.aggregator: median`. Refused / clipped / capped: rounds in which the hostile client's update "
        "was refused, its change clipped, its num_examples capped (the honest rows: any client's). Distance: "
        "||dW - dW_honest||_F / ||dW_honest||_F over every module at full rank after the last round (`off` is "
        "compared with the honest `defaults` run, which no defence touched). The threat model and what each "
        "defence does and does not stop: [docs/security.md](docs/security.md)."
    )
    out.append("")
    out.append(poisoning_table(data.get("rows", []), tiers))
    out.append("")
    out.append(provenance(data, "poisoning"))
    return "\n".join(out)


SECTIONS: dict[str, Callable[[dict[str, Any], Path, Path], str]] = {
    "quality.json": quality_section,
    "quality_pilot.json": quality_pilot_section,
    "quality_study.json": quality_study_section,
    "quality_study_2.json": quality_study_2_section,
    "aggregation.json": aggregation_section,
    "communication.json": communication_section,
    "train_step.json": train_step_section,
    "quantization.json": quantization_section,
    "quantization_demo.json": quantization_demo_section,
    "poisoning.json": poisoning_section,
}


# the command that writes a results file not named after its script
RUN_COMMANDS = {
    "quantization_demo.json": "python -m bench.quantization --demo-only --json results/quantization_demo.json",
    "quality_study_2.json": "python -m bench.quality_gate --json results/quality_study_2.json",
}


CHOOSING = ROOT / "docs" / "choosing-a-method.md"


def _load_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise TablesError(f"{path}: not readable JSON: {exc}") from None
    if not isinstance(data, dict):
        raise TablesError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def choosing_summary(results_dir: Path) -> str | None:
    """The README's short answer: the recommendation and the study-2 status of docs/choosing-a-method.md."""
    page = choosing_a_method(results_dir)
    # once study 2 has its answer, that answer and PreLort's verdict; before, study 1's answer and study 2's state
    done = "(study 2, stage C, " in page
    paragraphs = [
        p.strip()
        for p in page.split("\n\n")
        if p.startswith(
            ("**Use", "PreLort (") if done else ("**Use", "Best baseline", "Stage A", "Stage B", "Stage C", "Study 2")
        )
    ]
    if not paragraphs:
        return None
    return "\n\n".join(
        [
            *paragraphs,
            "Details, costs and where the evidence is weak: [docs/choosing-a-method.md](docs/choosing-a-method.md).",
        ]
    )


def choosing_a_method(results_dir: Path) -> str:
    """docs/choosing-a-method.md: which method to use, from the studies' results (issue 25), generated."""
    study1 = _load_json(results_dir / "quality_study.json")
    study2 = _load_json(results_dir / "quality_study_2.json")
    out = [
        "# Choosing a method",
        "",
        "_Generated by `python -m bench.make_tables` from `results/quality_study.json` (study 1) and "
        "`results/quality_study_2.json` (study 2); do not edit by hand. What it says holds for the settings "
        "measured, nothing more._",
        "",
    ]
    if study1 is None:
        return "\n".join([*out, "No study has run yet: there is no evidence to choose by.", ""])
    a = study1["analysis"]
    arms = [arm for arm in study1["settings"]["arms"] if arm in a.get("arms", {})]
    if not arms:
        return "\n".join([*out, "Study 1 has no reported run yet: there is no evidence to choose by.", ""])
    tiers = sorted(a["arms"][arms[0]]["tiers"], key=int)
    best = {t: max(arms, key=lambda arm, t=t: a["arms"][arm]["tiers"][t]["accuracy"]) for t in tiers}
    verdict = dict(a.get("verdict") or {})
    if verdict.get("partial"):
        verdict["verdict"] = f"{verdict.get('verdict', 'n/a')} (PARTIAL: not every run is done)"
    # once study 2's stage C is done its answer leads the page, and study 1's follows as the earlier setting
    recommendation = study_2_recommendation((study2 or {}).get("stage_c"))
    out += [
        *(recommendation or []),
        "## Study 1: the earlier setting" if recommendation else "## What the evidence says today",
        "",
        "**Setting measured (study 1, [docs/quality-study.md](quality-study.md)):** SmolLM2-135M-Instruct on the "
        "`facts` task (fictional facts, one entity group per client), 8 clients of ranks 2/4/8/16, 4 per round "
        f"(one per rank), 10 rounds x 6 local steps, {len(a['arms'][arms[0]]['seeds'])} reported seeds x 300 "
        "held-out queries; each arm at the lr it chose on a selection seed.",
        "",
    ]
    # every PreLort arm against the best baseline per tier: the pre-registered tests (verdict arm) and the
    # exploratory 95% CIs (the other arms)
    vs_best = {(a["verdict"]["verdict_arm"], str(c["tier"])): c for c in a.get("comparisons", []) if c.get("best")}
    for arm, per_tier in a.get("exploratory", {}).items():
        vs_best.update({(arm, t): c for t, c in per_tier.items()})
    rows = sorted(vs_best.items(), key=lambda kv: (kv[0][0], int(kv[0][1])))
    above = [(arm, t, c) for (arm, t), c in rows if c["ci95"][0] > 0]
    ahead = [(arm, t, c) for (arm, t), c in rows if c["diff"] > 0 and c["ci95"][0] <= 0]
    baselines = sorted(set(a.get("best_baseline", {}).values()))
    if len(baselines) == 1 and not above:
        b = baselines[0]
        out.append(
            ("Study 1's answer: use" if recommendation else "**Use")
            + f" `{b}`{'' if recommendation else '**'} in a setting like study 1's (SmolLM2-135M, fictional facts, 8 clients of ranks 2/4/8/16, "
            f"{a['arms'][arms[0]]['cost']['optimizer_steps']:.0f} optimizer steps): it was the best baseline at every tier, and no PreLort "
            "variant was significantly above it at any tier. PreLort's pre-registered verdict: "
            f"**{str(verdict.get('verdict', 'n/a')).upper()}** ({verdict.get('reason', '')})."
        )
    else:
        out.append(
            ("Study 1's best baseline per tier: " if recommendation else "Best baseline per tier: ")
            + "; ".join(
                f"tier {t}: `{x}`" for t, x in sorted(a.get("best_baseline", {}).items(), key=lambda kv: int(kv[0]))
            )
            + f". PreLort's pre-registered verdict: **{str(verdict.get('verdict', 'n/a')).upper()}**."
        )
        for arm, t, c in above:
            out.append(
                f"- `{arm}` is above it at tier {t}: {c['diff']:+.3f} [{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}]."
            )
    if ahead:
        out += [
            "",
            "Higher point estimates whose 95% CI includes 0 (noise at this power): "
            + "; ".join(
                f"`{arm}` at tier {t} {c['diff']:+.3f} [{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}]"
                for arm, t, c in ahead
            )
            + " (against the best baseline; the other arms' CIs are exploratory, without multiplicity correction).",
        ]
    out += [
        "",
        "| arm | lr (selection seed) | "
        + " | ".join(f"tier {t} accuracy (95% CI)" for t in tiers)
        + " | passes per run "
        "| run time |",
        "|---|---|" + "---|" * len(tiers) + "---|---|",
    ]
    for arm in arms:
        e, sel = a["arms"][arm], study1["arms"].get(arm, {})
        lr = f"{sel['lr']:g}" + (" (grid edge)" if sel.get("at_grid_edge") else "") if "lr" in sel else "-"
        cells = []
        for t in tiers:
            x = e["tiers"][t]
            mark = "**" if best[t] == arm else ""
            cells.append(f"{mark}{x['accuracy']:.3f}{mark} [{x['ci95'][0]:.3f}, {x['ci95'][1]:.3f}]")
        out.append(
            f"| `{arm}` | {lr} | {' | '.join(cells)} | {e['cost']['passes']:.0f} | {e['cost']['wall_seconds'] / 60:.0f} min |"
        )
    mdd = a.get("mdd", {}).get("best_baseline_per_tier", {})
    out += [
        "",
        "## Where study 1's evidence is weak" if recommendation else "## Where the evidence is weak",
        "",
        f"- Study 1 could detect differences of about {min(mdd.values()):.2f}-{max(mdd.values()):.2f} accuracy "
        "(80% power, a = 0.05): smaller advantages would not have been seen."
        if mdd
        else "- No power figure.",
        "- The federated runs learned little: the best arm reached "
        f"{max(a['arms'][arm]['tiers'][t]['accuracy'] for arm in arms for t in tiers):.3f}, not far above "
        "always answering each attribute's most common value (study 2 computes that floor per seed). So study 1 "
        "says that in this setting rank did not pay, not that it cannot.",
        "- Learning rates chosen at the grid's edge (marked above) may not be the arm's best.",
        "- One model, one task family, one budget.",
        "",
        "## Does rank pay at all? (study 2, [docs/quality-study-2.md](quality-study-2.md))",
        "",
    ]
    stage = (study2 or {}).get("stage_a")
    if not stage:
        out.append("Study 2 has not run yet.")
    else:
        decided = {step: e["gate"] for step, e in stage.get("steps", {}).items() if e.get("gate")}
        progress = (stage.get("progress") or {}).get("text", "no run yet")
        if any(g["passed"] for g in decided.values()):
            step = next(s for s, g in decided.items() if g["passed"])
            g = decided[step]
            out.append(
                f"Stage A's gate **passed** at ladder step {step}: every client at rank 16 reached "
                f"{g['ceiling_accuracy']:.3f} against {g['floor_accuracy']:.3f} at rank 2 (gap {g['mean_gap']:+.3f}): "
                "letting clients train more rank can pay in that setting. Which method gets it is stage C's question."
            )
        elif decided and stage.get("outcome", "").endswith("(docs/quality-study-2.md: the study stops)"):
            out.append(
                "Stage A's gate **failed at every step of the ladder**: on this task family, at budgets a 2-core "
                "machine affords, no rank-aware method can beat everyone-at-the-smallest-rank, because rank is not "
                "what limits. Train every client at the smallest rank (`fedit`)."
            )
        else:
            failed = [
                f"{s} (rank 16 {g['ceiling_accuracy']:.3f}, rank 2 {g['floor_accuracy']:.3f}, gap "
                f"{g['mean_gap']:+.3f}; failed: " + ", ".join(failed_gate_checks(g)) + ")"
                for s, g in decided.items()
                if not g["passed"]
            ]
            out.append(
                f"Stage A (the federated gate) is running: {progress}"
                + (f"; gate failed at {', '.join(failed)}; next ladder step under way" if failed else "")
                + ". Until it answers, nothing here says that rank pays."
            )
        for step, e in stage.get("steps", {}).items():
            lrs = {arm: x.get("best_lr") for arm, x in e["arms"].items()}
            if all(v is not None for v in lrs.values()):
                out.append(
                    f"- Best learning rate per rank at {step}: rank 16 {lrs['ceiling']:g}, rank 2 {lrs['floor']:g}"
                    " (`train.lr_rank_scaling: sqrt` gives each rank its own step)."
                )
    if study2 is not None:
        out += ["", stage_b_summary(study2.get("stage_b")), "", stage_c_summary(study2.get("stage_c"))]
        if (study2.get("stage_c") or {}).get("analysis", {}).get("verdict"):
            out += ["", "## Stage C: the confirmatory study", "", *stage_c_results(study2["stage_c"])]
    return "\n".join(out) + "\n"


def _cost_cells(cost: dict[str, Any]) -> list[str]:
    """A stage-C arm's cost as table cells: passes per run, seconds per round, wall time ÷ FedIT's ("-" unknown)."""
    return [
        f"{cost['passes']:.0f}" if cost.get("passes") is not None else "-",
        f"{cost['wall_seconds'] / cost['rounds']:.0f}" if cost.get("wall_seconds") and cost.get("rounds") else "-",
        f"{cost['wall_vs_floor']:.2f}" if cost.get("wall_vs_floor") is not None else "-",
    ]


def _lr_per_rank_text(stage: dict[str, Any], arm: str) -> str:
    """``rank 2: 0.0141, rank 4: 0.01, ...``: the lr each client rank of ``arm`` trains at."""
    per_rank = (stage.get("lr_per_rank") or {}).get(arm) or {}
    return ", ".join(f"rank {r}: {lr:.3g}" for r, lr in sorted(per_rank.items(), key=lambda kv: int(kv[0]))) or "-"


def study_2_recommendation(stage: dict[str, Any] | None) -> list[str] | None:
    """docs/choosing-a-method.md's answer from stage C once every run is done (None before): the setting, which
    arm to run (per tier: the leader if its lead is significant, else the cheapest arm the evidence cannot tell
    from it; :func:`bench.quality_confirm.recommend`), at what lr per client rank, what it costs, PreLort's
    verdict, and where the evidence is weak."""
    a = (stage or {}).get("analysis") or {}
    verdict, rec = a.get("verdict"), a.get("recommendation")
    if not verdict or verdict.get("partial") or not rec:
        return None
    settings, cfg, arms = stage["settings"], stage.get("config") or {}, a["arms"]
    clients, train = cfg.get("clients") or {}, cfg.get("train") or {}
    tiers = sorted(rec, key=int)

    def acc(arm: str, t: str) -> str:
        e = arms[arm][t]
        return f"{e['accuracy']:.3f} [{e['ci95'][0]:.3f}, {e['ci95'][1]:.3f}]"

    uses = list(dict.fromkeys(rec[t]["use"] for t in tiers))
    setting = (
        f"`{(cfg.get('model') or {}).get('name', 'the model')}` on the `facts` task (fictional facts, one entity "
        f"group per client), {clients.get('num')} clients of ranks {'/'.join(map(str, clients.get('ranks', [])))}, "
        f"{clients.get('per_round')} per round (sampling: {clients.get('sampling', 'uniform')}), {cfg.get('rounds')} "
        f"rounds x {train.get('local_steps')} local steps at ladder step {settings['step']} "
        f"({', '.join(f'`{o}`' for o in settings.get('step_overrides') or []) or 'no change'}), "
        f"{len(a['seeds_compared'])} reported seeds x {(cfg.get('eval') or {}).get('max_examples')} held-out queries"
    )
    significant = [t for t in tiers if rec[t]["significant_lead"]]
    cheapest = [t for t in tiers if not rec[t]["significant_lead"]]
    reasons = []
    if significant:
        reasons.append(f"significantly above every other arm at tier(s) {', '.join(significant)}")
    if cheapest:
        reasons.append(
            f"at tier(s) {', '.join(cheapest)} no arm's lead is significant, and it is the cheapest of the arms the "
            "evidence cannot tell from the leader"
        )
    head = (
        f"**Use `{uses[0]}`** in a setting like study 2's: " + "; ".join(reasons) + "."
        if len(uses) == 1
        else "**Use** "
        + ", ".join(f"`{rec[t]['use']}` at tier {t}" for t in tiers)
        + " in a setting like study 2's: no one arm is the answer at every tier (below)."
    )

    def others(t: str) -> str:
        r = rec[t]
        return "; ".join(f"`{x}` {c['diff']:+.3f} {_interval(c['ci95'])}" for x, c in r["against"].items())

    out = [
        "## What the evidence says today",
        "",
        f"**Setting measured (study 2, stage C, [docs/quality-study-2.md](quality-study-2.md)):** {setting}; each "
        "arm at the lr (and lr scaling) it chose on the selection seeds. Tier t: the global adapter served at rank t.",
        "",
        head,
        "",
        "Per tier, the arm with the highest mean accuracy (the ceiling left out: no heterogeneous federation has it) "
        "against every other arm, paired 95% CIs; its lead is significant when all of them exclude 0. Where it is "
        "not, the cheapest arm the evidence cannot tell from it (wall time ÷ FedIT's) is the one to use. "
        "Exploratory: the pre-registered test is PreLort's verdict below.",
        "",
        markdown(
            ["tier", "use", "highest mean (95% CI)", "it minus each other arm (95% CI)", "lead significant"],
            [
                [
                    t,
                    f"`{rec[t]['use']}`",
                    f"`{rec[t]['leader']}` {acc(rec[t]['leader'], t)}",
                    others(t),
                    "yes" if rec[t]["significant_lead"] else "no",
                ]
                for t in tiers
            ],
        ),
        "",
        markdown(
            ["recommended", "lr per client rank", "passes per run", "s per round", "wall ÷ FedIT"],
            [[f"`{arm}`", _lr_per_rank_text(stage, arm), *_cost_cells(arms[arm].get("cost") or {})] for arm in uses],
        ),
        "",
        f"PreLort (`{verdict['verdict_arm']}`) against the best baseline per tier, pre-registered: "
        f"**{verdict['verdict'].upper()}** ({verdict['reason']}).",
        "",
        "Where the evidence is weak:",
        "",
    ]
    weak = [
        f"{c['tier']} ({abs(c['diff']):.3f} < {c['mdd']:.3f})"
        for c in a["decision_family"]
        if abs(c["diff"]) < c["mdd"]
    ]
    mdd = [c["mdd"] for c in a["decision_family"]]
    out.append(
        f"- The study could detect differences of {min(mdd):.3f}-{max(mdd):.3f} accuracy (80% power, a = 0.05)"
        + (
            f"; PreLort's differences from the best baseline are below that at tier(s) {', '.join(weak)}"
            if weak
            else ""
        )
        + "."
    )
    sec = a.get("secondary") or {}
    if "floor_accuracy" in sec:
        out.append(
            f"- Every client at rank 16 (the ceiling, which no heterogeneous federation has) reached "
            f"{sec['ceiling_accuracy']:.3f}, FedIT (every client at rank 2) {sec['floor_accuracy']:.3f}: the gap "
            "recovered per arm is in the stage C section below."
        )
    out += ["- One model, one task family, one budget.", ""]
    return out


def stage_b_summary(stage: dict[str, Any] | None) -> str:
    """Stage B in one paragraph: not run, running, or its choice."""
    if not stage:
        return STAGE_B_NOT_RUN
    progress = (stage.get("progress") or {}).get("text", "no run yet")
    choice = stage.get("choice")
    if not choice:
        return f"Stage B (repairing PreLort's local training) is running: {progress}."
    return (
        f"Stage B (repairing PreLort's local training, on selection seeds, {progress}) chose: {choice['text']}. "
        "That variant is the PreLort that stage C tests; stage B itself says nothing about PreLort against the "
        "baselines."
    )


def stage_c_summary(stage: dict[str, Any] | None) -> str:
    """Stage C in one paragraph: not run, running, or its verdict (PARTIAL until every run is done)."""
    if not stage:
        return STAGE_C_NOT_RUN
    progress = (stage.get("progress") or {}).get("text", "no run yet")
    verdict = (stage.get("analysis") or {}).get("verdict")
    if not verdict:
        return f"Stage C (the confirmatory study) is running: {progress}; no verdict yet."
    partial = f"PARTIAL, {progress}: " if verdict.get("partial") else ""
    return (
        f"Stage C (the confirmatory study, {progress}): `{verdict['verdict_arm']}` against the best baseline per "
        f"tier is **{partial}{verdict['verdict'].upper()}** ({verdict['reason']})."
    )


def render(results_dir: str | os.PathLike[str], readme_dir: str | os.PathLike[str] = ROOT) -> str:
    """The Markdown of the results section (without the markers)."""
    results = Path(results_dir)
    parts = ["_Generated by `python -m bench.make_tables` from `results/*.json`; do not edit by hand._", ""]
    summary = choosing_summary(results)
    if summary:
        parts += ["### Which method should I use?", "", summary, ""]
    missing = []
    for name, section in SECTIONS.items():
        path = results / name
        data = _load_json(path)
        if data is None:
            missing.append(name)
            continue
        try:
            parts += [section(data, results, Path(readme_dir)), ""]
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise TablesError(f"{path}: unexpected structure ({type(exc).__name__}: {exc})") from None
    if missing:
        scripts = ", ".join(f"`{RUN_COMMANDS.get(n, f'python -m bench.{n[:-5]} --json results/{n}')}`" for n in missing)
        parts += [f"Not run yet: {scripts}.", ""]
    return "\n".join(parts).rstrip() + "\n"


def replace_section(readme: str, body: str) -> str:
    """README text with the marked section replaced (or a ``## Results`` section appended)."""
    block = f"{BEGIN}\n{body}{END}"
    begin, end = readme.find(BEGIN), readme.find(END)
    if begin == -1 and end == -1:
        return readme.rstrip("\n") + "\n\n## Results\n\n" + block + "\n"
    if begin == -1 or end == -1 or end < begin or readme.count(BEGIN) > 1 or readme.count(END) > 1:
        raise TablesError(f"the README must hold exactly one {BEGIN} followed by one {END}")
    return readme[:begin] + block + readme[end + len(END) :]


def _read(path: Path) -> str | None:
    return path.read_text(encoding="utf-8") if path.is_file() else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, default=ROOT / "results", help="directory of the benchmark JSON files")
    p.add_argument("--readme", type=Path, default=ROOT / "README.md")
    p.add_argument(
        "--choosing",
        type=Path,
        default=None,
        help="where the generated recommendation page goes (default: docs/choosing-a-method.md beside --readme)",
    )
    p.add_argument("--check", action="store_true", help="exit 1 if the README section is out of date; write nothing")
    args = p.parse_args(argv)
    if args.choosing is None:
        args.choosing = args.readme.parent / CHOOSING.relative_to(ROOT)
    if not args.readme.is_file():
        raise SystemExit(f"{args.readme}: no such README")
    try:
        current = args.readme.read_text(encoding="utf-8")
        updated = replace_section(current, render(args.results, args.readme.resolve().parent))
    except TablesError as exc:
        raise SystemExit(f"make_tables: {exc}") from None
    try:
        choosing = choosing_a_method(args.results)
    except (TablesError, KeyError, TypeError, ValueError) as exc:
        raise SystemExit(f"make_tables: {args.choosing}: {exc}") from None
    if args.check:
        stale = [p for p, text in ((args.readme, updated), (args.choosing, choosing)) if _read(p) != text]
        for p in stale:
            print(f"{p}: out of date; run python -m bench.make_tables")
        if stale:
            return 1
        print(f"{args.readme} and {args.choosing}: up to date")
        return 0
    if _read(args.choosing) != choosing:
        args.choosing.parent.mkdir(parents=True, exist_ok=True)
        args.choosing.write_text(choosing, encoding="utf-8")
        print(f"rewrote {args.choosing}")
    if updated != current:
        tmp = args.readme.with_name(args.readme.name + ".tmp")
        tmp.write_text(updated, encoding="utf-8")
        os.replace(tmp, args.readme)
        print(f"rewrote the results section of {args.readme}")
    else:
        print(f"{args.readme}: already up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
