"""Shared pieces of the server-side benchmarks: model shapes, seeded federations, output helpers.

Shapes only: the benchmarks never load a model; they build random tensors at the shapes of the
attention projections (q, k, v, o) a real model would adapt.
"""

from __future__ import annotations

import json
import os
import platform
import random
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

# The rank menu of the benchmarks (issue 6): every client draws one of these.
RANK_CHOICES: tuple[int, ...] = (2, 4, 8, 16, 32, 64)
# lora_alpha of the benchmark federation (any positive value: it sets s = alpha / R, not the cost).
ALPHA = 16.0
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class ModelShape:
    """A llama-style decoder's attention shapes.

    q_proj: (heads * head_dim) x hidden,  k_proj / v_proj: (kv_heads * head_dim) x hidden,
    o_proj: hidden x (heads * head_dim)   (nn.Linear weights are d_out x d_in).
    """

    key: str
    label: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int

    def module_shapes(self, layers: int | None = None) -> dict[str, tuple[int, int]]:
        """{full module name: (d_out, d_in)} for the first ``layers`` layers (default: all)."""
        n = self.layers if layers is None else min(layers, self.layers)
        q_out = self.heads * self.head_dim
        kv_out = self.kv_heads * self.head_dim
        per_layer = {
            "q_proj": (q_out, self.hidden),
            "k_proj": (kv_out, self.hidden),
            "v_proj": (kv_out, self.hidden),
            "o_proj": (self.hidden, q_out),
        }
        return {f"model.layers.{i}.self_attn.{proj}": per_layer[proj] for i in range(n) for proj in PROJECTIONS}

    def lora_floats_per_rank(self) -> int:
        """Floats of one rank dimension over all modules: sum_m (d_in + d_out)."""
        return sum(d_out + d_in for d_out, d_in in self.module_shapes().values())

    def dense_floats(self) -> int:
        """Floats of one dense delta per module: sum_m d_out * d_in."""
        return sum(d_out * d_in for d_out, d_in in self.module_shapes().values())

    def describe(self) -> str:
        shapes = sorted(set(self.module_shapes(1).values()), reverse=True)
        dims = ", ".join(f"{o}x{i}" for o, i in shapes)
        return f"{self.label}: {self.layers} layers x 4 attention projections ({dims})"


MODELS: dict[str, ModelShape] = {
    # HuggingFaceTB/SmolLM2-135M: llama, hidden 576, 30 layers, 9 heads, 3 kv heads, head_dim 64.
    "smollm2": ModelShape("smollm2", "SmolLM2-135M", hidden=576, layers=30, heads=9, kv_heads=3, head_dim=64),
    # meta-llama/Llama-3.2-1B: hidden 2048, 16 layers, 32 heads, 8 kv heads, head_dim 64.
    "1b": ModelShape("1b", "Llama-3.2-1B", hidden=2048, layers=16, heads=32, kv_heads=8, head_dim=64),
    # Small shapes for --quick and the smoke tests (not a real model).
    "tiny": ModelShape("tiny", "tiny (test shapes)", hidden=256, layers=2, heads=4, kv_heads=2, head_dim=64),
}


def parse_models(text: str) -> list[ModelShape]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise SystemExit("--models: give at least one of " + ", ".join(MODELS))
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise SystemExit(f"--models: unknown model(s) {', '.join(unknown)}; known: {', '.join(MODELS)}")
    return [MODELS[n] for n in names]


def parse_ints(text: str, flag: str, *, minimum: int = 1) -> list[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise SystemExit(f"{flag}: expected comma-separated integers, got {text!r}") from None
    if not values or any(v < minimum for v in values):
        raise SystemExit(f"{flag}: expected integers >= {minimum}, got {text!r}")
    return values


def method_order() -> list[str]:
    """The registered methods in the registry's listing order (``prelort.methods.available``): the order of the
    README and ``prelort methods``, which every benchmark table follows."""
    from prelort.methods import available

    return list(available())


def method_sort_key(name: str) -> tuple[int, str]:
    """Sorts methods into :func:`method_order`; a name not registered (e.g. from an older JSON) after them, by name."""
    order = method_order()
    return (order.index(name) if name in order else len(order), name)


def parse_methods(text: str) -> list[str]:
    from prelort.methods import available

    names = [t.strip() for t in text.split(",") if t.strip()]
    known = available()
    unknown = [n for n in names if n not in known]
    if not names or unknown:
        raise SystemExit(
            f"--methods: unknown method(s) {', '.join(unknown) or '(none given)'}; known: {', '.join(sorted(known))}"
        )
    return names


def draw_ranks(n_clients: int, seed: int, choices: Sequence[int] = RANK_CHOICES) -> list[int]:
    """Client ranks drawn uniformly (seeded) from ``choices``; client k gets ranks[k]."""
    rng = random.Random(seed)
    return [rng.choice(list(choices)) for _ in range(n_clients)]


def draw_examples(n_clients: int, seed: int) -> list[int]:
    """Clients' numbers of examples (the data-size weights p_k), seeded, 50..500."""
    rng = random.Random(seed + 1)
    return [rng.randint(50, 500) for _ in range(n_clients)]


def environment() -> dict:
    """Where the numbers were taken: they mean little without the machine."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
    }


def fmt_bytes(n: float) -> str:
    """Human-readable size in binary units (KiB, MiB, GiB)."""
    n = float(n)
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{sign}{n:.0f} {unit}" if unit == "B" else f"{sign}{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.0f} us"
    if s < 1:
        return f"{s * 1e3:.1f} ms"
    return f"{s:.2f} s"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain text table, columns right-aligned except the first."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for j, row in enumerate(cells):
        parts = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        lines.append("  ".join(parts))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(path: str | os.PathLike, payload: dict) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, out)
    return out


ROOT = Path(__file__).resolve().parents[1]


def repo_relative(p: Path) -> str:
    """``p`` relative to the repository root where it lies inside it (what a results JSON records), else as given."""
    try:
        return str(p.resolve().relative_to(ROOT))
    except ValueError:
        return str(p)


def status_kib(field: str) -> int | None:
    """A ``VmXXX:`` field of /proc/self/status in KiB (None where /proc is not Linux's)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


# ------------------------------------------------------------------------------------------ shared results files


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive fcntl lock on the sidecar ``path`` (created if missing) for the block's duration."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def write_stage(
    path: Path, key: str, stage: dict, header: dict, before_write: Callable[[dict], None] | None = None
) -> dict:
    """Write ``stage`` as ``key`` of the results JSON ``path`` without losing what others wrote there: under a
    lock on ``PATH.lock`` the file is re-read, its other keys kept, the ``header`` keys set, and ``stage['runs']``
    merged by run key with the runs on disk (one on disk but not in ``stage`` is kept, and added to ``stage``,
    so another process's finished runs survive and are counted), ``before_write(stage)`` called (to recount
    what depends on the runs); then written atomically. Returns what was written. A file that is not a JSON
    object is refused, never overwritten."""
    with _locked(path.with_name(path.name + ".lock")):
        on_disk: dict = {}
        if path.is_file():
            try:
                on_disk = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise SystemExit(f"{path}: not readable JSON ({e}); move it away or pass another --json") from None
            if not isinstance(on_disk, dict):
                raise SystemExit(f"{path}: not a JSON object; move it away or pass another --json")
        for run_key, rec in ((on_disk.get(key) or {}).get("runs") or {}).items():
            stage.setdefault("runs", {}).setdefault(run_key, rec)
        # in key order, so that two processes' writes of the same runs are the same file (and diffs stay small)
        stage["runs"] = dict(sorted(stage.get("runs", {}).items()))
        if before_write is not None:
            before_write(stage)
        on_disk.update(header)
        on_disk[key] = stage
        write_json(path, on_disk)
        return on_disk


CLAIM_SUFFIX = ".claim"


def _claim_path(run_dir: Path) -> Path:
    # beside the run directory, not in it: an unfinished run directory is deleted before it is started over
    return run_dir.with_name(run_dir.name + CLAIM_SUFFIX)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def claim_holder(run_dir: Path) -> int | None:
    """The pid of the live process that has claimed ``run_dir`` (None: no claim, or a stale one: its
    process is gone)."""
    try:
        pid = int(_claim_path(run_dir).read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _pid_alive(pid) else None


def claim_run(run_dir: Path) -> int | None:
    """Claim ``run_dir`` for this process: an O_EXCL claim file beside it holding this pid. Returns None when
    this process holds the claim (newly, or already), else the pid of the live process holding it. A claim
    whose process is gone is stale and taken over; the check and the takeover happen under a lock, so two
    processes never both take over one stale claim."""
    path = _claim_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path.parent / ".claims.lock"):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            holder = claim_holder(run_dir)
            if holder == os.getpid():
                return None
            if holder is not None:
                return holder
            path.unlink()  # stale
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()}\n")
    return None


def release_run(run_dir: Path) -> None:
    """Drop this process's claim on ``run_dir`` (a claim of another process is left alone)."""
    path = _claim_path(run_dir)
    with _locked(path.parent / ".claims.lock"):
        try:
            if int(path.read_text().strip()) == os.getpid():
                path.unlink()
        except (OSError, ValueError):
            pass
