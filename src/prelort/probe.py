"""Which LoRA rank can this device afford? A few real training steps at each candidate rank, measured.

For each rank r, a fresh Python process (so one rank's peak is not another's: the peak resident set size of a
process never goes down) builds what a federation client at rank r holds, with the federation's own recipe
(:func:`prelort.recipe.load_federation_model`: the base model with a rank-R LoRA attached, R = r unless
``global_rank`` is given) and runs local training with prelort's trainer (:func:`prelort.train.train_client`):
one warm-up step, then ``steps`` timed optimizer steps, plain LoRA at rank r (nested mode ``off``).

The batch is ``batch_size`` examples of exactly ``max_length`` tokens whose every token is a response token
(the loss covers all of them): the largest a batch can be at that token limit, so the measured peak bounds what
real records of up to ``max_length`` tokens need.

Memory: on CPU the peak resident set size of the process (VmHWM on Linux, else ``getrusage``: libraries, model,
activations, optimizer state: what the operating system must give it); on CUDA ``torch.cuda.max_memory_allocated``
(tensors only, the CUDA context and the allocator's cache come on top).

A client of a federation holds the rank-R factors of the global adapter, masked to its rank r
(:mod:`prelort.adapters`): ``global_rank=R`` measures that case.
"""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "ProbeError",
    "ProbeReport",
    "RankMeasurement",
    "format_bytes",
    "format_table",
    "largest_rank_under",
    "measure_rank",
    "parse_memory",
    "parse_ranks",
    "probe",
]

MAX_RANK = 4096
# decimal and binary units, as `--memory-budget 4GB` / `4GiB` (case-insensitive); a bare number is bytes
_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_MEMORY = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*", re.IGNORECASE)


class ProbeError(ValueError):
    """Bad input to the probe (a rank list, a memory budget, a model that does not load): the message says which."""


@dataclass
class RankMeasurement:
    """One rank's measurement (``error`` set, and the numbers None, when its training failed)."""

    rank: int
    peak_memory_bytes: int | None = None
    memory_after_load_bytes: int | None = None  # the base model and libraries, before the first step
    seconds_per_step: float | None = None
    trainable_parameters: int | None = None
    error: str | None = None


@dataclass
class ProbeReport:
    model: str
    device: str
    memory: str  # what peak_memory_bytes measures: "rss" or "cuda_max_allocated"
    batch_size: int
    max_length: int
    steps: int
    global_rank: int | None
    memory_budget_bytes: int | None
    ranks: list[RankMeasurement] = field(default_factory=list)

    @property
    def largest_rank_under_budget(self) -> int | None:
        if self.memory_budget_bytes is None:
            return None
        return largest_rank_under(self.ranks, self.memory_budget_bytes)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["largest_rank_under_budget"] = self.largest_rank_under_budget
        return out


# ---------------------------------------------------------------------------------------------
# input
# ---------------------------------------------------------------------------------------------
def parse_ranks(text: str) -> list[int]:
    """``"2,4,8,16"`` -> [2, 4, 8, 16] (sorted, repeats dropped); each a whole number in 1..4096."""
    parts = [p.strip() for p in str(text).split(",")]
    if not any(parts):
        raise ProbeError("--ranks is empty; give comma-separated ranks, e.g. --ranks 2,4,8,16")
    ranks = []
    for p in parts:
        if not re.fullmatch(r"\d+", p) or not 1 <= int(p) <= MAX_RANK:
            raise ProbeError(
                f"--ranks {text!r}: {p!r} is not a rank (a whole number in 1..{MAX_RANK}); e.g. --ranks 2,4,8,16"
            )
        ranks.append(int(p))
    return sorted(set(ranks))


def parse_memory(text: str) -> int:
    """``"4GB"`` -> 4_000_000_000 bytes; ``"4GiB"`` -> 4 * 2**30; units B, KB, MB, GB, TB (powers of 1000) and
    KiB, MiB, GiB, TiB (powers of 1024), any case; a bare number is bytes."""
    m = _MEMORY.fullmatch(str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise ProbeError(
            f"--memory-budget {text!r} is not an amount of memory; write e.g. 4GB, 512MB or 8GiB "
            "(KB/MB/GB/TB: powers of 1000; KiB/MiB/GiB/TiB: powers of 1024)"
        )
    amount = int(float(m.group(1)) * _UNITS[unit])
    if amount <= 0:
        raise ProbeError(f"--memory-budget {text!r} must be more than 0 bytes")
    return amount


def format_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    # decimal units, as a budget is usually written (4GB)
    return f"{n / 1e9:.2f} GB" if n >= 10**9 else f"{n / 1e6:.0f} MB"


# ---------------------------------------------------------------------------------------------
# the decision and the table
# ---------------------------------------------------------------------------------------------
def largest_rank_under(measurements: Sequence[RankMeasurement], budget_bytes: int) -> int | None:
    """The largest rank whose training ran and peaked at or under ``budget_bytes`` (None: none did)."""
    fitting = [
        m.rank
        for m in measurements
        if m.error is None and m.peak_memory_bytes is not None and m.peak_memory_bytes <= budget_bytes
    ]
    return max(fitting) if fitting else None


def format_table(report: ProbeReport) -> str:
    """The report as a user reads it: one line per rank, then the answer for the budget."""
    memory = "peak RSS" if report.memory == "rss" else "peak CUDA alloc"
    held = f" (each holding rank-{report.global_rank} factors)" if report.global_rank else ""
    lines = [
        f"{report.model} on {report.device}{held}: batch {report.batch_size} x {report.max_length} tokens, "
        f"{report.steps} timed step(s) per rank after 1 warm-up step",
        f"{'rank':>5}  {memory:>15}  {'after load':>11}  {'s/step':>7}  {'LoRA params':>11}",
    ]
    for m in report.ranks:
        if m.error is not None:
            lines.append(f"{m.rank:>5}  failed: {m.error}")
            continue
        lines.append(
            f"{m.rank:>5}  {format_bytes(m.peak_memory_bytes):>15}  {format_bytes(m.memory_after_load_bytes):>11}  "
            f"{m.seconds_per_step:>7.3f}  {m.trainable_parameters:>11,}"
        )
    if report.memory_budget_bytes is not None:
        best = report.largest_rank_under_budget
        budget = format_bytes(report.memory_budget_bytes)
        lines.append(
            f"largest rank under {budget}: {best} (declare it on the site: rank={best})"
            if best is not None
            else f"no rank fits under {budget}: lower --batch-size or --max-length, or try smaller ranks"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# measuring (in a child process per rank)
# ---------------------------------------------------------------------------------------------
def _peak_rss_bytes() -> int:
    """This process's peak RSS since it started. On Linux the high-water mark of its own memory map (VmHWM):
    ``getrusage``'s ru_maxrss carries the parent's peak across fork and exec, so a probe started from a large
    process (a notebook holding a model, a test runner) would report that process's peak instead."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux


def measure_rank(
    model: str,
    rank: int,
    batch_size: int,
    max_length: int,
    steps: int,
    device: str = "auto",
    global_rank: int | None = None,
    seed: int = 0,
) -> RankMeasurement:
    """Train at ``rank`` in this process and measure it (module doc). Call it in a fresh process: the CPU
    peak is this process's, whatever it did before."""
    import torch

    from .adapters import LoraAdapter
    from .config import from_dict
    from .methods.base import TrainPlan
    from .recipe import load_federation_model
    from .train import train_client

    held = global_rank or rank
    cfg = from_dict(
        {
            "seed": seed,
            "model": {"name": model, "device": device},
            "clients": {"num": 1, "per_round": 1, "ranks": [held]},
            "data": {"max_length": max_length},
            "train": {"batch_size": batch_size, "local_steps": steps},
        }
    )
    _, _, peft_model = load_federation_model(cfg)
    adapter = LoraAdapter(peft_model)
    if rank != held:  # a federation client: rank-R factors, loaded at its rank r
        adapter.load_state(adapter.read_state(rank), rank)
    on_cuda = next(peft_model.parameters()).device.type == "cuda"
    if on_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    after_load = torch.cuda.memory_allocated() if on_cuda else _peak_rss_bytes()

    vocab = peft_model.config.vocab_size
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(batch_size):
        ids = torch.randint(0, vocab, (max_length,), generator=generator).tolist()
        examples.append({"input_ids": ids, "labels": ids})  # every token a response token: the largest loss
    plan = TrainPlan(rank=rank, truncations=(rank,), mode="off")
    train_client(peft_model, examples, plan, cfg.train.model_copy(update={"local_steps": 1}), seed)  # warm-up
    timed = train_client(peft_model, examples, plan, cfg.train, seed)
    if on_cuda:
        torch.cuda.synchronize()
    trainable = sum(p.numel() for p in adapter.parameters())
    return RankMeasurement(
        rank=rank,
        peak_memory_bytes=int(torch.cuda.max_memory_allocated() if on_cuda else _peak_rss_bytes()),
        memory_after_load_bytes=int(after_load),
        seconds_per_step=timed.meta["seconds"] / steps,
        trainable_parameters=int(trainable),
    )


def _child_main(request_file: str) -> None:
    """Entry point of the per-rank process: read the request JSON, measure, write the answer JSON beside it.
    A model that does not load is a ``load`` error (the probe stops: every rank would fail the same way)."""
    request = json.loads(Path(request_file).read_text())
    answer_file = Path(request_file).with_suffix(".answer.json")
    try:
        from .recipe import quiet_libraries

        quiet_libraries()
        result = asdict(measure_rank(**request))
    except Exception as e:  # noqa: BLE001 - reported to the parent in one line
        message = " ".join(str(e).split()) or type(e).__name__
        load_failure = type(e).__name__ in ("ModelLoadError", "ConfigError") or isinstance(e, (OSError, ImportError))
        result = {"error": f"{type(e).__name__}: {message}", "stage": "load" if load_failure else "train"}
    answer_file.write_text(json.dumps(result))


def _run_in_child(request: dict[str, Any], workdir: Path) -> RankMeasurement:
    request_file = workdir / f"rank-{request['rank']}.json"
    request_file.write_text(json.dumps(request))
    answer_file = request_file.with_suffix(".answer.json")
    package_root = str(Path(__file__).resolve().parents[1])  # so the child imports this prelort
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from prelort.probe import _child_main; _child_main(sys.argv[1])"]
        + [str(request_file)],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    if not answer_file.is_file():
        why = (
            f"killed by signal {-proc.returncode} (out of memory?)"
            if proc.returncode < 0
            else f"exited with code {proc.returncode}: " + " ".join(proc.stderr.strip().splitlines()[-1:])
        )
        return RankMeasurement(rank=request["rank"], error=why)
    answer = json.loads(answer_file.read_text())
    if answer.get("stage") == "load":
        raise ProbeError(f"model {request['model']!r} did not load: {answer['error']}")
    if answer.get("error") is not None:
        return RankMeasurement(rank=request["rank"], error=answer["error"])
    return RankMeasurement(**answer)


def probe(
    model: str,
    ranks: Sequence[int],
    batch_size: int = 8,
    max_length: int = 128,
    steps: int = 3,
    memory_budget_bytes: int | None = None,
    device: str = "auto",
    global_rank: int | None = None,
    progress=None,
) -> ProbeReport:
    """Measure every rank of ``ranks`` in its own process (module doc). ``progress(measurement)`` is called
    after each rank. Raises :class:`ProbeError` on bad input or a model that does not load."""
    if not ranks:
        raise ProbeError("no ranks to probe")
    for name, value, least in (("--batch-size", batch_size, 1), ("--max-length", max_length, 8), ("--steps", steps, 1)):
        if value < least:
            raise ProbeError(f"{name} must be at least {least}, got {value}")
    if global_rank is not None and global_rank < max(ranks):
        raise ProbeError(f"--global-rank {global_rank} is below the largest probed rank {max(ranks)}")
    from .model_names import check_model_name
    from .models import resolve_device

    check_model_name(model)  # a mistyped alias or an unreachable hub id fails in seconds
    try:
        resolved = resolve_device(device)
    except ValueError as e:
        raise ProbeError(str(e).replace("model.device", "--device")) from None
    report = ProbeReport(
        model=model,
        device=str(resolved),
        memory="cuda_max_allocated" if resolved.type == "cuda" else "rss",
        batch_size=batch_size,
        max_length=max_length,
        steps=steps,
        global_rank=global_rank,
        memory_budget_bytes=memory_budget_bytes,
    )
    with tempfile.TemporaryDirectory(prefix="prelort-probe-") as tmp:
        for r in ranks:
            request = {
                "model": model,
                "rank": r,
                "batch_size": batch_size,
                "max_length": max_length,
                "steps": steps,
                "device": str(resolved),
                "global_rank": global_rank,
            }
            measurement = _run_in_child(request, Path(tmp))
            report.ranks.append(measurement)
            if progress is not None:
                progress(measurement)
    return report
