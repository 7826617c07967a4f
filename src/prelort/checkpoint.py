"""Atomic save / resume of the server state (docs/design.md sections 7-8): the checkpoint format.

Layout: ``RUN_DIR/checkpoints/round-N/adapter.safetensors`` (the global state's tensors) and
``RUN_DIR/checkpoints/round-N/state.json`` (``{"round": N, **info, "method_meta": state.meta}``). This module
sits below :class:`prelort.rundir.RunDir`, the run directory's owner: code outside the two asks RunDir for
checkpoint paths and rounds (``checkpoint_dir``, ``checkpoint_rounds``, ``latest_intact_round``), and the
round loop saves and loads through the functions here.

Atomicity: a round is written into a temporary sibling directory ``.round-N.tmp-*``, its files are
fsynced, and only then is it renamed to ``round-N``. A crash therefore never leaves a half-written
``round-N``: every ``round-N`` directory is complete. Replacing an existing ``round-N`` first renames
it aside to ``.round-N.old-*``; if a crash strikes between the two renames, :func:`recover` (run by
the writer, :func:`save_checkpoint`) puts the old one back. Readers (:func:`load_checkpoint`,
:func:`latest_round`) only ignore leftovers and never delete them, because a reader such as
``prelort eval`` may run while the writer is mid-save.

Integrity: each round also holds ``checksums.json`` (sha256 of its two files). Loading the latest round
(``round_=None``) verifies it and, when it is damaged, falls back to the last intact round with a warning
(:func:`latest_intact_round`). A round without ``checksums.json`` (an earlier version's) is damaged when its
state.json or its adapter cannot be read: a truncated adapter falls back as a checksum mismatch does.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .methods.base import FederationSpec, GlobalState

ADAPTER_FILE = "adapter.safetensors"
STATE_FILE = "state.json"
# sha256 of the two files above, written with them: a checkpoint damaged later (truncated, edited, bit rot)
# is detected on load. Checkpoints of earlier versions have none: only an adapter that cannot be read
# (truncated) counts as damaged there.
CHECKSUM_FILE = "checksums.json"
_ROUND_DIR = re.compile(r"round-(\d+)")
_TMP_DIR = re.compile(r"\.round-(\d+)\.(tmp|old)-.+")
log = logging.getLogger("prelort")


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or corrupt; the message names the file."""


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def round_dir(run_dir: str | Path, round_: int) -> Path:
    return checkpoints_dir(run_dir) / f"round-{round_}"


# ----------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------
def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def recover(run_dir: str | Path) -> None:
    """Clean up after an interrupted :func:`save_checkpoint` (only the writer may call this).

    Deletes ``.round-N.tmp-*`` directories (never renamed, so incomplete or superseded), restores
    ``.round-N.old-*`` when ``round-N`` is missing (the crash hit between the two renames of a
    replacement), and deletes the remaining ``.old`` directories.
    """
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return
    leftovers = sorted(p for p in root.iterdir() if _TMP_DIR.fullmatch(p.name))
    for p in leftovers:
        if _TMP_DIR.fullmatch(p.name).group(2) == "tmp":
            shutil.rmtree(p, ignore_errors=True)
    for p in leftovers:
        m = _TMP_DIR.fullmatch(p.name)
        if m.group(2) == "old" and p.exists():
            target = root / f"round-{m.group(1)}"
            if not target.exists():
                os.replace(p, target)
            else:
                shutil.rmtree(p, ignore_errors=True)


def save_checkpoint(run_dir: str | Path, round_: int, state: GlobalState, info: dict[str, Any]) -> Path:
    """Write ``checkpoints/round-N/`` atomically and return its path.

    ``info`` is everything resume needs besides the tensors and ``state.meta``: at least "method",
    "modules" ({name: [d_out, d_in]}), "client_ranks", "alpha", "rng" (see :func:`rng_state`), and
    optionally "options"; it must be JSON-able and may not use the keys "round" or "method_meta".
    """
    if type(round_) is not int or round_ < 0:
        raise ValueError(f"round must be a non-negative integer, got {round_!r}")
    clash = {"round", "method_meta"} & set(info)
    if clash:
        raise ValueError(f"info may not contain {sorted(clash)} (save_checkpoint writes them)")
    doc = {"round": round_, **info, "method_meta": state.meta}
    text = json.dumps(doc, indent=1) + "\n"  # before touching the disk: fails if not JSON-able
    # clone: safetensors refuses tensors that share storage
    tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in state.tensors.items()}

    root = checkpoints_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    recover(run_dir)
    final = root / f"round-{round_}"
    tmp = Path(tempfile.mkdtemp(prefix=f".round-{round_}.tmp-", dir=root))
    old: Path | None = None
    try:
        save_file(tensors, str(tmp / ADAPTER_FILE))
        (tmp / STATE_FILE).write_text(text)
        sums = {name: _sha256(tmp / name) for name in (ADAPTER_FILE, STATE_FILE)}
        (tmp / CHECKSUM_FILE).write_text(json.dumps(sums, indent=1) + "\n")
        for name in (ADAPTER_FILE, STATE_FILE, CHECKSUM_FILE):
            _fsync_path(tmp / name)
        _fsync_path(tmp)
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".round-{round_}.old-", dir=root))
            os.replace(final, old)  # replaces the empty placeholder directory
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_path(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and old.exists() and not final.exists():
            os.replace(old, final)  # put the previous round-N back
        raise
    return final


# ----------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------
def available_rounds(run_dir: str | Path) -> list[int]:
    """The rounds with a ``round-N`` directory, ascending (leftover temporary directories ignored)."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    rounds = []
    for p in root.iterdir():
        m = _ROUND_DIR.fullmatch(p.name)
        if m and p.is_dir():
            rounds.append(int(m.group(1)))
    return sorted(rounds)


def latest_round(run_dir: str | Path) -> int | None:
    """The last checkpointed round (0 = the initial state), or None when there is none."""
    rounds = available_rounds(run_dir)
    return rounds[-1] if rounds else None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_readable(path: Path) -> None:
    """Raise :class:`CheckpointError` unless ``path`` is a safetensors file whose header covers the whole file
    (a truncated or padded one does not); reads the header only."""
    try:
        with safe_open(str(path), framework="pt"):
            pass
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint file {path} is not a readable safetensors file: {e}") from None


def verify_round(run_dir: str | Path, round_: int) -> None:
    """Raise :class:`CheckpointError` unless round ``round_``'s files are present and match its checksums."""
    d = round_dir(run_dir, round_)
    for name in (ADAPTER_FILE, STATE_FILE):
        if not (d / name).is_file():
            raise CheckpointError(f"checkpoint file {d / name} is missing")
    sums_path = d / CHECKSUM_FILE
    if not sums_path.exists():
        # written by an earlier version (or its checksums lost): nothing to compare with, but an adapter that
        # cannot be read (truncated) is as damaged as one that fails its checksum
        _check_readable(d / ADAPTER_FILE)
        return
    try:
        sums = json.loads(sums_path.read_text())
        expected = {name: str(sums[name]) for name in (ADAPTER_FILE, STATE_FILE)}
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint file {sums_path} is damaged: {e}") from None
    for name, digest in expected.items():
        if _sha256(d / name) != digest:
            raise CheckpointError(f"checkpoint file {d / name} does not match its checksum (damaged or edited)")


def latest_intact_round(run_dir: str | Path) -> int | None:
    """The last round whose checkpoint is complete and matches its checksums (one without checksums: whose
    state.json and adapter can be read); each damaged later round is skipped with a warning. None when there is no checkpoint at all; :class:`CheckpointError` when every
    one is damaged."""
    rounds = available_rounds(run_dir)
    problems = []
    for r in reversed(rounds):
        try:
            verify_round(run_dir, r)
            read_state_json(run_dir, r)
        except CheckpointError as e:
            log.warning("checkpoint of round %d is damaged (%s); falling back to the previous round", r, e)
            problems.append(str(e))
            continue
        return r
    if problems:
        raise CheckpointError(f"no intact checkpoint in {checkpoints_dir(run_dir)}: {problems[0]}")
    return None


def _resolve_round(run_dir: str | Path, round_: int | None) -> int:
    if round_ is None:
        round_ = latest_intact_round(run_dir)
        if round_ is None:
            raise CheckpointError(f"no checkpoint in {checkpoints_dir(run_dir)}")
    elif not round_dir(run_dir, round_).is_dir():
        raise CheckpointError(f"no checkpoint for round {round_}: {round_dir(run_dir, round_)} does not exist")
    return round_


def read_state_json(run_dir: str | Path, round_: int | None = None) -> tuple[int, dict[str, Any]]:
    """``(round, state.json contents)`` of ``round_`` (default: the latest)."""
    round_ = _resolve_round(run_dir, round_)
    path = round_dir(run_dir, round_) / STATE_FILE
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path} is missing") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"checkpoint file {path} is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise CheckpointError(f"checkpoint file {path}: expected a JSON object, got {type(doc).__name__}")
    if doc.get("round") != round_:
        raise CheckpointError(f"checkpoint file {path} says round {doc.get('round')!r}, its directory says {round_}")
    if not isinstance(doc.get("method_meta", {}), dict):
        raise CheckpointError(f"checkpoint file {path}: 'method_meta' must be an object")
    return round_, doc


def load_checkpoint(run_dir: str | Path, round_: int | None = None) -> tuple[int, GlobalState, dict[str, Any]]:
    """``(round, state, info)`` of ``round_`` (default: the latest complete round).

    ``info`` is the dict given to :func:`save_checkpoint`; raises :class:`CheckpointError`.
    """
    round_ = _resolve_round(run_dir, round_)
    verify_round(run_dir, round_)
    round_, doc = read_state_json(run_dir, round_)
    path = round_dir(run_dir, round_) / ADAPTER_FILE
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint file {path} is not a readable safetensors file: {e}") from None
    meta = doc.pop("method_meta", {})
    doc.pop("round")
    return round_, GlobalState(tensors=tensors, meta=meta), doc


def spec_from_checkpoint(run_dir: str | Path, round_: int | None = None) -> tuple[FederationSpec, str]:
    """The federation spec and method name recorded in a checkpoint's state.json (default: latest)."""
    round_, doc = read_state_json(run_dir, round_)
    path = round_dir(run_dir, round_) / STATE_FILE
    missing = [k for k in ("method", "modules", "client_ranks", "alpha") if k not in doc]
    if missing:
        raise CheckpointError(f"checkpoint file {path} lacks {missing}")
    try:
        modules = {str(name): (int(shape[0]), int(shape[1])) for name, shape in dict(doc["modules"]).items()}
        ranks = tuple(int(r) for r in doc["client_ranks"])
        spec = FederationSpec(
            modules=modules, client_ranks=ranks, alpha=float(doc["alpha"]), options=dict(doc.get("options") or {})
        )
    except (TypeError, ValueError, IndexError, KeyError) as e:
        raise CheckpointError(f"checkpoint file {path}: malformed modules/client_ranks/alpha/options: {e}") from None
    if not ranks or min(ranks) <= 0 or not modules or not isinstance(doc["method"], str):
        raise CheckpointError(f"checkpoint file {path}: needs a method name, modules and positive client ranks")
    return spec, doc["method"]


# ----------------------------------------------------------------------------------------------
# RNG state as JSON
# ----------------------------------------------------------------------------------------------
def rng_state(generator: torch.Generator) -> str:
    """A torch generator's state as a JSON-able string (base64 of ``get_state()`` bytes)."""
    return base64.b64encode(generator.get_state().numpy().tobytes()).decode("ascii")


def set_rng_state(generator: torch.Generator, state: str) -> torch.Generator:
    """Restore a state from :func:`rng_state`; returns ``generator``."""
    try:
        raw = base64.b64decode(state.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, AttributeError) as e:
        raise CheckpointError(f"RNG state is not base64 text: {e}") from None
    try:
        generator.set_state(torch.frombuffer(bytearray(raw), dtype=torch.uint8).clone())
    except (RuntimeError, ValueError) as e:
        raise CheckpointError(f"RNG state does not fit a {generator.device} torch.Generator: {e}") from None
    return generator


def random_state(rng: random.Random) -> list[Any]:
    """A ``random.Random`` state as JSON-able ``[version, [625 ints], gauss_next]``."""
    version, internal, gauss_next = rng.getstate()
    return [version, list(internal), gauss_next]


def set_random_state(rng: random.Random, state: list[Any]) -> random.Random:
    """Restore a state from :func:`random_state`; returns ``rng``."""
    try:
        version, internal, gauss_next = state
        rng.setstate((version, tuple(internal), gauss_next))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"Python RNG state is malformed: {e}") from None
    return rng
