"""Run directories: what may become one, who may write it, and what ``--resume`` may change.

* A run directory is marked as prelort's by :data:`MARKER` (written before anything else). ``prelort run``
  only writes into a directory that is new, empty, or already marked; it never takes ``/``, the home
  directory or the current directory themselves, so a mistyped ``--out`` cannot mix a run into (or
  overwrite) a user's own files.
* One process at a time: :func:`acquire_lock` creates :data:`LOCK` exclusively, holding the writer's PID
  and process start time. It is removed when the process exits; a lock whose process is gone (killed) is
  stale and taken over.
* ``--resume`` compares the whole resolved config with the run's ``config.yaml``; only the sections in
  :data:`SAFE_TO_CHANGE` may differ. Without ``config.yaml`` the config given again is checked against
  what the latest checkpoint records (method, seed, ranks, alpha, options).
* ``metrics.jsonl`` is appended one record a line through :class:`MetricsLog`.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
from pathlib import Path
from typing import Any

from .config import Config, ConfigError

log = logging.getLogger("prelort")

MARKER = ".prelort-run"
LOCK = ".prelort.lock"
# Keys (dotted prefixes) a resumed run may change: they decide how and when the global model is evaluated,
# where the rounds run (Flower addresses, timeouts, the device), whether accepted updates are kept, and how
# many rounds there are (a resumed run may be extended) - never what a round computes.
SAFE_TO_CHANGE = ("eval", "rounds", "audit", "flower", "model.device")


class RunDirError(FileExistsError):
    """A directory prelort must not use as this run's directory; the message says why and what to do."""


# ----------------------------------------------------------------------------------------------
# which directory
# ----------------------------------------------------------------------------------------------
def _protected(path: Path) -> str | None:
    resolved = path.expanduser().resolve()
    if resolved == Path(resolved.anchor):
        return "the filesystem root"
    for what, place in (("your home directory", Path.home()), ("the current directory", Path.cwd())):
        try:
            if resolved == place.resolve():
                return what
        except OSError:
            continue
    return None


def is_run_dir(path: Path) -> bool:
    """A directory prelort made: it holds the marker, or (run directories of earlier versions) checkpoints/."""
    return (path / MARKER).is_file() or (path / "checkpoints").is_dir()


def check_out(path: str | Path, resume: bool) -> Path:
    """Refuse an ``--out`` prelort must not write (nothing is created here); returns the path."""
    path = Path(path)
    protected = _protected(path)
    if protected:
        raise RunDirError(f"--out {path} is {protected}; give a new directory for the run, e.g. --out runs/NAME")
    if path.exists() and not path.is_dir():
        raise RunDirError(f"--out {path} exists and is not a directory")
    if resume:
        if not (path / "checkpoints").is_dir():
            raise FileNotFoundError(f"--resume: {path} has no checkpoints/ to resume from")
        return path
    if path.is_dir():
        if (path / "checkpoints").exists():
            raise RunDirError(f"{path} already holds a run; use --resume to continue it or choose another --out")
        if not (path / MARKER).is_file() and any(path.iterdir()):
            raise RunDirError(f"{path} is not empty and is not a prelort run directory; prelort will not write "
                              "into it (choose a new or empty --out)")
    return path


# ----------------------------------------------------------------------------------------------
# the lock
# ----------------------------------------------------------------------------------------------
_held: dict[Path, str] = {}  # lock files this process holds -> their content


def _start_time(pid: int) -> str | None:
    """The process's start time (Linux /proc), so a PID reused by another process is not mistaken for ours."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19]  # field 22 of stat: starttime


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


def _holder(lock: Path) -> dict[str, Any] | None:
    """The lock's content if a live process holds it, else None (stale or unreadable)."""
    try:
        info = json.loads(lock.read_text())
        pid = int(info["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if info.get("host") != socket.gethostname():
        return info  # another machine's process: cannot be checked, so it counts as alive
    if not _alive(pid):
        return None
    started = info.get("started")
    if started is not None and _start_time(pid) not in (None, started):
        return None  # the PID now belongs to another process
    return info


def _release(lock: Path) -> None:
    content = _held.pop(lock, None)
    try:
        if content is not None and lock.read_text() == content:
            lock.unlink()
    except OSError:
        pass


def acquire_lock(run_dir: Path) -> Path:
    """Take ``run_dir``'s lock for this process (again, if it holds it already); raises :class:`RunDirError`
    while another live process holds it. Released when the process exits."""
    lock = run_dir / LOCK
    key = lock.resolve()
    if key in _held:
        return lock
    content = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": _start_time(os.getpid())})
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder = _holder(lock)
            if holder is not None:
                raise RunDirError(f"{run_dir} is in use by another prelort run (PID {holder.get('pid')} on "
                                  f"{holder.get('host')}); wait for it to finish or choose another --out") from None
            log.warning("taking over the stale lock %s (its process is gone)", lock)
            try:
                lock.unlink()
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(fd, "w") as f:
            f.write(content)
        _held[key] = content
        atexit.register(_release, key)
        return lock
    raise RunDirError(f"could not take the lock {lock}; another prelort run is starting on {run_dir}")


# ----------------------------------------------------------------------------------------------
# --resume: what may change
# ----------------------------------------------------------------------------------------------
def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: data}


def _safe(key: str) -> bool:
    return any(key == s or key.startswith(s + ".") for s in SAFE_TO_CHANGE)


def config_changes(old: Config, new: Config) -> list[str]:
    """Dotted keys whose value differs between two configs, except those :data:`SAFE_TO_CHANGE`."""
    a, b = _flatten(old.to_dict()), _flatten(new.to_dict())
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and not _safe(k))


def load_saved_config(run_dir: Path) -> Config:
    """The run's config.yaml as a validated Config; :class:`ConfigError` (one line) when it is not one."""
    from . import config as config_mod

    try:
        return config_mod.load(run_dir / "config.yaml")
    except ConfigError as e:
        reason = " ".join(str(e).split())  # one line, whatever the YAML parser's message looked like
        raise ConfigError(f"--resume: the run's config.yaml is not a valid prelort config ({reason}); restore it or "
                          "start a new run") from None


def check_against_checkpoint(run_dir: Path, cfg: Config) -> None:
    """Without config.yaml: the config given must match what the latest checkpoint recorded."""
    from . import checkpoint as ckpt

    try:
        _, doc = ckpt.read_state_json(run_dir)
    except ckpt.CheckpointError as e:
        raise ConfigError(f"--resume: {run_dir} has no config.yaml and its checkpoint cannot be read: {e}") from None
    from . import methods

    expected = {"method": cfg.method, "seed": cfg.seed, "client_ranks": cfg.clients.all_ranks(),
                "alpha": cfg.lora.alpha, "options": methods.spec_options(cfg.method_options)}
    differ = [k for k, v in expected.items() if k in doc and doc[k] != v]
    if differ:
        shown = ", ".join(f"{k}: run {doc[k]!r}, given {expected[k]!r}" for k in differ)
        raise ConfigError(f"--resume: {run_dir} has no config.yaml and the config given differs from its checkpoint "
                          f"({shown}); a resumed run must keep them")


def check_resume_config(run_dir: Path, cfg: Config) -> None:
    """Refuse a resume whose config changes anything but :data:`SAFE_TO_CHANGE` (one-line ConfigError)."""
    if not (run_dir / "config.yaml").is_file():
        check_against_checkpoint(run_dir, cfg)
        log.warning("--resume: %s had no config.yaml; using the config given (it matches the checkpoint's method, "
                    "seed, ranks and options)", run_dir)
        return
    changed = config_changes(load_saved_config(run_dir), cfg)
    if changed:
        shown = ", ".join(changed[:8]) + (f" and {len(changed) - 8} more" if len(changed) > 8 else "")
        raise ConfigError(f"--resume: the config differs from the run's config.yaml in {shown}; a resumed run may "
                          f"change only {', '.join(SAFE_TO_CHANGE)}")


# ----------------------------------------------------------------------------------------------
# all of it
# ----------------------------------------------------------------------------------------------
def prepare(run_dir: str | Path, cfg: Config, resume: bool) -> Path:
    """Make (or reopen) ``run_dir`` for writing: checks, marker first, lock, resume comparison, config.yaml."""
    from . import __version__

    d = check_out(run_dir, resume)
    if resume:
        check_resume_config(d, cfg)  # read-only; before the lock so a refused resume changes nothing
    d.mkdir(parents=True, exist_ok=True)
    if not (d / MARKER).is_file():
        (d / MARKER).write_text(json.dumps({"prelort": __version__}) + "\n")
    lock = acquire_lock(d)
    try:  # again under the lock: another run may have finished in this directory meanwhile
        check_out(d, resume)
        if resume:
            check_resume_config(d, cfg)
    except BaseException:
        _release(lock.resolve())
        raise
    (d / "config.yaml").write_text(cfg.to_yaml())
    return d


class MetricsLog:
    """metrics.jsonl: append one JSON object per line (flushed, so a crash loses at most one line)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def truncate_after(self, round_: int) -> None:
        """On resume, drop records of rounds after the last checkpoint (they will be recomputed)."""
        if not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
            if rec.get("round", 0) <= round_:
                keep.append(json.dumps(rec))
        self.path.write_text("".join(k + "\n" for k in keep))

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
