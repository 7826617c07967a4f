"""The run directory's owner: its files (docs/design.md section 7), who may write them, what ``--resume`` may
change, and when a run is complete.

:class:`RunDir` names every file of a run directory and reads and writes them; everything else (the runner,
the report, ``prelort check``, the CLI, the benchmarks) goes through it instead of joining paths itself:

* ``.prelort-run`` (:data:`MARKER`, written before anything else). ``prelort run`` only writes into a
  directory that is new, empty, or already marked (:func:`check_out`); it never takes ``/``, the home
  directory or the current directory themselves, so a mistyped ``--out`` cannot mix a run into (or
  overwrite) a user's own files.
* ``.prelort.lock`` (:data:`LOCK`): one process at a time. :meth:`RunDir.acquire_lock` holds an exclusive
  ``flock`` on it for the life of the process, so the kernel decides who holds it and a killed process's lock
  goes with it; the file's content (the holder's PID, host and start time) only names the holder when
  another run is refused. The file is removed when the process exits or releases it.
* ``config.yaml``: the resolved config. ``--resume`` compares the whole config given with it; only the
  sections in :data:`SAFE_TO_CHANGE` may differ. Without ``config.yaml`` the config given again is checked
  against what the latest checkpoint records (method, seed, ranks, alpha, options).
* ``metrics.jsonl``: one record a line (:func:`train_record`, :meth:`RunDir.write_evaluation`), appended
  through :class:`MetricsLog`; ``eval/round-N.jsonl``: one line per evaluated example and tier, rewritten
  atomically, a tier's lines replaced (never appended to) when it is evaluated again.
* ``run.log``, ``summary.csv``, ``plots/``, ``adapters/rank-T/``, ``updates/round-N/``: their paths.
* Optional: ``tb/`` (TensorBoard event files) and ``mlflow.db`` (the default MLflow store) with ``tracking:``
  (:mod:`prelort.tracking`, which mirrors every metrics.jsonl record through :attr:`RunDir.record_observers`),
  and ``eval/lm-eval-rank-T.json`` / ``eval/lm-eval-base.json``, the lm-evaluation-harness scores ``prelort eval
  --lm-eval`` writes (nothing a run reads).
* ``checkpoints/round-N/``: the format (atomic writes, checksums, state.json) is :mod:`prelort.checkpoint`'s,
  below this module; :class:`RunDir` hands out its paths and rounds to everyone else.

A run is complete (:meth:`RunDir.is_complete`) when the last round's checkpoint is intact, every record
of that round is in metrics.jsonl (:meth:`RunDir.rounds_complete`), and the files written from them exist:
config.yaml, run.log, the per-tier adapters, summary.csv and the plots (:meth:`RunDir.missing_outputs`).

What other commands write beside a run (``prelort export``'s adapter, ``prelort report --out``'s comparison)
goes nowhere ``run`` would not go either, never into a run's own files, and never over a user's files unless
``--force`` (:func:`check_output_dir`).
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import json
import logging
import os
import re
import socket
import stat
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .config import Config, ConfigError, file_kind
from .metrics import names as metric_names

log = logging.getLogger("prelort")

MARKER = ".prelort-run"
LOCK = ".prelort.lock"
CONFIG_FILE = "config.yaml"
LOG_FILE = "run.log"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.csv"
PLOTS_DIR = "plots"
EVAL_DIR = "eval"
ADAPTERS_DIR = "adapters"
UPDATES_DIR = "updates"
TB_DIR = "tb"
MLFLOW_DB = "mlflow.db"
# Keys (dotted prefixes) a resumed run may change: they decide how and when the global model is evaluated,
# where the rounds run (Flower addresses, timeouts, the device), whether accepted updates are kept, where the
# records are mirrored (tracking), and how many rounds there are (a resumed run may be extended) - never what a round computes.
SAFE_TO_CHANGE = ("eval", "rounds", "audit", "flower", "model.device", "tracking", "tracking_uri")
# The plots prelort.report.write_run_report draws for every finished run (it has evaluation, tier and training
# records), and the one it adds when the training records carry an epsilon (privacy.dp with noise).
FINISHED_RUN_PLOTS = ("metrics_by_round.png", "truncation_curve.png", "train_loss.png")
EPSILON_PLOT = "privacy_epsilon.png"
# the keys of a metrics.jsonl record that say which evaluation it is, not what it measured
RECORD_KEYS = ("round", "rank", "kind", "method", "seed")


class RunDirError(FileExistsError):
    """A directory prelort must not use as this run's directory; the message says why and what to do."""


# ----------------------------------------------------------------------------------------------
# the records of metrics.jsonl
# ----------------------------------------------------------------------------------------------
DIAGNOSTIC_KEYS = ("dim_clients", "dim_steps", "passes", "optimizer_steps", "diagnostics_reported")


def train_record(
    cfg: Config, round_: int, summary: dict[str, Any], privacy: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A round's training record: the outcome's summary, its per-dimension diagnostics and (privacy.dp) the
    accounted epsilon. Training records carry the contract's fields too (no tier evaluated: rank and metrics null)."""
    return {
        "round": round_,
        "rank": None,
        "kind": "train",
        **dict.fromkeys(metric_names()),
        "train_loss": summary.get("train_loss"),
        "accepted": summary.get("accepted"),
        "rejected": summary.get("rejected"),
        "failed": summary.get("failed"),
        "seconds": summary.get("seconds"),
        "method": cfg.method,
        **{k: summary.get(k) for k in DIAGNOSTIC_KEYS},
        "clients": summary.get("clients"),
        **(privacy or {}),
    }


# the sums of a federated_eval record, each added up over the tier's sites
FEDERATED_EVAL_SUMS = ("n", "correct", "loglik_sum", "tokens", "sites")


def federated_eval_record(cfg: Config, round_: int, tier: int, sums: dict[str, Any]) -> dict[str, Any]:
    """One rank tier's on-site evaluation after ``round_`` (kind ``federated_eval``): the sites' summed counts,
    nothing per example or per site. The contract's metric fields are null (a site reports sums, not metrics)."""
    return {
        "round": round_,
        "rank": tier,
        "kind": "federated_eval",
        **dict.fromkeys(metric_names()),
        **{k: sums[k] for k in FEDERATED_EVAL_SUMS},
        "method": cfg.method,
        "seed": cfg.seed,
    }


def expected_records(cfg: Config, round_: int) -> list[tuple[str, Any]]:
    """The (kind, rank) records a finished round ``round_`` has in metrics.jsonl (the last one: with its curve)."""
    from .evaluate import truncation_tiers

    if round_ == 0:
        return [("base", "base")] if cfg.eval.base else []
    tiers = sorted(set(cfg.clients.all_ranks()))
    keys: list[tuple[str, Any]] = [("train", None)]
    if round_ % cfg.eval.every == 0 or round_ == cfg.rounds:
        keys += [("tier", t) for t in tiers]
    if round_ == cfg.rounds and cfg.eval.truncation_curve:
        keys += [("curve", t) for t in truncation_tiers(max(tiers))]
    return keys


def _json_lines(text: str) -> list[dict[str, Any]]:
    """The JSON objects of a JSON-lines text; a line cut by a crash (or anything not an object) is skipped."""
    out = []
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


class MetricsLog:
    """metrics.jsonl: one JSON object per line, appended (flushed, so a crash loses at most one line) and read
    back by round and (kind, rank); :meth:`truncate_after` drops the rounds a resume recomputes. Each record
    written is then handed to every callable in ``observers`` (experiment tracking)."""

    def __init__(self, path: Path, observers: list[Callable[[dict[str, Any]], None]] | None = None):
        self.path = Path(path)
        self.observers = observers if observers is not None else []

    def read_text(self) -> str:
        """The whole file as written (FileNotFoundError when there is none)."""
        return self.path.read_text(encoding="utf-8")

    def records(self) -> list[dict[str, Any]]:
        """Every record in file order; lines cut by a crash are skipped; none when there is no file."""
        return _json_lines(self.read_text()) if self.path.is_file() else []

    def records_by_key(self, round_: int) -> dict[tuple[str, Any], dict[str, Any]]:
        """The records of ``round_`` by (kind, rank), the first of each; lines cut by a crash are skipped."""
        out: dict[tuple[str, Any], dict[str, Any]] = {}
        for rec in self.records():
            if rec.get("round") == round_:
                out.setdefault((rec.get("kind"), rec.get("rank")), rec)
        return out

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
        for observe in self.observers:
            observe(record)


# ----------------------------------------------------------------------------------------------
# the run directory
# ----------------------------------------------------------------------------------------------
class RunDir:
    """One run directory: the path of each of its files, their reading and writing, completeness, the lock.

    Constructing one touches nothing; :meth:`prepare` makes (or reopens) the directory for writing.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        # called with each record written to metrics.jsonl (prelort.tracking mirrors them)
        self.record_observers: list[Callable[[dict[str, Any]], None]] = []

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # -- the files --------------------------------------------------------------------------------------
    @property
    def marker(self) -> Path:
        return self.path / MARKER

    @property
    def lock_file(self) -> Path:
        return self.path / LOCK

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def log_file(self) -> Path:
        return self.path / LOG_FILE

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def summary_csv(self) -> Path:
        return self.path / SUMMARY_FILE

    @property
    def plots_dir(self) -> Path:
        return self.path / PLOTS_DIR

    @property
    def eval_dir(self) -> Path:
        return self.path / EVAL_DIR

    def eval_file(self, round_: int) -> Path:
        return self.eval_dir / f"round-{round_}.jsonl"

    @property
    def adapters_dir(self) -> Path:
        return self.path / ADAPTERS_DIR

    def adapter_dir(self, rank: int) -> Path:
        """``adapters/rank-T/``: the PEFT adapter of rank tier ``rank``."""
        return self.adapters_dir / f"rank-{rank}"

    def adapter_dirs(self) -> list[Path]:
        """The ``adapters/rank-*`` present, sorted by name."""
        return sorted(self.adapters_dir.glob("rank-*"))

    @property
    def updates_dir(self) -> Path:
        return self.path / UPDATES_DIR

    def update_stem(self, round_: int, client: int) -> Path:
        """``updates/round-N/client-K``: an audited update is this path + ``.safetensors`` and ``.json``."""
        return self.updates_dir / f"round-{round_}" / f"client-{client}"

    def update_files(self) -> list[Path]:
        """Every audited update's ``.safetensors`` file, sorted."""
        return sorted(self.updates_dir.glob("round-*/client-*.safetensors"))

    @property
    def tb_dir(self) -> Path:
        """``tb/``: TensorBoard's event files (``tracking: [tensorboard]``)."""
        return self.path / TB_DIR

    @property
    def mlflow_db(self) -> Path:
        """``mlflow.db``: the MLflow store of ``tracking: [mlflow]`` when no ``tracking_uri`` is given."""
        return self.path / MLFLOW_DB

    def lm_eval_file(self, rank: int | str) -> Path:
        """``eval/lm-eval-rank-T.json`` (``eval/lm-eval-base.json`` for ``"base"``): the lm-evaluation-harness
        scores ``prelort eval --lm-eval`` writes for one tier."""
        return self.eval_dir / ("lm-eval-base.json" if rank == "base" else f"lm-eval-rank-{rank}.json")

    def lm_eval_files(self) -> list[Path]:
        """The ``eval/lm-eval-*.json`` present, sorted by name."""
        return sorted(self.eval_dir.glob("lm-eval-*.json"))

    def write_lm_eval(self, rank: int | str, scores: dict[str, Any]) -> Path:
        """Write one tier's lm-evaluation-harness scores (atomically: a temporary file renamed)."""
        path = self.lm_eval_file(rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(scores, indent=2, default=str) + "\n")
        os.replace(tmp, path)
        return path

    def own_paths(self) -> list[Path]:
        """Every file and folder of the run directory that prelort writes (docs/design.md section 7)."""
        return [
            self.marker,
            self.lock_file,
            self.config_file,
            self.log_file,
            self.metrics_file,
            self.summary_csv,
            self.plots_dir,
            self.eval_dir,
            self.adapters_dir,
            self.updates_dir,
            self.checkpoints_dir,
            self.tb_dir,
            self.mlflow_db,
        ]

    def is_run_dir(self) -> bool:
        """Whether this is a run directory: its marker, or (a run of a version before the marker) a checkpoint."""
        return _is_run_dir(self.path)

    # -- checkpoints/ (the format is prelort.checkpoint's; it sits below this module) ------------------------
    @property
    def checkpoints_dir(self) -> Path:
        from . import checkpoint

        return checkpoint.checkpoints_dir(self.path)

    def checkpoint_dir(self, round_: int) -> Path:
        from . import checkpoint

        return checkpoint.round_dir(self.path, round_)

    def checkpoint_rounds(self) -> list[int]:
        """The rounds with a ``checkpoints/round-N`` directory, ascending."""
        from . import checkpoint

        return checkpoint.available_rounds(self.path)

    def latest_intact_round(self) -> int | None:
        """The last round whose checkpoint is complete and intact (its checksums; see prelort.checkpoint)."""
        from . import checkpoint

        return checkpoint.latest_intact_round(self.path)

    def verify_checkpoint(self, round_: int) -> None:
        """Raise CheckpointError (naming the file) unless round ``round_``'s checkpoint files are present and
        match its checksums.json (see prelort.checkpoint.verify_round)."""
        from . import checkpoint

        checkpoint.verify_round(self.path, round_)

    def checkpoint_state(self, round_: int | None = None) -> tuple[int, dict[str, Any]]:
        """``(round, state.json)`` of a checkpoint (default: the latest intact one)."""
        from . import checkpoint

        return checkpoint.read_state_json(self.path, round_)

    def checkpoint_spec(self, round_: int | None = None) -> tuple[Any, str]:
        """``(FederationSpec, method name)`` a checkpoint records (default: the latest intact one)."""
        from . import checkpoint

        return checkpoint.spec_from_checkpoint(self.path, round_)

    # -- config.yaml --------------------------------------------------------------------------------------
    def read_config_data(self) -> Any:
        """config.yaml as parsed YAML, unvalidated (None when there is no config.yaml); raises yaml.YAMLError
        (a key given twice included)."""
        from .config import parse_yaml

        if not self.config_file.is_file():
            return None
        return parse_yaml(self.config_file.read_text(encoding="utf-8"))

    def load_config(self) -> Config:
        """config.yaml as a validated Config; FileNotFoundError when there is none, ConfigError when invalid."""
        from . import config as config_mod

        if not self.config_file.is_file():
            raise FileNotFoundError(f"{self.path} is not a prelort run directory (no config.yaml)")
        return config_mod.load(self.config_file)

    def write_config(self, cfg: Config) -> None:
        self.config_file.write_text(cfg.to_yaml())

    def config_matches(self, cfg: Config, ignore: Sequence[str] = ()) -> bool:
        """Whether config.yaml holds ``cfg`` (as data; the dotted keys in ``ignore`` may differ)."""
        if not self.config_file.is_file():
            return False
        saved, given = self.read_config_data(), cfg.to_dict()
        for data in (saved, given):
            for dotted in ignore:
                *parents, leaf = dotted.split(".")
                node = data
                for part in parents:
                    node = node.get(part, {})
                node.pop(leaf, None)
        return saved == given

    # -- metrics.jsonl ------------------------------------------------------------------------------------
    @property
    def metrics(self) -> MetricsLog:
        return MetricsLog(self.metrics_file, self.record_observers)

    def write_evaluation(
        self,
        round_: int,
        rank: Any,
        kind: str,
        metrics: dict[str, Any],
        examples: Sequence[dict[str, Any]],
        method: str,
        seed: int,
    ) -> dict[str, Any]:
        """One evaluation: its record (appended to metrics.jsonl, returned) and its examples (eval/round-N.jsonl)."""
        rec = {"round": round_, "rank": rank, "kind": kind, **metrics, "method": method, "seed": seed}
        self.metrics.write(rec)
        self.write_eval_examples(round_, rank, kind, examples)
        return rec

    # -- eval/round-N.jsonl -------------------------------------------------------------------------------
    def write_eval_examples(self, round_: int, rank: Any, kind: str, examples: Sequence[dict[str, Any]]) -> Path:
        """Put one evaluation's examples into ``eval/round-N.jsonl``, one JSON line per example:
        {"round", "rank", "kind", "id", "category", "correct", "loglik", "n_tokens", "prediction"}.

        Lines of the same (kind, rank) already in the file are replaced, not appended to (a resumed run
        re-evaluating a round leaves no duplicate), and the file is rewritten atomically (temporary file +
        rename), so a crash leaves either the old or the new file.
        """
        path = self.eval_file(round_)
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    old = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if (old.get("kind"), old.get("rank")) != (kind, rank):
                    kept.append(line)
        new = [json.dumps({"round": round_, "rank": rank, "kind": kind, **ex}) for ex in examples]
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept + new))
        os.replace(tmp, path)
        return path

    def read_eval_examples(self, round_: int, kind: str, rank: Any) -> list[dict[str, Any]]:
        """The examples of one evaluation (kind, rank) in ``eval/round-N.jsonl``, without their round/rank/kind
        (what :meth:`write_eval_examples` takes), e.g. to copy a tier's examples to the truncation curve."""
        path = self.eval_file(round_)
        if not path.is_file():
            return []
        return [
            {k: v for k, v in rec.items() if k not in ("round", "rank", "kind")}
            for rec in _json_lines(path.read_text())
            if (rec.get("kind"), rec.get("rank")) == (kind, rank)
        ]

    def _eval_files(self) -> list[tuple[int, Path]]:
        """``(round, eval/round-N.jsonl)`` in file-name order; a file whose N is no number is left out."""
        out = []
        for path in sorted(self.eval_dir.glob("round-*.jsonl")):
            try:
                out.append((int(path.stem.split("-", 1)[1]), path))
            except ValueError:
                continue
        return out

    def read_eval_records(self) -> dict[int, list[dict[str, Any]]]:
        """``{round: every line of eval/round-N.jsonl}`` (one record per evaluated example and evaluation), in
        file-name order; empty when there is none."""
        return {round_: _json_lines(path.read_text()) for round_, path in self._eval_files()}

    def drop_eval_after(self, round_: int) -> None:
        """On resume: remove eval/round-N.jsonl of rounds after the checkpoint (they are evaluated again)."""
        for n, path in self._eval_files():
            if n > round_:
                path.unlink()

    # -- completeness -------------------------------------------------------------------------------------
    def rounds_complete(self, cfg: Config) -> bool:
        """Whether every round of ``cfg``'s run is done: the last round's checkpoint intact and every record of
        that round (truncation curve included) in metrics.jsonl - what only training and evaluating can write.
        Reads no model."""
        from .checkpoint import CheckpointError

        try:
            if self.latest_intact_round() != cfg.rounds:  # a damaged last round is redone, not "complete"
                return False
        except CheckpointError:  # every checkpoint damaged: resume says so itself
            return False
        have = self.metrics.records_by_key(cfg.rounds)
        return all(k in have for k in expected_records(cfg, cfg.rounds))

    def missing_outputs(self, cfg: Config) -> list[Path]:
        """The files ``cfg``'s finished run leaves besides its rounds and records that are not here: config.yaml,
        run.log, the per-tier adapters, summary.csv and the plots (those ``prelort check`` requires). Each is
        written again from the last checkpoint and metrics.jsonl alone (a disk that filled up after the last
        record, a crash in the report)."""
        tiers = sorted(set(cfg.clients.all_ranks()))
        expected = [self.config_file, self.log_file]
        expected += [self.adapter_dir(t) / "adapter_model.safetensors" for t in tiers]
        expected += [self.summary_csv, *(self.plots_dir / name for name in FINISHED_RUN_PLOTS)]
        train = self.metrics.records_by_key(cfg.rounds).get(("train", None), {})
        if train.get("dp_epsilon") is not None:
            expected.append(self.plots_dir / EPSILON_PLOT)
        return [path for path in expected if not path.is_file()]

    def is_complete(self, cfg: Config) -> bool:
        """Whether this directory holds ``cfg``'s finished run: every round (:meth:`rounds_complete`) and every
        file it leaves (:meth:`missing_outputs`: adapters, summary.csv, plots, run.log, config.yaml). Reads no
        model."""
        return self.rounds_complete(cfg) and not self.missing_outputs(cfg)

    # -- writing: the lock, --resume, prepare -------------------------------------------------------------
    def acquire_lock(self) -> Path:
        """Take the lock for this process (again, if it holds it already); raises :class:`RunDirError` while
        another live process holds it. Released when the run ends (:func:`prelort.runner.run`) or the process
        exits."""
        return _acquire_lock(self.path)

    def release_lock(self) -> None:
        """Let go of the lock (removing the file) if this process holds it; otherwise nothing."""
        _release(_lock_key(self.path))

    def load_saved_config(self) -> Config:
        """--resume: config.yaml as a validated Config; :class:`ConfigError` (one line) when it is not one."""
        try:
            return self.load_config()
        except ConfigError as e:
            reason = " ".join(str(e).split())  # one line, whatever the YAML parser's message looked like
            raise ConfigError(
                f"--resume: the run's config.yaml is not a valid prelort config ({reason}); restore it "
                "or start a new run"
            ) from None

    def check_against_checkpoint(self, cfg: Config) -> None:
        """Without config.yaml: the config given must match what the latest checkpoint recorded."""
        from . import methods
        from .checkpoint import CheckpointError

        run_dir = self.path
        try:
            _, doc = self.checkpoint_state()
        except CheckpointError as e:
            raise ConfigError(
                f"--resume: {run_dir} has no config.yaml and its checkpoint cannot be read: {e}"
            ) from None
        expected = {
            "method": cfg.method,
            "seed": cfg.seed,
            "client_ranks": cfg.clients.all_ranks(),
            "alpha": cfg.lora.alpha,
            "options": methods.spec_options(cfg.method_options),
        }
        differ = [k for k, v in expected.items() if k in doc and doc[k] != v]
        if differ:
            shown = ", ".join(f"{k}: run {doc[k]!r}, given {expected[k]!r}" for k in differ)
            raise ConfigError(
                f"--resume: {run_dir} has no config.yaml and the config given differs from its "
                f"checkpoint ({shown}); a resumed run must keep them"
            )

    def check_resume_config(self, cfg: Config) -> None:
        """Refuse a resume whose config changes anything but :data:`SAFE_TO_CHANGE` (one-line ConfigError)."""
        if not self.config_file.is_file():
            self.check_against_checkpoint(cfg)
            log.warning(
                "--resume: %s had no config.yaml; using the config given (it matches the checkpoint's "
                "method, seed, ranks and options)",
                self.path,
            )
            return
        changed = config_changes(self.load_saved_config(), cfg)
        if changed:
            shown = ", ".join(changed[:8]) + (f" and {len(changed) - 8} more" if len(changed) > 8 else "")
            raise ConfigError(
                f"--resume: the config differs from the run's config.yaml in {shown}; a resumed run "
                f"may change only {', '.join(SAFE_TO_CHANGE)}"
            )

    def prepare(self, cfg: Config, resume: bool) -> RunDir:
        """Make (or reopen) the directory for writing: checks, marker first, lock, resume comparison,
        config.yaml. Returns itself."""
        from . import __version__

        check_out(self.path, resume)
        if resume:
            self.check_resume_config(cfg)  # read-only; before the lock so a refused resume changes nothing
        self.path.mkdir(parents=True, exist_ok=True)
        if not self.marker.is_file():
            self.marker.write_text(json.dumps({"prelort": __version__}) + "\n")
        self.acquire_lock()
        try:  # again under the lock: another run may have finished in this directory meanwhile
            check_out(self.path, resume)
            if resume:
                self.check_resume_config(cfg)
        except BaseException:
            self.release_lock()
            raise
        self.write_config(cfg)
        return self


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


# How many directory entries the search for a run below --out looks at, at most: a run directory nested
# in another is found in its first levels, and a huge directory given by mistake costs milliseconds, not minutes.
SCAN_LIMIT = 20_000
_ROUND_DIR = re.compile(r"round-\d+")  # checkpoints/round-N (prelort.checkpoint's name; it imports torch)


def _is_run_dir(d: Path) -> bool:
    """Whether ``d`` is a prelort run directory: marked, or (a run from before the marker) with checkpoints/round-N."""
    try:
        if (d / MARKER).is_file():
            return True
        checkpoints = d / "checkpoints"
        return checkpoints.is_dir() and any(_ROUND_DIR.fullmatch(p.name) and p.is_dir() for p in checkpoints.iterdir())
    except OSError:  # unreadable: not ours to judge
        return False


def _run_above(path: Path) -> Path | None:
    """The nearest prelort run directory that ``path`` is inside (``path`` itself excluded)."""
    return next((d for d in path.expanduser().resolve().parents if _is_run_dir(d)), None)


def _run_below(path: Path, limit: int | None = None) -> Path | None:
    """A prelort run directory inside ``path`` (``path`` itself excluded), searched breadth first without
    following links; gives up (None) after ``limit`` entries (default :data:`SCAN_LIMIT`)."""
    limit = SCAN_LIMIT if limit is None else limit
    seen = 0
    queue = deque([path])
    while queue:
        d = queue.popleft()
        try:
            with os.scandir(d) as entries:
                for entry in entries:
                    seen += 1
                    if seen > limit:
                        return None
                    if d is not path and entry.name == MARKER and entry.is_file(follow_symlinks=False):
                        return Path(d)
                    if entry.is_dir(follow_symlinks=False):
                        if entry.name == "checkpoints" and d is not path and _has_rounds(entry.path):
                            return Path(d)  # a run from before the marker
                        queue.append(entry.path)
        except OSError:  # unreadable: skipped
            continue
    return None


def _has_rounds(checkpoints: str) -> bool:
    try:
        return any(_ROUND_DIR.fullmatch(name) for name in os.listdir(checkpoints))
    except OSError:
        return False


def check_out(path: str | Path, resume: bool) -> Path:
    """Refuse an ``--out`` prelort must not write (nothing is created here); returns the path.

    A run directory is never inside another run, nor holds one: resuming the outer run would take the inner
    one's files for its own (a run in its checkpoints/round-N is replaced as a damaged checkpoint).
    """
    path = Path(path)
    protected = _protected(path)
    if protected:
        raise RunDirError(f"--out {path} is {protected}; give a new directory for the run, e.g. --out runs/NAME")
    if path.exists() and not path.is_dir():
        raise RunDirError(f"--out {path} exists and is not a directory")
    outer = _run_above(path)
    if outer is not None:
        raise RunDirError(
            f"--out {path} is inside the prelort run directory {outer}; a run directory cannot be inside another "
            "run (choose an --out outside it)"
        )
    inner = _run_below(path) if path.is_dir() else None
    if inner is not None:
        raise RunDirError(
            f"--out {path} holds the prelort run directory {inner}; a run directory cannot hold another run "
            f"(move {inner} out of it or choose another --out)"
        )
    checkpoints = RunDir(path).checkpoints_dir
    if resume:
        if not checkpoints.is_dir():
            raise FileNotFoundError(f"--resume: {path} has no checkpoints/ to resume from")
        return path
    if path.is_dir():
        if checkpoints.exists():
            raise RunDirError(f"{path} already holds a run; use --resume to continue it or choose another --out")
        if not RunDir(path).marker.is_file() and any(path.iterdir()):
            raise RunDirError(
                f"{path} is not empty and is not a prelort run directory; prelort will not write "
                "into it (choose a new or empty --out)"
            )
    return path


# ----------------------------------------------------------------------------------------------
# the lock
# ----------------------------------------------------------------------------------------------
# The kernel decides who holds a run directory: an exclusive flock on .prelort.lock, held on an open file
# for as long as the process lives (or until released), so two processes can never both hold it and a killed
# process lets go of it by dying. The file's content (pid, host, start time) only names the holder in the
# refusal; whatever it says (nothing yet, garbage, a PID that is gone) never decides who holds the lock.
_held: dict[Path, tuple[int, int]] = {}  # lock files this process holds -> (their open fd, the holder's pid)


def _start_time(pid: int) -> str | None:
    """The process's start time (Linux /proc): with the PID, it names one process even after PIDs are reused."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat_line.rpartition(")")[2].split()[19]  # field 22 of stat: starttime


def _lock_key(run_dir: Path) -> Path:
    return run_dir.resolve() / LOCK


def _what_is(path: Path) -> str:
    """What a path that should be the lock file is instead (for the refusal)."""
    try:
        return file_kind(os.lstat(path).st_mode)
    except OSError:
        return "not a regular file"


def _open_lock(lock: Path) -> int:
    """Open (creating it) the lock file, which must be a regular file; never follows a link nor blocks."""
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(lock, flags, 0o644)
    except OSError as e:
        if e.errno in (errno.EISDIR, errno.ELOOP, errno.ENXIO, errno.EOPNOTSUPP):
            fd = -1
        else:
            raise RunDirError(
                f"cannot open the lock file {lock} ({e.strerror}); make the run directory writable or choose "
                "another --out"
            ) from None
    if fd < 0 or not stat.S_ISREG(os.fstat(fd).st_mode):
        if fd >= 0:
            os.close(fd)
        raise RunDirError(
            f"{lock} is {_what_is(lock)}, not prelort's lock file; remove it (prelort creates the lock "
            "itself) or choose another --out"
        )
    return fd


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` is still the file open as ``fd`` (a releasing holder removes it before letting go)."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    held = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (held.st_dev, held.st_ino)


def _lock_content(fd: int) -> dict[str, Any] | None:
    """The lock file's JSON object, or None (empty, cut, not JSON, not an object); reads at most 4 KiB."""
    try:
        info = json.loads(os.pread(fd, 4096, 0))
    except (OSError, ValueError):  # ValueError: not JSON, not UTF-8, an integer too long to convert
        return None
    return info if isinstance(info, dict) else None


def _holder_name(fd: int) -> tuple[str, str]:
    """(PID, host) of the holder as its lock file names them, for the refusal; whatever the file holds."""
    info = None
    for _ in range(10):  # the holder writes its name just after taking the lock: give it a moment
        info = _lock_content(fd)
        if info is not None:
            break
        time.sleep(0.02)
    info = info or {}
    pid, host = info.get("pid"), info.get("host")
    pid_s = str(pid) if type(pid) is int and 0 < pid < 2**32 else "unknown"
    host_s = host if isinstance(host, str) and 0 < len(host) <= 255 and host.isprintable() else "an unknown host"
    return pid_s, host_s


def _release(key: Path) -> None:
    held = _held.get(key)
    if held is None or held[1] != os.getpid():  # a forked child never releases its parent's lock
        return
    del _held[key]
    fd = held[0]
    try:
        if _same_file(fd, key):
            key.unlink()  # while still holding it: a process waiting on this file then sees it gone and retries
    except OSError:
        pass
    finally:
        os.close(fd)


def _acquire_lock(run_dir: Path) -> Path:
    lock = run_dir / LOCK
    key = _lock_key(run_dir)
    if key in _held:
        return lock
    for _ in range(20):
        fd = _open_lock(lock)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid, host = _holder_name(fd)
            os.close(fd)
            raise RunDirError(
                f"{run_dir} is in use by another prelort run (PID {pid} on {host}); wait for it to finish or "
                "choose another --out"
            ) from None
        except OSError as e:  # e.g. a file system without locks
            os.close(fd)
            raise RunDirError(
                f"cannot lock {lock} ({e.strerror}); put the run directory on a local file system or choose "
                "another --out"
            ) from None
        if _same_file(fd, lock):
            break
        os.close(fd)  # the previous holder removed this file as it let go: lock the one now at the path
    else:
        raise RunDirError(f"could not take the lock {lock}; another prelort run is starting on {run_dir}")
    if os.fstat(fd).st_size:
        log.warning("taking over the stale lock %s (its process is gone)", lock)
    content = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": _start_time(os.getpid())})
    os.ftruncate(fd, 0)
    os.pwrite(fd, content.encode(), 0)
    _held[key] = (fd, os.getpid())
    atexit.register(_release, key)
    return lock


# ----------------------------------------------------------------------------------------------
# the --out of the commands that write beside a run (export, report)
# ----------------------------------------------------------------------------------------------
def enclosing_run(path: str | Path) -> RunDir | None:
    """The run directory ``path`` is or lies in (looking up from it), or None."""
    resolved = Path(path).expanduser().resolve()
    found = resolved if _is_run_dir(resolved) else _run_above(resolved)
    return None if found is None else RunDir(found)


def check_output_dir(path: str | Path, writes: Sequence[str], *, force: bool, example: str) -> Path:
    """Refuse an ``--out`` of a command that writes files beside a run (``export``'s adapter, ``report``'s
    comparison), as :func:`check_out` refuses a run's: the filesystem root, the home directory, the current
    directory, a file, a run directory or anything among its own files (a run's adapters replaced behind its
    back), and, unless ``force``, a directory already holding one of the files it would write (``writes``:
    glob patterns relative to it), so a user's files are never overwritten unasked. Nothing is created here."""
    path = Path(path)
    protected = _protected(path)
    if protected:
        raise RunDirError(f"--out {path} is {protected}; give a directory of its own, e.g. --out {example}")
    if path.exists() and not path.is_dir():
        raise RunDirError(f"--out {path} exists and is not a directory")
    run = enclosing_run(path)
    if run is not None:
        resolved = path.expanduser().resolve()
        own = next((p for p in run.own_paths() if resolved.is_relative_to(p)), None)
        if resolved == run.path or own is not None:
            where = "is the run directory" if own is None else f"is inside {own.name} of the run directory"
            raise RunDirError(
                f"--out {path} {where} {run.path}; prelort will not write into a run's own files (choose a "
                "directory outside it)"
            )
    if path.is_dir() and not force:
        present = sorted({str(p.relative_to(path)) for pattern in writes for p in path.glob(pattern)})
        if present:
            raise RunDirError(
                f"--out {path} already holds {', '.join(present)}; prelort will not overwrite them (choose "
                "another --out, or pass --force to replace them)"
            )
    return path


# ----------------------------------------------------------------------------------------------
# --resume: what may change
# ----------------------------------------------------------------------------------------------
def flatten_dict(data: Any, prefix: str = "") -> dict[str, Any]:
    """A nested mapping as ``{"dotted.key": leaf value}`` (a config's keys, a record's fields)."""
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(flatten_dict(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: data}


def _safe(key: str) -> bool:
    return any(key == s or key.startswith(s + ".") for s in SAFE_TO_CHANGE)


def config_changes(old: Config, new: Config) -> list[str]:
    """Dotted keys whose value differs between two configs, except those :data:`SAFE_TO_CHANGE`."""
    a, b = flatten_dict(old.to_dict()), flatten_dict(new.to_dict())
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and not _safe(k))
