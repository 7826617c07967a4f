"""``prelort check RUN_DIR``: does a run directory follow the run-directory contract (docs/design.md section 8)?

It checks names, shapes and fields, not whether any number is right: the files a finished run leaves
(config.yaml with its key settings, metrics.jsonl, summary.csv, run.log, plots/*.png), every evaluation
record's fields and ranges (no record twice), every checkpoint (round-0 first; safetensors keys
``<module>.lora_A|lora_B|delta``, finite values, matching A/B ranks; state.json; its files against its
checksums.json, which a checkpoint of an earlier version lacks), every audited update (JSON beside it,
declared rank = the tensors' rank dimension), the exported PEFT adapters and, where present, the optional
``tb/`` (a directory) and ``eval/lm-eval-*.json`` (JSON objects with round, rank and results).
Nothing is unpickled: safetensors, JSON and YAML only. The files are found and read through
:class:`~prelort.rundir.RunDir`; what is checked in them is this module's.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from .checkpoint import CHECKSUM_FILE, CheckpointError
from .metrics import available as available_metrics
from .metrics import names as metric_names
from .rundir import RunDir

CONFIG_KEYS = (
    "method",
    "seed",
    "rounds",
    "audit",
    "engine",
    "model.name",
    "lora.alpha",
    "clients.num",
    "clients.per_round",
    "clients.ranks",
)


def _round_of(path: Path) -> int | None:
    try:
        return int(path.name.split("-", 1)[1])
    except (IndexError, ValueError):
        return None


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def federated_eval_problems(rec: dict[str, Any]) -> list[str]:
    """What is wrong with an on-site evaluation record (kind ``federated_eval``): a positive tier, whole counts
    with ``correct <= n``, at least one site, a finite log-likelihood sum <= 0."""

    def whole(v: Any, low: int) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= low

    out = [
        f"federated_eval {k} {rec.get(k)!r} is not an integer >= {low}"
        for k, low in _FEDERATED_COUNTS
        if not whole(rec.get(k), low)
    ]
    if whole(rec.get("n"), 1) and whole(rec.get("correct"), 0) and rec["correct"] > rec["n"]:
        out.append(f"federated_eval correct {rec['correct']} exceeds n {rec['n']}")
    if "tokens" in rec and rec["tokens"] is not None and not whole(rec["tokens"], 1):
        out.append(f"federated_eval tokens {rec['tokens']!r} is not an integer >= 1")
    loglik = rec.get("loglik_sum")
    if not (_number(loglik) and math.isfinite(loglik) and loglik <= 0):
        out.append(f"federated_eval loglik_sum {loglik!r} is not a finite log-likelihood <= 0")
    return out


_FEDERATED_COUNTS = (("rank", 1), ("n", 1), ("correct", 0), ("sites", 1))


def check_run_dir(run_dir: str | Path) -> list[str]:
    """Every deviation of ``run_dir`` from the contract, one line each (empty: it follows the contract)."""
    import numpy as np
    import yaml
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    directory = RunDir(run_dir)
    run = directory.path
    if not run.is_dir():
        return [f"{run} is not a directory"]
    problems: list[str] = []

    def need(cond: Any, msg: str) -> bool:
        if not cond:
            problems.append(msg)
        return bool(cond)

    def tensors(path: Path) -> dict[str, Any] | None:
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            problems.append(f"{path.relative_to(run)} is not a readable safetensors file: {e}")
            return None

    for path in (directory.config_file, directory.metrics_file, directory.summary_csv, directory.log_file):
        need(path.is_file(), f"missing {path.name}")
    need(any(directory.plots_dir.glob("*.png")), "no plots/*.png")

    cfg: Any = {}
    if directory.config_file.is_file():
        try:
            cfg = directory.read_config_data() or {}
        except yaml.YAMLError as e:
            problems.append(f"config.yaml is not YAML: {e}")
    if not need(isinstance(cfg, dict), "config.yaml is not a mapping"):
        cfg = {}
    for dotted in CONFIG_KEYS:
        node: Any = cfg
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        need(node is not None, f"config.yaml lacks {dotted}")

    if directory.metrics_file.is_file():
        lines = [line for line in directory.metrics.read_text().splitlines() if line.strip()]
        need(lines, "metrics.jsonl is empty")
        seen: dict[tuple[Any, ...], int] = {}
        for i, line in enumerate(lines, 1):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append(f"metrics.jsonl line {i} is not JSON: {e}")
                continue
            if not need(isinstance(rec, dict), f"metrics.jsonl line {i} is not a JSON object"):
                continue
            if any(m in rec for m in metric_names()):
                for key in ("round", "rank", *metric_names()):
                    need(key in rec, f"metrics.jsonl line {i} lacks {key!r}")
                for metric in available_metrics():
                    problem = metric.check(rec.get(metric.name))
                    need(problem is None, f"metrics.jsonl line {i}: {problem}")
            if rec.get("kind") == "federated_eval":
                problems += [f"metrics.jsonl line {i}: {p}" for p in federated_eval_problems(rec)]
            key = (rec.get("kind"), rec.get("round"), json.dumps(rec.get("rank")))
            if rec.get("kind") is not None:
                if key in seen:
                    problems.append(
                        f"metrics.jsonl line {i} repeats line {seen[key]} (kind {rec.get('kind')}, "
                        f"round {rec.get('round')}, rank {rec.get('rank')})"
                    )
                else:
                    seen[key] = i

    ckpts = sorted((p for p in directory.checkpoints_dir.glob("round-*") if _round_of(p) is not None), key=_round_of)
    need(ckpts and ckpts[0].name == "round-0", "no checkpoints/round-0 (the initial global adapter)")
    for c in ckpts:
        f = c / "adapter.safetensors"
        if not need(f.is_file(), f"{c.name} lacks adapter.safetensors"):
            continue
        # without checksums.json (an earlier version's checkpoint) the readability check below is all there is
        if need((c / "state.json").is_file(), f"{c.name} lacks state.json") and (c / CHECKSUM_FILE).is_file():
            try:  # one flipped bit leaves the file readable and finite: only its checksum tells
                directory.verify_checkpoint(_round_of(c))
            except CheckpointError as e:
                problems.append(str(e).replace(f"{run}{os.sep}", ""))  # the file named relative to the run
        t = tensors(f)
        for key, x in (t or {}).items():
            mod, _, kind = key.rpartition(".")
            need(kind in ("lora_A", "lora_B", "delta"), f"{c.name}: key {key} is not <module>.lora_A|lora_B|delta")
            need(np.isfinite(x).all(), f"{c.name}: {key} has non-finite values")
            if kind == "lora_A":
                b = t.get(mod + ".lora_B")  # type: ignore[union-attr]
                if need(b is not None, f"{c.name}: {key} without {mod}.lora_B"):
                    need(
                        x.ndim == 2 and b.ndim == 2 and x.shape[0] == b.shape[1],
                        f"{c.name}: {mod} A rows {x.shape[0]} != B cols {b.shape[-1]}",
                    )

    for u in directory.update_files():
        m = u.with_suffix(".json")
        if not need(m.is_file(), f"{u.relative_to(run)} has no {m.name}"):
            continue
        try:
            meta = json.loads(m.read_text())
        except json.JSONDecodeError as e:
            problems.append(f"{m.relative_to(run)} is not JSON: {e}")
            continue
        if not need(isinstance(meta, dict), f"{m.relative_to(run)} is not a JSON object"):
            continue
        rank = meta.get("rank")
        need(
            isinstance(rank, int) and not isinstance(rank, bool) and rank > 0,
            f"{m.relative_to(run)}: bad rank {rank!r}",
        )
        need(_number(meta.get("num_examples")) and meta["num_examples"] > 0, f"{m.relative_to(run)}: bad num_examples")
        for key, x in (tensors(u) or {}).items():
            kind = key.rpartition(".")[2]
            dim = x.shape[0] if kind == "lora_A" else x.shape[1] if kind == "lora_B" and x.ndim == 2 else None
            need(dim == rank, f"{u.relative_to(run)}: {key} rank dim {dim} != declared rank {rank}")

    for a in directory.adapter_dirs():
        need(
            (a / "adapter_config.json").is_file() and (a / "adapter_model.safetensors").is_file(),
            f"{a.relative_to(run)} is not a PEFT adapter directory",
        )
    need(directory.adapter_dirs(), "no adapters/rank-T")

    # optional files: TensorBoard's tb/ (tracking), the scores of prelort eval --lm-eval
    need(not directory.tb_dir.exists() or directory.tb_dir.is_dir(), "tb exists and is not a directory")
    for path in directory.lm_eval_files():
        name = path.relative_to(run)
        try:
            scores = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            problems.append(f"{name} is not JSON: {e}")
            continue
        if need(isinstance(scores, dict), f"{name} is not a JSON object"):
            for key in ("round", "rank", "results"):
                need(key in scores, f"{name} lacks {key!r}")
    return problems


def summary(run_dir: str | Path) -> str:
    """One line for a run that follows the contract."""
    directory = RunDir(run_dir)
    run = directory.path
    rounds = directory.checkpoint_rounds()  # the run passed the check: every round-N is a checkpoint directory
    adapters = sorted(p.name for p in directory.adapter_dirs())
    return (
        f"{run} follows the run-directory contract: checkpoints of rounds {rounds[0]}..{rounds[-1]}, "
        f"adapters {', '.join(adapters)}"
    )
