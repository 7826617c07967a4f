"""Server aggregation benchmark: time and peak memory of each method's ``aggregate`` (issue 6, item 2).

For N clients with ranks drawn (seeded) from {2, 4, 8, 16, 32, 64}, at a real model's attention
shapes (random tensors, shapes only), this measures per method:

* aggregate time: wall time of ``method.aggregate(state, updates)`` minus the time the update
  generator itself spent creating the updates (updates are created lazily, one at a time, by
  cloning a per-rank template, so only what the aggregator keeps stays alive);
* broadcast preparation: one ``method.broadcast(new_state, r)`` per distinct rank of the round
  (FlexLoRA's SVDs happen here), timed on the first ``--bcast-layers`` layers and scaled by the
  number of layers (every layer has the same shapes), said so in the output;
* the memcpy reference: copying exactly the same update tensors (same sizes, same order, freshly
  generated the same way) into preallocated buffers; PreLort's bandwidth = bytes of the updates
  read / aggregate time, compared with memcpy bytes / memcpy time;
* peak server memory: the rise of the process's resident set (Linux VmHWM, reset through
  /proc/self/clear_refs just before the call) over the resident set at the start of the call,
  in a fresh process per case. It counts everything the call holds at its peak: the output state,
  the aggregator's sums and temporaries, whatever updates it retains, and the generator's current
  update. PreLort, zero-padding, HetLoRA and FedIT stream into two sums through a bounded buffer
  (``factor_sums.FactorSums``: flushed, module-major, at 8 updates or 64 MiB), so their peak does
  not grow with N.
* the round's fixed cost: ``aggregate()`` with no update at all (allocating the sums, writing the
  new state); it scales with the global state, not with N, and is printed beside the bandwidth.

Slow methods (FlexLoRA: one dense product per client and module; FLoRA: keeps every update and
stacks them) are measured on the first ``--max-clients-slow`` clients of the same draw when N is
larger; the JSON says how many clients were measured, and any figure at N derived from them is
marked as extrapolated.

Measuring returns data (:func:`run_benchmark`, one :func:`run_case` per case, :func:`summarise` for the goals);
the text is made by :func:`format_model_report`; only :func:`main` prints and writes the JSON.

Run:  python -m bench.aggregation [--quick] [--json results/aggregation.json]
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import math
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from prelort.factor_sums import FactorSums
from prelort.methods import ClientUpdate, FederationSpec, build, key

from ._common import (
    ALPHA,
    MODELS,
    RANK_CHOICES,
    draw_examples,
    draw_ranks,
    environment,
    fmt_bytes,
    fmt_seconds,
    method_order,
    method_sort_key,
    parse_ints,
    parse_methods,
    parse_models,
    status_kib,
    table,
    write_json,
)

# The repository root: the worker of a case runs there as ``python -m bench.aggregation``.
ROOT = Path(__file__).resolve().parents[1]
RESULT_MARKER = "@@AGGREGATION-RESULT@@ "
# The streaming methods' buffer (factor_sums.FactorSums defaults): it may hold this much whatever N is.
_BUFFER_DEFAULTS = inspect.signature(FactorSums).parameters
BUFFER_CLIENTS = _BUFFER_DEFAULTS["buffer_clients"].default
BUFFER_BYTES = _BUFFER_DEFAULTS["buffer_bytes"].default
SLOW_METHODS_DEFAULT = "flexlora,flora"
# Goals of issue 6.
SPEEDUP_GOAL = 100.0
BANDWIDTH_GOAL = 0.30

MEMORY_NOTE = (
    "peak_rss_rise_bytes = peak resident set during aggregate() minus the resident set when it starts, "
    "in a fresh process per case (Linux VmHWM reset via /proc/self/clear_refs right before the call; "
    "fallback: RSS sampled every 1 ms in a thread). It includes the output state, the aggregator's sums and "
    "temporaries, every update it retains, and the generator's current update (updates are created one at "
    "a time and dropped by the generator; the streaming aggregators flush their buffer at 8 updates or 64 MiB)."
)
TIME_NOTE = (
    "CPU time = time.thread_time() of the one compute thread (torch runs with --threads, default 1), so time "
    "the process spends descheduled on a shared machine is not counted; the goals use CPU time, wall time is "
    "reported beside it (*_s vs *_cpu_s). "
    "aggregate_s = wall time of method.aggregate() minus the time spent inside the update generator "
    "(cloning each client's tensors from a per-rank template); best of --repeats runs (default 3, the same for "
    "every method and N; peak memory is taken on the first run, in a fresh process). "
    "broadcast_s = one method.broadcast(new_state, r) per distinct rank of the round (FlexLoRA's SVDs, "
    "FLoRA's dense copies), timed on the first bcast_layers_measured layers and scaled by layers / measured "
    "(identical shapes per layer). server_round_s = aggregate_s + broadcast_s. Torch CPU, float32 updates."
)
BANDWIDTH_NOTE = (
    "memcpy reference: the same update tensors (same sizes and order, generated the same way) copied with "
    "Tensor.copy_ into preallocated buffers, best of --repeats passes; memcpy_GBps = bytes / copy time (memcpy_cpu_GBps: CPU time). A method's bandwidth = bytes of "
    "the updates it reads / aggregate_s. memcpy_bulk_GBps is one 256 MiB buffer copy, for scale."
)


# --------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Settings:
    """What one run of the benchmark measures (``settings_from_args`` makes it from the command line, whose
    help says what each field means)."""

    models: tuple[str, ...]  # keys of _common.MODELS
    clients: tuple[int, ...]  # the N of each round measured
    methods: tuple[str, ...]
    slow_methods: frozenset[str]  # measured on at most max_clients_slow clients
    max_clients_slow: int  # 0: all
    bcast_layers: int
    seed: int
    repeats: int
    threads: int  # 0: torch's choice
    isolation: str  # "process" (a fresh Python process per case) or "inline"
    case_timeout: float
    quick: bool
    argv: tuple[str, ...]  # the command line, recorded in the results

    def record(self) -> dict:
        """The ``settings`` of the results JSON."""
        return {
            "models": list(self.models),
            "clients": list(self.clients),
            "methods": list(self.methods),
            "rank_choices": list(RANK_CHOICES),
            "seed": self.seed,
            "alpha": ALPHA,
            "max_clients_slow": self.max_clients_slow,
            "slow_methods": sorted(self.slow_methods),
            "bcast_layers": self.bcast_layers,
            "isolation": self.isolation,
            "threads": self.threads,
            "repeats": self.repeats,
            "federation": "the N participants plus one idle client per rank choice (R = 64, r_min = 2 for every N)",
            "quick": self.quick,
            "argv": list(self.argv),
        }


# --------------------------------------------------------------------------------------------- memory


def current_rss() -> int:
    kib = status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    import psutil

    return int(psutil.Process().memory_info().rss)


class PeakRss:
    """Peak resident set of this process over a ``with`` block.

    Preferred: reset the kernel's high-water mark (writing "5" to /proc/self/clear_refs) and read
    VmHWM after, which sees every page ever resident. Fallback: sample RSS every millisecond.
    """

    def __init__(self) -> None:
        self.method = ""
        self.start = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakRss:
        gc.collect()
        self.start = current_rss()
        try:
            Path("/proc/self/clear_refs").write_text("5")
            hwm = status_kib("VmHWM")
            if hwm is None:
                raise OSError("no VmHWM")
            self.method = "VmHWM"
        except OSError:
            self.method = "sampled-1ms"
            self.peak = self.start
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, current_rss())
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, current_rss())
        else:
            self.peak = (status_kib("VmHWM") or 0) * 1024

    @property
    def rise(self) -> int:
        return max(0, self.peak - self.start)


# --------------------------------------------------------------------------------------------- updates
def make_templates(
    modules: dict[str, tuple[int, int]], ranks: set[int], seed: int
) -> dict[int, dict[str, torch.Tensor]]:
    """One random update per distinct rank: A (r x d_in), B (d_out x r), float32, small values."""
    g = torch.Generator().manual_seed(seed)
    out: dict[int, dict[str, torch.Tensor]] = {}
    for r in sorted(ranks):
        tensors: dict[str, torch.Tensor] = {}
        for module, (d_out, d_in) in modules.items():
            tensors[key(module, "lora_A")] = torch.randn(r, d_in, generator=g) * 0.02
            tensors[key(module, "lora_B")] = torch.randn(d_out, r, generator=g) * 0.02
        out[r] = tensors
    return out


class UpdateStream:
    """Client updates created lazily, one at a time (fresh tensors cloned from a per-rank template).

    ``gen_seconds`` is the time spent inside the generator, ``nbytes`` the bytes it handed out.
    The generator drops its own reference after each yield, so only the consumer can keep an update.
    """

    def __init__(self, templates: dict[int, dict[str, torch.Tensor]], ranks: list[int], examples: list[int]):
        self.templates = templates
        self.ranks = ranks
        self.examples = examples
        self.gen_seconds = 0.0
        self.gen_cpu_seconds = 0.0
        self.nbytes = 0
        self.count = 0

    def __iter__(self) -> Iterator[ClientUpdate]:
        for client, (rank, n) in enumerate(zip(self.ranks, self.examples)):
            t0, c0 = time.perf_counter(), time.thread_time()
            tensors = {name: t.clone() for name, t in self.templates[rank].items()}
            update = ClientUpdate(client=client, rank=rank, num_examples=n, tensors=tensors)
            self.nbytes += sum(t.nbytes for t in tensors.values())
            self.count += 1
            self.gen_seconds += time.perf_counter() - t0
            self.gen_cpu_seconds += time.thread_time() - c0
            del tensors
            yield update
            del update


def memcpy_reference(
    templates: dict[int, dict[str, torch.Tensor]], ranks: list[int], examples: list[int], repeats: int = 3
) -> dict:
    """Copy exactly the tensors an aggregator reads into preallocated buffers; time the copies only
    (best of ``repeats`` passes, as for the aggregate)."""
    dst = {(r, name): torch.empty_like(t) for r, tensors in templates.items() for name, t in tensors.items()}
    copy_s = copy_cpu_s = math.inf
    for _ in range(repeats):
        stream = UpdateStream(templates, ranks, examples)
        pass_s = pass_cpu_s = 0.0
        for update in stream:
            t0, c0 = time.perf_counter(), time.thread_time()
            for name, t in update.tensors.items():
                dst[(update.rank, name)].copy_(t)
            pass_s += time.perf_counter() - t0
            pass_cpu_s += time.thread_time() - c0
        copy_s, copy_cpu_s = min(copy_s, pass_s), min(copy_cpu_s, pass_cpu_s)
    del dst
    bulk_src = torch.ones(64 * 1024 * 1024)  # 256 MiB
    bulk_dst = torch.empty_like(bulk_src)
    bulk_s = math.inf
    for _ in range(3):
        t0 = time.perf_counter()
        bulk_dst.copy_(bulk_src)
        bulk_s = min(bulk_s, time.perf_counter() - t0)
    return {
        "memcpy_bytes": stream.nbytes,  # the same bytes on every pass
        "memcpy_s": copy_s,
        "memcpy_cpu_s": copy_cpu_s,
        "memcpy_GBps": stream.nbytes / copy_s / 1e9,
        "memcpy_cpu_GBps": stream.nbytes / copy_cpu_s / 1e9,
        "memcpy_bulk_GBps": bulk_src.nbytes / bulk_s / 1e9,
    }


# --------------------------------------------------------------------------------------------- one case
def run_case(case: dict) -> dict:
    """Measure one (model, method, N) case in this process. ``case`` keys: see :func:`make_case`."""
    if case.get("threads"):
        torch.set_num_threads(case["threads"])
    model = MODELS[case["model"]]
    modules = model.module_shapes()
    n_clients = case["n_clients"]
    ranks_all = draw_ranks(n_clients, case["seed"])
    examples_all = draw_examples(n_clients, case["seed"])
    n_measured = min(n_clients, case["max_clients"]) if case["max_clients"] else n_clients
    # The federation: the N round participants plus one idle client per rank choice, so R = 64 and
    # r_min = 2 whatever N draws (the global state has the same size for every N).
    federation = tuple(ranks_all) + tuple(RANK_CHOICES)
    spec = FederationSpec(modules=modules, client_ranks=federation, alpha=ALPHA)
    method = build(case["method"], spec)
    state = method.init_state(torch.Generator().manual_seed(case["seed"]))
    # What each client trains and uploads (FedIT: everyone at the smallest rank).
    train_ranks = [method.plan(method.client_rank(k, state)).rank for k in range(n_measured)]
    examples = examples_all[:n_measured]
    templates = make_templates(modules, set(train_ranks), case["seed"] + 7)
    state_bytes = sum(t.nbytes for t in state.tensors.values())
    max_update_bytes = max(sum(t.nbytes for t in tmpl.values()) for tmpl in templates.values())

    # Run 1: memory and time together (the first aggregate in a fresh process).
    stream = UpdateStream(templates, train_ranks, examples)
    with PeakRss() as mem:
        t0, c0 = time.perf_counter(), time.thread_time()
        new_state = method.aggregate(state, stream)
        wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
    if stream.count != n_measured:
        raise RuntimeError(f"{case['method']} consumed {stream.count} of {n_measured} updates")
    runs = [wall - stream.gen_seconds]
    cpu_runs = [cpu - stream.gen_cpu_seconds]
    gen_s = stream.gen_seconds
    bytes_read = stream.nbytes
    # The same number of runs for every method and N (--repeats): the best one is the steady state a
    # server reaches after its first round (allocator warm), and less exposed to the machine's noise.
    while len(runs) < case.get("repeats", 3):
        del new_state
        gc.collect()
        stream = UpdateStream(templates, train_ranks, examples)
        t0, c0 = time.perf_counter(), time.thread_time()
        new_state = method.aggregate(state, stream)
        runs.append(time.perf_counter() - t0 - stream.gen_seconds)
        cpu_runs.append(time.thread_time() - c0 - stream.gen_cpu_seconds)
    aggregate_s = min(runs)
    aggregate_cpu_s = min(cpu_runs)

    # The round's fixed cost: aggregate() with no update at all (allocating the sums, finishing the new
    # state), which scales with the global state, not with N. Best of --repeats; None if the method refuses.
    fixed_cpu: list[float] = []
    try:
        for _ in range(case.get("repeats", 3)):
            c0 = time.thread_time()
            method.aggregate(state, iter(()))
            fixed_cpu.append(time.thread_time() - c0)
    except (ValueError, RuntimeError):
        fixed_cpu = []
    fixed_cpu_s = min(fixed_cpu) if fixed_cpu else None

    # Broadcast preparation on the first layers (same method class, modules restricted).
    bcast_layers = min(case["bcast_layers"], model.layers) if case["bcast_layers"] else model.layers
    sub_spec = FederationSpec(modules=model.module_shapes(bcast_layers), client_ranks=federation, alpha=ALPHA)
    sub_method = build(case["method"], sub_spec)
    distinct = sorted(set(ranks_all[:n_measured]))
    t0, c0 = time.perf_counter(), time.thread_time()
    for r in distinct:
        sub_method.broadcast(new_state, r, generator=torch.Generator().manual_seed(r))
    broadcast_s = (time.perf_counter() - t0) * model.layers / bcast_layers
    broadcast_cpu_s = (time.thread_time() - c0) * model.layers / bcast_layers

    result = {
        "model": case["model"],
        "method": case["method"],
        "n_clients": n_clients,
        "n_measured": n_measured,
        "subset": n_measured < n_clients,
        "ranks_histogram": {str(r): train_ranks.count(r) for r in sorted(set(train_ranks))},
        "bytes_read": bytes_read,
        "aggregate_s": aggregate_s,
        "aggregate_cpu_s": aggregate_cpu_s,
        "aggregate_runs_s": runs,
        "aggregate_cpu_runs_s": cpu_runs,
        "aggregate_per_client_s": aggregate_s / n_measured,
        "aggregate_cpu_per_client_s": aggregate_cpu_s / n_measured,
        "generator_s": gen_s,
        "fixed_round_cpu_s": fixed_cpu_s,
        "bandwidth_GBps": bytes_read / aggregate_s / 1e9 if aggregate_s > 0 else None,
        "bandwidth_cpu_GBps": bytes_read / aggregate_cpu_s / 1e9 if aggregate_cpu_s > 0 else None,
        "broadcast_s": broadcast_s,
        "broadcast_cpu_s": broadcast_cpu_s,
        "broadcast_distinct_ranks": distinct,
        "bcast_layers_measured": bcast_layers,
        "server_round_s": aggregate_s + broadcast_s,
        "server_round_cpu_s": aggregate_cpu_s + broadcast_cpu_s,
        "peak_rss_rise_bytes": mem.rise,
        "rss_at_start_bytes": mem.start,
        "memory_method": mem.method,
        "state_bytes": state_bytes,
        "max_update_bytes": max_update_bytes,
        "torch_threads": torch.get_num_threads(),
    }
    if case.get("memcpy"):
        del new_state
        gc.collect()
        result.update(memcpy_reference(templates, train_ranks, examples, case.get("repeats", 3)))
    return result


def make_case(model: str, method: str, n_clients: int, settings: Settings) -> dict:
    return {
        "model": model,
        "method": method,
        "n_clients": n_clients,
        "seed": settings.seed,
        "max_clients": settings.max_clients_slow if method in settings.slow_methods else 0,
        "bcast_layers": settings.bcast_layers,
        "memcpy": method == "prelort",
        "threads": settings.threads,
        "repeats": settings.repeats,
    }


def run_isolated(case: dict, timeout: float | None) -> dict:
    """Run one case in a fresh Python process (clean allocator state: honest peak memory)."""
    cmd = [sys.executable, "-m", "bench.aggregation", "--worker", json.dumps(case)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {**_case_id(case), "error": f"timed out after {timeout} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER) :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    return {**_case_id(case), "error": f"worker exited with {proc.returncode}: " + " | ".join(tail)}


def _case_id(case: dict) -> dict:
    return {"model": case["model"], "method": case["method"], "n_clients": case["n_clients"]}


# --------------------------------------------------------------------------------------------- the benchmark
def measure_model(model: str, settings: Settings, on_case: Callable[[str, dict], None] | None = None) -> list[dict]:
    """Every (N, method) case of one model, in that order; ``on_case(model, result)`` after each (progress)."""
    cases = []
    done: dict[tuple[str, int], dict] = {}  # (method, clients measured) -> result
    for n in settings.clients:
        for method in settings.methods:
            case = make_case(model, method, n, settings)
            n_measured = min(n, case["max_clients"]) if case["max_clients"] else n
            if (method, n_measured) in done and n_measured < n:
                # The first n_measured clients of every draw are the same clients (seeded prefix):
                # the capped case is the measurement already taken; reuse it, labelled.
                earlier = done[(method, n_measured)]
                result = {**earlier, "n_clients": n, "subset": True, "reused_from_n_clients": earlier["n_clients"]}
            elif settings.isolation == "process":
                result = run_isolated(case, settings.case_timeout)
            else:
                result = run_case(case)
            if "error" not in result:
                done.setdefault((method, result["n_measured"]), result)
            cases.append(result)
            if on_case is not None:
                on_case(model, result)
    return cases


def model_record(model_key: str, cases: list[dict], n_list: Sequence[int]) -> dict:
    """One model's entry of the results JSON: its shapes, its cases and their summary."""
    model = MODELS[model_key]
    return {
        "label": model.label,
        "modules": len(model.module_shapes()),
        "shapes": {
            p: list(s) for p, s in zip(("q_proj", "k_proj", "v_proj", "o_proj"), model.module_shapes(1).values())
        },
        "cases": cases,
        "summary": summarise(model_key, cases, list(n_list)),
    }


def run_benchmark(
    settings: Settings,
    on_case: Callable[[str, dict], None] | None = None,
    on_model: Callable[[str, dict], None] | None = None,
) -> dict:
    """Measure every case of ``settings``; the results (what ``--json`` writes). ``on_case(model, result)`` after
    each case and ``on_model(model, record)`` after each model let a caller report progress."""
    started = time.perf_counter()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    results: dict = {
        "benchmark": "aggregation",
        "settings": settings.record(),
        "environment": environment(),
        "notes": {"time": TIME_NOTE, "memory": MEMORY_NOTE, "bandwidth": BANDWIDTH_NOTE},
        "goals": {"speedup_vs_flexlora": SPEEDUP_GOAL, "bandwidth_fraction_of_memcpy": BANDWIDTH_GOAL},
        "models": {},
    }
    if settings.isolation == "inline":
        results["notes"]["memory"] += (
            " INLINE RUN: all cases share one process, so memory freed by an earlier case can be reused "
            "without raising the resident set; peak figures can under-count."
        )
    for model in settings.models:
        record = model_record(model, measure_model(model, settings, on_case), settings.clients)
        results["models"][model] = record
        if on_model is not None:
            on_model(model, record)
    results["elapsed_s"] = time.perf_counter() - started
    return results


def load_results(path: str | Path) -> dict:
    """A results JSON this script wrote, its summaries recomputed from its cases (no measurement)."""
    results = json.loads(Path(path).read_text())
    if results.get("benchmark") != "aggregation":
        raise SystemExit(f"--report: {path} is not a JSON written by bench/aggregation.py")
    for model, entry in results["models"].items():
        entry["summary"] = summarise(model, entry["cases"], results["settings"]["clients"])
    return results


# --------------------------------------------------------------------------------------------- summary
def summarise(model: str, cases: list[dict], n_list: list[int]) -> dict:
    """Goals of issue 6 for one model, from the measured cases."""
    by = {(c["method"], c["n_clients"]): c for c in cases if "error" not in c}
    out: dict = {"speedup_vs_flexlora": [], "bandwidth_vs_memcpy": [], "peak_memory": {}}
    for n in n_list:
        pre, flex = by.get(("prelort", n)), by.get(("flexlora", n))
        if pre and flex:
            measured = not flex["subset"]
            entry = {"n_clients": n, "flexlora_n_measured": flex["n_measured"], "flexlora_extrapolated": not measured}
            for suffix, agg, per_client, bcast, server in (
                ("", "aggregate_cpu_s", "aggregate_cpu_per_client_s", "broadcast_cpu_s", "server_round_cpu_s"),
                ("_wall", "aggregate_s", "aggregate_per_client_s", "broadcast_s", "server_round_s"),
            ):
                flex_agg_at_n = flex[agg] if measured else flex[per_client] * n
                # Per client: equal to the ratio of aggregate times when both ran all N clients.
                entry["aggregate_speedup" + suffix] = flex[per_client] / pre[per_client]
                entry["server_round_speedup" + suffix] = (flex_agg_at_n + flex[bcast]) / pre[server]
            if "memcpy_cpu_s" in pre:
                # The ceiling of the aggregate speed-up: PreLort reading its updates at memcpy speed.
                entry["aggregate_speedup_at_memcpy_speed"] = flex["aggregate_cpu_per_client_s"] / (
                    pre["memcpy_cpu_s"] / pre["n_measured"]
                )
            out["speedup_vs_flexlora"].append(entry)
        if pre and "memcpy_GBps" in pre:
            out["bandwidth_vs_memcpy"].append(
                {
                    "n_clients": n,
                    "prelort_GBps": pre["bandwidth_cpu_GBps"],
                    "memcpy_GBps": pre["memcpy_cpu_GBps"],
                    "fraction": pre["bandwidth_cpu_GBps"] / pre["memcpy_cpu_GBps"],
                    "prelort_GBps_wall": pre["bandwidth_GBps"],
                    "memcpy_GBps_wall": pre["memcpy_GBps"],
                    "fraction_wall": pre["bandwidth_GBps"] / pre["memcpy_GBps"],
                    "memcpy_bulk_GBps_wall": pre["memcpy_bulk_GBps"],
                }
            )
            fixed = pre.get("fixed_round_cpu_s")
            if fixed is not None and pre["aggregate_cpu_s"] > fixed:
                # What the per-client work alone reaches once the round's fixed cost (sized by the global
                # state, paid even with no client) is set aside. Reported beside the goal, not instead of it.
                streaming = pre["bytes_read"] / (pre["aggregate_cpu_s"] - fixed) / 1e9
                out["bandwidth_vs_memcpy"][-1].update(
                    {
                        "fixed_round_cpu_s": fixed,
                        "prelort_streaming_GBps": streaming,
                        "streaming_fraction": streaming / pre["memcpy_cpu_GBps"],
                    }
                )
    methods = sorted({c["method"] for c in by.values()}, key=method_sort_key)
    for m in methods:
        rows = sorted((c for c in by.values() if c["method"] == m), key=lambda c: c["n_measured"])
        if not rows:
            continue
        entry = {
            "by_clients_measured": {str(c["n_measured"]): c["peak_rss_rise_bytes"] for c in rows},
        }
        first, last = rows[0], rows[-1]
        if last["bytes_read"] > first["bytes_read"]:
            # ~0: memory flat in N (streaming); ~1: every update's bytes retained.
            entry["retained_fraction_of_extra_bytes"] = (last["peak_rss_rise_bytes"] - first["peak_rss_rise_bytes"]) / (
                last["bytes_read"] - first["bytes_read"]
            )
        out["peak_memory"][m] = entry

    goals: dict = {}
    speed = [s for s in out["speedup_vs_flexlora"] if not s["flexlora_extrapolated"]]
    if speed:
        worst = min(s["aggregate_speedup"] for s in speed)
        goals["speedup_ge_100x"] = {
            "criterion": "min over N (FlexLoRA measured on all N clients) of the aggregate CPU-time speed-up",
            "value": worst,
            "met": worst >= SPEEDUP_GOAL,
        }
    if out["bandwidth_vs_memcpy"]:
        worst = min(b["fraction"] for b in out["bandwidth_vs_memcpy"])
        largest = max(out["bandwidth_vs_memcpy"], key=lambda b: b["n_clients"])
        goals["bandwidth_ge_30pct_memcpy"] = {
            "criterion": "min over N of (bytes / aggregate CPU time) / (bytes / memcpy CPU time)",
            "value": worst,
            "value_at_largest_n": largest["fraction"],
            "met": worst >= BANDWIDTH_GOAL,
        }
    pre_rows = sorted((c for c in by.values() if c["method"] == "prelort"), key=lambda c: c["n_clients"])
    if len(pre_rows) >= 2:
        first, last = pre_rows[0], pre_rows[-1]
        growth = last["peak_rss_rise_bytes"] - first["peak_rss_rise_bytes"]
        # Flat: the peak grows by less than what may be alive at the peak whatever N is (one largest update
        # from the generator, plus the sums' bounded buffer: a larger N can fill it with larger updates)
        # plus 10 %, while the bytes streamed grow by (N_max - N_min) updates.
        largest = max(last["max_update_bytes"], first["max_update_bytes"])
        buffer = min(BUFFER_CLIENTS * largest, BUFFER_BYTES + largest)
        allowance = largest + buffer + 0.1 * first["peak_rss_rise_bytes"]
        goals["prelort_memory_flat"] = {
            "criterion": "peak(N_max) - peak(N_min) <= one largest update + the sums' buffer bound "
            f"(min({BUFFER_CLIENTS} largest updates, {BUFFER_BYTES // 2**20} MiB + one)) + 10% of peak(N_min)",
            "growth_bytes": growth,
            "allowance_bytes": allowance,
            "bytes_streamed_growth": last["bytes_read"] - first["bytes_read"],
            "met": growth <= allowance,
        }
    out["goals"] = goals
    return out


# --------------------------------------------------------------------------------------------- printing
def format_case_line(model: str, result: dict) -> str:
    """The progress line of one measured case."""
    if "error" in result:
        return f"  {model} {result['method']} N={result['n_clients']}: ERROR {result['error']}"
    return (
        f"  {model:<8} {result['method']:<9} N={result['n_clients']:<5} measured {result['n_measured']:<5} "
        f"aggregate {fmt_seconds(result['aggregate_s']):>9}  peak RSS rise "
        f"{fmt_bytes(result['peak_rss_rise_bytes'])}"
    )


def format_model_report(
    model_key: str, cases: list[dict], summary: dict, max_clients_slow: int, bcast_layers: int
) -> str:
    """One model's report: the table of cases, the goals' figures and verdicts (the text main prints)."""
    model = MODELS[model_key]
    out: list[str] = []
    out.append(f"\n=== {model.describe()}; {len(model.module_shapes())} modules")
    out.append(
        f"    one rank dimension = {fmt_bytes(model.lora_floats_per_rank() * 4)} of float32 factors; "
        f"dense deltas = {fmt_bytes(model.dense_floats() * 4)}"
    )
    rows = []
    for c in sorted(cases, key=lambda c: (c["n_clients"], method_sort_key(c["method"]))):
        if "error" in c:
            rows.append([c["method"], c["n_clients"], "ERROR", c["error"][:60]] + [""] * 7)
            continue
        measured = f"{c['n_measured']}" + ("*" if c["subset"] else "")
        rows.append(
            [
                c["method"],
                c["n_clients"],
                measured,
                fmt_bytes(c["bytes_read"]),
                fmt_seconds(c["aggregate_cpu_s"]),
                fmt_seconds(c["aggregate_s"]),
                fmt_seconds(c["aggregate_cpu_per_client_s"]),
                f"{c['bandwidth_cpu_GBps']:.2f}" if c["bandwidth_cpu_GBps"] else "-",
                fmt_seconds(c["broadcast_cpu_s"]) + ("~" if c["bcast_layers_measured"] < model.layers else ""),
                fmt_seconds(c["server_round_cpu_s"]),
                fmt_bytes(c["peak_rss_rise_bytes"]),
            ]
        )
    out.append(
        table(
            [
                "method",
                "N",
                "measured",
                "updates read",
                "aggregate CPU",
                "(wall)",
                "CPU/client",
                "GB/s",
                "bcast prep CPU",
                "server round CPU",
                "peak RSS rise",
            ],
            rows,
        )
    )
    notes = []
    if any(c.get("subset") for c in cases):
        notes.append(f"* measured on the first {max_clients_slow} clients of the same draw (slow method)")
    if any(c.get("bcast_layers_measured", model.layers) < model.layers for c in cases if "error" not in c):
        notes.append(
            f"~ broadcast timed on {min(bcast_layers, model.layers)} of {model.layers} layers, scaled (identical shapes)"
        )
    for n in notes:
        out.append("   " + n)

    out.append("\n  PreLort vs FlexLoRA (goal: >= 100x); CPU time (wall time in brackets)")
    for s in summary["speedup_vs_flexlora"]:
        tag = (
            f"  (FlexLoRA aggregate extrapolated from {s['flexlora_n_measured']} clients)"
            if s["flexlora_extrapolated"]
            else ""
        )
        out.append(
            f"    N={s['n_clients']:>5}: aggregate {s['aggregate_speedup']:7.1f}x [{s['aggregate_speedup_wall']:7.1f}x] per client;"
            f"  server round incl. broadcast prep (SVDs) {s['server_round_speedup']:7.1f}x [{s['server_round_speedup_wall']:7.1f}x]{tag}"
        )
        if "aggregate_speedup_at_memcpy_speed" in s:
            out.append(
                f"             ceiling (PreLort at memcpy speed of its bytes): {s['aggregate_speedup_at_memcpy_speed']:.0f}x"
            )
    out.append("  PreLort bandwidth vs memcpy of the same bytes (goal: >= 30%); CPU time (wall time in brackets)")
    for b in summary["bandwidth_vs_memcpy"]:
        out.append(
            f"    N={b['n_clients']:>5}: {b['prelort_GBps']:.2f} GB/s vs memcpy {b['memcpy_GBps']:.2f} GB/s "
            f"= {100 * b['fraction']:.0f}%  [{b['prelort_GBps_wall']:.2f} vs {b['memcpy_GBps_wall']:.2f} GB/s = "
            f"{100 * b['fraction_wall']:.0f}%; one 256 MiB memcpy: {b['memcpy_bulk_GBps_wall']:.1f} GB/s]"
        )
        if "streaming_fraction" in b:
            out.append(
                f"             of which the round's fixed cost (aggregate with no update) {fmt_seconds(b['fixed_round_cpu_s'])}; "
                f"the per-client work alone: {b['prelort_streaming_GBps']:.2f} GB/s = {100 * b['streaming_fraction']:.0f}% of memcpy"
            )
    out.append("  Peak RSS rise during aggregate() by clients measured (flat = streaming)")
    for m, e in summary["peak_memory"].items():
        series = ", ".join(f"N={n}: {fmt_bytes(v)}" for n, v in e["by_clients_measured"].items())
        frac = e.get("retained_fraction_of_extra_bytes")
        extra = f"   retained {100 * frac:.0f}% of the extra bytes streamed" if frac is not None else ""
        out.append(f"    {m:<9} {series}{extra}")
    out.append("  Goals:")
    for name, g in summary["goals"].items():
        value = g.get("value", g.get("growth_bytes"))
        shown = fmt_bytes(value) if name == "prelort_memory_flat" else f"{value:.3g}"
        out.append(f"    {name:<28} {'MET' if g['met'] else 'NOT MET':<8} ({g['criterion']}: {shown})")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------- command line
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="small shapes and N (a check, < 1 minute)")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON here")
    p.add_argument("--models", default=None, help="comma list of: " + ", ".join(MODELS) + " (default smollm2,1b)")
    p.add_argument("--clients", default=None, help="comma list of N (default 10,100,1000)")
    p.add_argument(
        "--methods", default=",".join(method_order()), help="comma list of methods (default: all registered)"
    )
    p.add_argument(
        "--max-clients-slow",
        type=int,
        default=None,
        help="measure slow methods on at most this many clients (default 100; 0 = all)",
    )
    p.add_argument("--slow-methods", default=SLOW_METHODS_DEFAULT, help="methods limited by --max-clients-slow")
    p.add_argument(
        "--bcast-layers", type=int, default=None, help="layers on which broadcast preparation is timed (default 2)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--repeats", type=int, default=3, help="runs of aggregate() per case; the best is reported (default 3)"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a shared machine, multi-threaded BLAS calls stall when another "
        "process holds a core; 0 = torch's choice)",
    )
    p.add_argument(
        "--isolation",
        choices=("process", "inline"),
        default="process",
        help="process: a fresh Python process per case (honest peak memory, default); "
        "inline: all cases in this process (faster; memory figures then include reuse of freed memory)",
    )
    p.add_argument(
        "--case-timeout", type=float, default=900.0, help="seconds before a case is abandoned (process isolation)"
    )
    p.add_argument(
        "--report",
        metavar="PATH",
        help="re-print (and with --json rewrite) the summary of a JSON this script wrote, without measuring",
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.models is None:
        args.models = "tiny" if args.quick else "smollm2,1b"
    if args.clients is None:
        args.clients = "8,64" if args.quick else "10,100,1000"
    if args.max_clients_slow is None:
        args.max_clients_slow = 100
    if args.max_clients_slow < 0:
        p.error("--max-clients-slow must be >= 0")
    if args.bcast_layers is None:
        args.bcast_layers = 2
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.bcast_layers < 1:
        p.error("--bcast-layers must be >= 1")
    return args


def settings_from_args(args: argparse.Namespace, argv: list[str] | None) -> Settings:
    """The run ``args`` ask for; a bad model, method or N list exits with its message."""
    return Settings(
        models=tuple(m.key for m in parse_models(args.models)),
        clients=tuple(parse_ints(args.clients, "--clients")),
        methods=tuple(parse_methods(args.methods)),
        slow_methods=frozenset(parse_methods(args.slow_methods)) if args.slow_methods else frozenset(),
        max_clients_slow=args.max_clients_slow,
        bcast_layers=args.bcast_layers,
        seed=args.seed,
        repeats=args.repeats,
        threads=args.threads,
        isolation=args.isolation,
        case_timeout=args.case_timeout,
        quick=args.quick,
        argv=tuple(sys.argv[1:] if argv is None else argv),
    )


def print_report(results: dict) -> None:
    """Every model's report of a results JSON (measured now or read back)."""
    settings = results["settings"]
    for model, entry in results["models"].items():
        print(
            format_model_report(
                model, entry["cases"], entry["summary"], settings["max_clients_slow"], settings["bcast_layers"]
            )
        )


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark as the command line asks: print its report, write its JSON; returns the results."""
    args = parse_args(argv)
    if args.worker:
        result = run_case(json.loads(args.worker))
        print(RESULT_MARKER + json.dumps(result), flush=True)
        return result
    if args.report:
        results = load_results(args.report)
        print_report(results)
    else:
        settings = settings_from_args(args, argv)
        print(
            f"Server aggregation benchmark: ranks drawn (seed {settings.seed}) from {set(RANK_CHOICES)}; "
            f"N = {list(settings.clients)}; isolation = {settings.isolation}"
        )
        results = run_benchmark(
            settings,
            on_case=lambda model, result: print(format_case_line(model, result), flush=True),
            on_model=lambda model, record: print(
                format_model_report(
                    model, record["cases"], record["summary"], settings.max_clients_slow, settings.bcast_layers
                )
            ),
        )
        print(f"\nnotes: {TIME_NOTE}\n       {MEMORY_NOTE}\n       {BANDWIDTH_NOTE}")
        print(f"elapsed {results['elapsed_s']:.0f} s")
    if args.json:
        print(f"wrote {write_json(args.json, results)}")
    return results


if __name__ == "__main__":
    main()
