"""Memory and time of a quantised base (model.quantization) and of gradient checkpointing, and its quality cost.

Part 0, the load: from a float32 checkpoint (the model as is) and a bfloat16 copy of it (how most hub models are
published), one fresh subprocess per row loads the model as float32, or as int8 / nf4 three ways side by side:
while the checkpoint streams in (``prelort.models.load_model``, what a run does), the same with glibc's default
malloc (without prelort's setting for the load), and the way prelort loaded before (the whole model in float32,
then ``quantize_linear_layers``). Each row reports the peak of anonymous memory (RssAnon, sampled every 2 ms),
what is kept after loading, VmHWM (which also counts the pages of a memory-mapped checkpoint file) and the
seconds it took. Two more rows: the offline GGUF's one-off conversion to a Hugging Face directory, prelort's
(tensor by tensor into shards) beside transformers' own (the whole file dequantised, then saved).

Part 1, the step: for each base (float32, int8, nf4), with and without train.gradient_checkpointing, at client
ranks 2 and 16, one fresh subprocess loads the model as a run does (``prelort.recipe.load_federation_model``),
trains a LoRA on the attention projections (``prelort.train.train_client``, plain LoRA: nested mode off)
on a fixed batch (default 8 x 128 tokens) for one warmup step and ``--steps`` timed ones, and reports

  * peak RSS of the whole process (VmHWM: loading included),
  * peak RSS while training (VmHWM reset after the load, via /proc/self/clear_refs),
  * resident memory after loading (VmRSS), seconds and CPU seconds per optimizer step (median).

Part 2, the quality: the README demo config (examples/demo.yaml) run with model.quantization none, int8 and
nf4 (``--demo-quantizations``), same seed, each in a fresh ``prelort run``; accuracy and perplexity of every tier after the last round, and
the run's wall time and peak RSS. ``--demo-set`` overrides demo keys for a smaller budget (recorded).

    python -m bench.quantization --json results/quantization.json      # every part
    python -m bench.quantization --no-demo --json results/quantization.json
    python -m bench.quantization --load-only --json results/quantization.json --merge   # part 0, kept rows
    python -m bench.quantization --demo-only --json results/quantization_demo.json
    python -m bench.quantization --quick                     # tiny-llama, small batch, no demo (smoke)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ._common import status_kib

ROOT = Path(__file__).resolve().parents[1]
QUANTIZATIONS = ("none", "int8", "nf4")
RANKS = (2, 16)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs); False where not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def measure_one(args: argparse.Namespace) -> dict:
    """One configuration, in this (fresh) process: the figures of part 1."""
    import torch

    from prelort import config as config_mod
    from prelort.adapters import LoraAdapter
    from prelort.methods.base import TrainPlan
    from prelort.recipe import load_federation_model
    from prelort.train import train_client

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = config_mod.Config.model_validate(
        {
            "model": {
                "name": args.model,
                "device": "cpu",
                "quantization": args.quantization,
                "target_modules": TARGETS,
            },
            "clients": {"num": 1, "per_round": 1, "ranks": [args.rank]},
            "lora": {"alpha": 2.0 * args.rank},
            "train": {
                "local_steps": args.steps,
                "batch_size": args.batch_size,
                "lr": 1e-4,
                "gradient_checkpointing": args.checkpointing,
            },
        }
    )
    t0 = time.perf_counter()
    _, tokenizer, model = load_federation_model(cfg)
    load_s = time.perf_counter() - t0
    rss_loaded = status_kib("VmRSS")
    peak_load = status_kib("VmHWM")
    reset = _reset_peak_rss()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, len(tokenizer), (args.batch_size, args.seq_len), generator=g).tolist()
    half = args.seq_len // 2
    examples = [{"input_ids": row, "labels": [-100] * half + row[half:]} for row in ids]
    plan = TrainPlan(rank=args.rank, truncations=(args.rank,), mode="off")
    adapter = LoraAdapter(model)
    start = adapter.read_state(args.rank)
    warm = cfg.train.model_copy(update={"local_steps": 1})
    train_client(model, examples, plan, warm, seed=0)  # allocator, caches, the first-call costs
    walls, cpus = [], []
    for i in range(args.repeats):
        adapter.load_state(start, args.rank)
        wall, cpu = time.perf_counter(), time.process_time()
        train_client(model, examples, plan, cfg.train, seed=i)
        walls.append((time.perf_counter() - wall) / args.steps)
        cpus.append((time.process_time() - cpu) / args.steps)
    return {
        "quantization": args.quantization,
        "gradient_checkpointing": args.checkpointing,
        "rank": args.rank,
        "load_seconds": load_s,
        "rss_after_load_bytes": None if rss_loaded is None else rss_loaded * 1024,
        "peak_rss_bytes": max(
            x for x in (peak_load, status_kib("VmHWM"), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) if x
        )
        * 1024,
        "peak_rss_training_bytes": (status_kib("VmHWM") or 0) * 1024 if reset else None,
        "seconds_per_step": statistics.median(walls),
        "cpu_seconds_per_step": statistics.median(cpus),
        "all_seconds_per_step": walls,
    }


STEP_SETTINGS = ("batch_size", "seq_len", "target_modules", "steps_per_measurement", "repeats")
LOAD_WAYS = (
    ("none", "float32"),
    ("int8", "streamed"),
    ("int8", "streamed-default-malloc"),
    ("int8", "after"),
    ("nf4", "streamed"),
    ("nf4", "streamed-default-malloc"),
    ("nf4", "after"),
)
CHECKPOINT_DTYPES = ("float32", "bfloat16")


class _PeakAnon:
    """The peak of the process's anonymous resident memory (RssAnon: what the OS cannot drop, unlike the pages
    of a memory-mapped checkpoint file that VmHWM also counts), sampled every 2 ms on a thread."""

    def __init__(self) -> None:
        import threading

        self.peak = status_kib("RssAnon") or 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, status_kib("RssAnon") or 0)

    def __enter__(self) -> _PeakAnon:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, status_kib("RssAnon") or 0)


def measure_load(args: argparse.Namespace) -> dict:
    """Part 0's figures for one base loaded one way, in this (fresh) process: ``streamed`` (quantised as the
    checkpoint loads, what a run does), ``streamed-default-malloc`` (the same without prelort's malloc setting
    for the load, ``prelort.models._freed_tensors_go_back_to_the_os``) or ``after`` (loaded whole in ``model.dtype`` float32, then quantised:
    prelort's way before)."""
    import torch

    from prelort.config import ModelConfig
    from prelort.models import load_model, quantize_linear_layers

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = ModelConfig(name=args.model, device="cpu")
    import bitsandbytes  # noqa: F401  (every library imported before the peaks are taken: the load is measured)
    import peft  # noqa: F401

    if args.load_way == "streamed-default-malloc":  # what prelort.models' malloc setting saves
        import contextlib

        from prelort import models

        models._freed_tensors_go_back_to_the_os = contextlib.nullcontext
    reset = _reset_peak_rss()
    anon_before = status_kib("RssAnon") or 0
    t0 = time.perf_counter()
    with _PeakAnon() as anon:
        if args.load_way == "after":
            model, _ = load_model(cfg, "none")
            quantize_linear_layers(model, args.quantization)
        else:
            model, _ = load_model(cfg, args.quantization)
    seconds = time.perf_counter() - t0
    return {
        "quantization": args.quantization,
        "way": args.load_way,
        "quantised_while_loading": getattr(model, "hf_quantizer", None) is not None,
        "load_seconds": seconds,
        "anon_before_load_bytes": anon_before * 1024,
        "peak_anon_bytes": anon.peak * 1024,
        "anon_after_load_bytes": (status_kib("RssAnon") or 0) * 1024,
        # with the reset: the peak of the load (over the imported libraries); without: the process's
        "peak_rss_bytes": (status_kib("VmHWM") or 0) * 1024,
        "peak_is_the_load_alone": reset,
        "rss_after_load_bytes": (status_kib("VmRSS") or 0) * 1024,
        "parameter_bytes": sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]),
    }


def measure_conversion(args: argparse.Namespace) -> dict:
    """Part 0's conversion row, in this (fresh) process: the offline GGUF's one-off conversion to a Hugging Face
    directory, ``streamed`` (``prelort.models._convert_gguf``: tensor by tensor into shards) or ``transformers``
    (``from_pretrained(gguf_file=...)`` then ``save_pretrained``, what transformers' own GGUF loading does)."""
    import transformers

    from prelort import models

    gguf = models.smollm2_gguf_path()
    with tempfile.TemporaryDirectory(prefix="prelort-bench-convert-") as tmp:
        anon_before = status_kib("RssAnon") or 0
        t0 = time.perf_counter()
        with _PeakAnon() as anon:
            if args.convert_way == "streamed":
                models._convert_gguf(gguf, Path(tmp))
            else:
                kwargs = {"gguf_file": str(gguf)}
                tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), **kwargs)
                model = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype="float32", **kwargs)
                models.save_dequantised(model, tokenizer, Path(tmp))
        seconds = time.perf_counter() - t0
    return {
        "way": args.convert_way,
        "gguf": gguf.name,
        "seconds": seconds,
        "anon_before_bytes": anon_before * 1024,
        "peak_anon_bytes": anon.peak * 1024,
    }


def run_conversion(args: argparse.Namespace) -> list[dict]:
    """Part 0's conversion rows (the offline SmolLM2 GGUF only), each in a fresh subprocess."""
    rows = []
    for way in ("streamed", "transformers"):
        cmd = [sys.executable, "-m", "bench.quantization", "--one-convert", "--convert-way", way]
        cmd += ["--threads", str(args.threads)] if args.threads else []
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=_env())
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
        row = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(row)
        peak = (row["peak_anon_bytes"] - row["anon_before_bytes"]) / 2**20
        print(f"convert {row['gguf']} {way}: {row['seconds']:.1f} s, peak anon {peak:.0f} MiB", flush=True)
    return rows


def run_load(args: argparse.Namespace) -> list[dict]:
    """Part 0: every (checkpoint dtype, base, way) in a fresh subprocess. The bfloat16 checkpoint (how most hub
    models are published) is a copy of the same weights written for the measurement."""
    import torch

    from prelort.config import ModelConfig
    from prelort.models import load_model

    # the float32 checkpoint: the model itself (an offline GGUF's one-off conversion to the cache happens here)
    model, tokenizer = load_model(ModelConfig(name=args.model, device="cpu"), "none")
    rows = []
    with tempfile.TemporaryDirectory(prefix="prelort-bench-load-") as tmp:
        checkpoints = {"float32": args.model}
        if "bfloat16" in args.load_checkpoints:
            model.to(torch.bfloat16).save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            checkpoints["bfloat16"] = tmp
        del model
        for dtype in args.load_checkpoints:
            for quantization, way in LOAD_WAYS:
                if quantization != "none" and quantization not in args.quantizations:
                    continue
                cmd = [sys.executable, "-m", "bench.quantization", "--one-load", "--model", checkpoints[dtype]]
                cmd += ["--quantization", quantization, "--load-way", way]
                cmd += ["--threads", str(args.threads)] if args.threads else []
                done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=_env())
                if done.returncode != 0:
                    raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
                row = {"checkpoint_dtype": dtype, **json.loads(done.stdout.strip().splitlines()[-1])}
                rows.append(row)
                print(
                    f"load {dtype} checkpoint, {quantization:>5} {way:<8}: {row['load_seconds']:.1f} s, peak anon "
                    f"{row['peak_anon_bytes'] / 2**20:.0f} MiB (before {row['anon_before_load_bytes'] / 2**20:.0f}, "
                    f"after {row['anon_after_load_bytes'] / 2**20:.0f}), VmHWM {row['peak_rss_bytes'] / 2**20:.0f} MiB",
                    flush=True,
                )
    return rows


def _env(threads: int = 0) -> dict[str, str]:
    """The environment of the subprocesses: this checkout's prelort first (not another installed copy), and
    ``threads`` torch threads where given (a ``prelort run`` takes them from OMP_NUM_THREADS)."""
    path = [str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p)}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def run_steps(args: argparse.Namespace, done_rows=None) -> list[dict]:
    """Part 1; ``done_rows(rows)`` is called after each configuration (the JSON is rewritten as rows arrive)."""
    rows = []
    for quantization in args.quantizations:
        for checkpointing in (False, True):
            for rank in RANKS:
                cmd = [
                    sys.executable,
                    "-m",
                    "bench.quantization",
                    "--one",
                    "--model",
                    args.model,
                    "--quantization",
                    quantization,
                    "--rank",
                    str(rank),
                    "--batch-size",
                    str(args.batch_size),
                    "--seq-len",
                    str(args.seq_len),
                    "--steps",
                    str(args.steps),
                    "--repeats",
                    str(args.repeats),
                    *(["--checkpointing"] if checkpointing else []),
                    *(["--threads", str(args.threads)] if args.threads else []),
                ]
                done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=_env())
                if done.returncode != 0:
                    raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
                row = json.loads(done.stdout.strip().splitlines()[-1])
                rows.append(row)
                if done_rows is not None:
                    done_rows(rows)
                print(
                    f"{quantization:>5} checkpointing={str(checkpointing):<5} rank {rank:>2}: "
                    f"{row['seconds_per_step']:.2f} s/step, peak RSS {row['peak_rss_bytes'] / 2**20:.0f} MiB "
                    f"(training {(row['peak_rss_training_bytes'] or 0) / 2**20:.0f} MiB)",
                    flush=True,
                )
    return rows


def run_demo(args: argparse.Namespace) -> dict:
    """Part 2: the demo config with each of ``--demo-quantizations`` (same seed), each a fresh ``prelort run``."""
    demo = ROOT / "examples" / "demo.yaml"
    out: dict = {"config": "examples/demo.yaml", "overrides": list(args.demo_set), "runs": {}}
    with tempfile.TemporaryDirectory(prefix="prelort-bench-quant-") as tmp:
        for quantization in args.demo_quantizations:
            run_dir = Path(tmp) / quantization
            sets = [*args.demo_set, f"model.quantization={quantization}"]
            cmd = [sys.executable, "-m", "prelort", "run", str(demo), "--out", str(run_dir), "--quiet"]
            cmd += [a for s in sets for a in ("--set", s)]
            # a wrapper process per run, so RUSAGE_CHILDREN's peak is this run's alone
            wrapper = (
                "import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
                "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)"
            )
            started = time.perf_counter()
            done = subprocess.run(
                [sys.executable, "-c", wrapper, *cmd], cwd=ROOT, capture_output=True, text=True, env=_env(args.threads)
            )
            seconds = time.perf_counter() - started
            if done.returncode != 0:
                raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
            from prelort.rundir import RunDir

            records = RunDir(run_dir).metrics.records()
            last = max(r["round"] for r in records)
            tiers = {
                str(r["rank"]): {"accuracy": r["accuracy"], "perplexity": r["perplexity"], "n": r["n"]}
                for r in records
                if r.get("kind") == "tier" and r["round"] == last
            }
            train_loss = [r["train_loss"] for r in records if r.get("kind") == "train"]
            out["runs"][quantization] = {
                "seconds": seconds,
                "peak_rss_bytes": int(done.stdout.strip().splitlines()[-1]) * 1024,
                "round": last,
                "tiers": tiers,
                "train_loss": train_loss,
            }
            print(f"demo {quantization}: {seconds:.0f} s, tiers {tiers}", flush=True)
    return out


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=2, help="optimizer steps per timed call")
    ap.add_argument("--repeats", type=int, default=1, help="timed calls per configuration (median)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument(
        "--demo-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key of examples/demo.yaml for part 2 (a smaller budget; recorded in the JSON)",
    )
    part = ap.add_mutually_exclusive_group()
    part.add_argument("--no-demo", action="store_true", help="parts 0 and 1 only (the load and the step)")
    part.add_argument("--demo-only", action="store_true", help="part 2 only (the demo's quality cost)")
    part.add_argument("--load-only", action="store_true", help="part 0 only (the load)")
    ap.add_argument(
        "--load-checkpoints",
        default=",".join(CHECKPOINT_DTYPES),
        help="part 0: the checkpoint dtypes to load from (float32: the model as is; bfloat16: a copy)",
    )
    ap.add_argument(
        "--demo-quantizations",
        default=",".join(QUANTIZATIONS),
        help="part 2: the bases to run the demo on (comma-separated from none, int8, nf4)",
    )
    ap.add_argument(
        "--quantizations",
        default=",".join(QUANTIZATIONS),
        help="part 1: the bases to measure (comma-separated from none, int8, nf4)",
    )
    ap.add_argument(
        "--merge",
        action="store_true",
        help="part 1: keep the rows of the existing --json file for the bases not measured now (both commands "
        "are recorded)",
    )
    ap.add_argument("--quick", action="store_true", help="tiny-llama, batch 2 x 32, no demo (a smoke run)")
    ap.add_argument("--json", type=Path, help="write the figures to this JSON file")
    # one configuration in this process (what part 1 runs in each subprocess)
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--quantization", choices=QUANTIZATIONS, default="none", help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, default=2, help=argparse.SUPPRESS)
    ap.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--one-load", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--one-convert", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--convert-way", choices=("streamed", "transformers"), default="streamed", help=argparse.SUPPRESS)
    ap.add_argument("--load-way", choices=[w for _, w in LOAD_WAYS], default="streamed", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(measure_one(args)), flush=True)
        return None
    if args.one_load:
        print(json.dumps(measure_load(args)), flush=True)
        return None
    if args.one_convert:
        print(json.dumps(measure_conversion(args)), flush=True)
        return None
    if args.quick:
        args.model, args.batch_size, args.seq_len, args.no_demo = "tiny-llama", 2, 32, True
    args.quantizations = [q.strip() for q in args.quantizations.split(",") if q.strip()]
    if not args.quantizations or set(args.quantizations) - set(QUANTIZATIONS):
        ap.error(f"--quantizations: comma-separated from {', '.join(QUANTIZATIONS)}")
    args.load_checkpoints = [d.strip() for d in args.load_checkpoints.split(",") if d.strip()]
    if not args.load_checkpoints or set(args.load_checkpoints) - set(CHECKPOINT_DTYPES):
        ap.error(f"--load-checkpoints: comma-separated from {', '.join(CHECKPOINT_DTYPES)}")
    args.demo_quantizations = [q.strip() for q in args.demo_quantizations.split(",") if q.strip()]
    if not args.demo_quantizations or set(args.demo_quantizations) - set(QUANTIZATIONS):
        ap.error(f"--demo-quantizations: comma-separated from {', '.join(QUANTIZATIONS)}")
    run_load_part = not args.demo_only
    run_steps_part = not (args.demo_only or args.load_only)
    run_demo_part = not (args.no_demo or args.load_only)
    kept: list[dict] = []
    earlier_commands: list[str] = []
    old: dict = {}
    if args.merge:
        if not args.json or not args.json.is_file():
            ap.error("--merge needs an existing --json file")
        old = json.loads(args.json.read_text())
        measured = args.quantizations if run_steps_part else []
        kept = [r for r in old.get("steps", []) if r["quantization"] not in measured]
        earlier_commands = [*old.get("earlier_commands", []), old["command"]]

    import torch

    result = {
        "command": " ".join(["python", "-m", "bench.quantization", *(sys.argv[1:] if argv is None else argv)]),
        "environment": {
            "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": args.threads or torch.get_num_threads(),
            "torch": torch.__version__,
            "bitsandbytes": _version("bitsandbytes"),
            "platform": platform.platform(),
        },
        "model": args.model,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "target_modules": list(TARGETS),
        "steps_per_measurement": args.steps,
        "repeats": args.repeats,
        # kept step rows (--merge without part 1) were measured with the earlier run's settings
        **({k: old[k] for k in STEP_SETTINGS if k in old} if old and not run_steps_part else {}),
        "earlier_commands": earlier_commands,  # --merge: the runs whose rows were kept
        "load": None if run_load_part else old.get("load"),
        "conversion": None if run_load_part else old.get("conversion"),
        "steps": [],
        "complete": False,  # true once every configuration (and the demo, unless skipped) has run
        "demo": None if run_demo_part else old.get("demo"),
    }

    def save(rows: list[dict]) -> None:
        order = {q: i for i, q in enumerate(QUANTIZATIONS)}
        result["steps"] = sorted([*kept, *rows], key=lambda r: order[r["quantization"]])  # stable: run order within
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=1) + "\n")

    if run_load_part:
        result["load"] = run_load(args)
        if args.model == "smollm2-135m-instruct":
            result["conversion"] = run_conversion(args)
        save([])
    if run_steps_part:
        run_steps(args, save)
    if run_demo_part:
        result["demo"] = run_demo(args)
    result["complete"] = True
    save([r for r in result["steps"] if r not in kept])
    if args.json:
        print(f"wrote {args.json}")
    return result


def _version(dist: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
