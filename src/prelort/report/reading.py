"""Reading run directories: ``metrics.jsonl`` (and ``config.yaml``) into deduplicated records.

A run directory holds ``config.yaml`` and ``metrics.jsonl``; the latter has one JSON object per line:

* evaluation records ``{"round", "rank", "kind", "accuracy", "rougeL", "perplexity", "n", "method", "seed"}``
  where ``kind`` is ``"tier"`` (the global model as a client of rank ``t`` receives it), ``"curve"``
  (the truncation curve ``t = 1, 2, 4, ..., R`` after the last round) or ``"base"`` (the zero-shot base
  model, ``round`` 0, ``rank`` ``"base"``);
* training records ``{"round", "kind": "train", "train_loss", "accepted", "rejected", "seconds", "method"}``,
  with ``privacy.dp`` also ``"dp_epsilon"`` (accounted after that round; null for z = 0), ``"dp_delta"``;
* on-site evaluation records ``{"round", "rank", "kind": "federated_eval", "n", "correct", "loglik_sum", "tokens",
  "sites"}``: a rank tier's sums over the sites that evaluated it on their own held-out records.

A resumed run may write the same ``(round, rank, kind)`` (or the same training round) twice: the last
line wins. :func:`read_run` returns a :class:`RunMetrics`; a file it cannot read raises :class:`ReportError`.
The files are found and read through :class:`~prelort.rundir.RunDir`; parsing them into records is this module's.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..metrics import names as metric_names
from ..rundir import RunDir

EVAL_KINDS: tuple[str, ...] = ("base", "tier", "curve")
_KIND_ORDER = {kind: i for i, kind in enumerate(EVAL_KINDS)}


class ReportError(ValueError):
    """A run directory or its metrics cannot be read; the message names the file and the problem."""


@dataclass(frozen=True)
class EvalRecord:
    """One evaluation of one model (a rank tier, a truncation point, or the base model)."""

    method: str
    seed: int | None
    round: int
    rank: int | str  # an int tier, or "base"
    kind: str  # "base" | "tier" | "curve"
    values: tuple[tuple[str, float], ...]  # (metric, value) of every registered metric; NaN when not carried
    n: int | None
    categories: tuple[tuple[str, float], ...] = ()  # (category, accuracy) pairs, when the record has them

    def metric(self, name: str) -> float:
        return dict(self.values).get(name, math.nan)

    def __getattr__(self, name: str) -> float:  # rec.accuracy, rec.perplexity, ...: a registered metric's value
        if name != "values" and name in metric_names():
            return self.metric(name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def sort_key(self) -> tuple[int, int, int]:
        return (self.round, _KIND_ORDER[self.kind], -1 if self.rank == "base" else int(self.rank))


@dataclass(frozen=True)
class TrainRecord:
    """The training summary of one round."""

    round: int
    train_loss: float
    accepted: int | None
    rejected: int | None
    seconds: float | None
    method: str
    dp_epsilon: float | None = None  # privacy.dp: epsilon accounted after this round (None: no DP or z = 0)
    dp_delta: float | None = None


@dataclass(frozen=True)
class FederatedEvalRecord:
    """One rank tier's on-site evaluation after a round (kind ``federated_eval``): the sites' summed counts."""

    round: int
    rank: int
    n: int
    correct: int
    loglik_sum: float
    sites: int
    tokens: int | None = None

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else math.nan

    @property
    def perplexity(self) -> float:
        """exp of the mean negative log-likelihood per answer token (NaN without a token count)."""
        return math.exp(-self.loglik_sum / self.tokens) if self.tokens else math.nan


@dataclass
class RunMetrics:
    """The deduplicated records of one run directory, plus its method and seed."""

    run_dir: Path
    method: str
    seed: int | None
    config: dict[str, Any]
    evals: list[EvalRecord]
    trains: list[TrainRecord]
    warnings: list[str] = field(default_factory=list)
    federated: list[FederatedEvalRecord] = field(default_factory=list)  # on-site evaluation, by round and tier

    @property
    def label(self) -> str:
        return self.method if self.seed is None else f"{self.method} (seed {self.seed})"

    def of_kind(self, kind: str) -> list[EvalRecord]:
        return [r for r in self.evals if r.kind == kind]

    @property
    def base(self) -> EvalRecord | None:
        """The zero-shot record (the latest round if several were written)."""
        base = self.of_kind("base")
        return max(base, key=lambda r: r.round) if base else None

    @property
    def final_round(self) -> int | None:
        """The last round with tier records (None before the first evaluation of a tier)."""
        rounds = [r.round for r in self.of_kind("tier")]
        return max(rounds) if rounds else None

    def final_tiers(self) -> list[EvalRecord]:
        final = self.final_round
        return sorted((r for r in self.of_kind("tier") if r.round == final), key=EvalRecord.sort_key)

    def truncation(self) -> tuple[list[EvalRecord], str]:
        """The truncation curve: the "curve" records of their last round, else the final round's tiers.

        Returns the records sorted by ``t`` and a phrase saying where they came from ("" when none).
        """
        curve = self.of_kind("curve")
        if curve:
            last = max(r.round for r in curve)
            return (
                sorted((r for r in curve if r.round == last), key=EvalRecord.sort_key),
                f"truncation curve after round {last}",
            )
        tiers = self.final_tiers()
        if tiers:
            return tiers, f"rank tiers at round {self.final_round} (no curve records)"
        return [], ""


def _as_int(value: Any, what: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ReportError(f"{where}: {what} must be an integer, got {value!r}")
    try:
        number = int(value)
    except ValueError:
        raise ReportError(f"{where}: {what} must be an integer, got {value!r}") from None
    if isinstance(value, float) and number != value:
        raise ReportError(f"{where}: {what} must be an integer, got {value!r}")
    return number


def _as_float(value: Any, what: str, where: str) -> float:
    """A metric value; a missing or null value becomes NaN (drawn as a gap, written as an empty cell)."""
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ReportError(f"{where}: {what} must be a number, got {value!r}")
    return float(value)


def _optional_int(value: Any, what: str, where: str) -> int | None:
    return None if value is None else _as_int(value, what, where)


def _record_kind(rec: dict[str, Any]) -> str | None:
    """The record's kind; older or minimal records (docs/design.md section 8) may leave it out."""
    kind = rec.get("kind")
    if kind is not None:
        return str(kind)
    if "train_loss" in rec:
        return "train"
    if any(m in rec for m in metric_names()):
        return "base" if rec.get("rank") == "base" else "tier"
    return None


def _parse_eval(rec: dict[str, Any], kind: str, method: str, seed: int | None, where: str) -> EvalRecord:
    for key in ("round", "rank"):
        if key not in rec:
            raise ReportError(f"{where}: a {kind!r} record lacks {key!r}")
    rank_value = rec["rank"]
    if rank_value == "base" or kind == "base":
        rank: int | str = "base"
        kind = "base"
    else:
        rank = _as_int(rank_value, "rank", where)
        if rank <= 0:
            raise ReportError(f"{where}: rank must be positive or 'base', got {rank_value!r}")
    rec_seed = rec.get("seed", seed)
    return EvalRecord(
        method=str(rec.get("method") or method),
        seed=_optional_int(rec_seed, "seed", where),
        round=_as_int(rec["round"], "round", where),
        rank=rank,
        kind=kind,
        values=tuple((m, _as_float(rec.get(m), m, where)) for m in metric_names()),
        n=_optional_int(rec.get("n"), "n", where),
        categories=_parse_categories(rec.get("category_accuracy"), where),
    )


def _parse_federated(rec: dict[str, Any], where: str) -> FederatedEvalRecord:
    for key in ("round", "rank", "n", "correct", "loglik_sum", "sites"):
        if key not in rec:
            raise ReportError(f"{where}: a 'federated_eval' record lacks {key!r}")
    return FederatedEvalRecord(
        round=_as_int(rec["round"], "round", where),
        rank=_as_int(rec["rank"], "rank", where),
        n=_as_int(rec["n"], "n", where),
        correct=_as_int(rec["correct"], "correct", where),
        loglik_sum=_as_float(rec["loglik_sum"], "loglik_sum", where),
        sites=_as_int(rec["sites"], "sites", where),
        tokens=_optional_int(rec.get("tokens"), "tokens", where),
    )


def _parse_categories(value: Any, where: str) -> tuple[tuple[str, float], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise ReportError(f"{where}: category_accuracy must be a mapping of category to accuracy, got {value!r}")
    return tuple((str(k), _as_float(v, f"category_accuracy[{k!r}]", where)) for k, v in sorted(value.items()))


def _parse_train(rec: dict[str, Any], method: str, where: str) -> TrainRecord:
    if "round" not in rec:
        raise ReportError(f"{where}: a 'train' record lacks 'round'")
    seconds = rec.get("seconds")
    return TrainRecord(
        round=_as_int(rec["round"], "round", where),
        train_loss=_as_float(rec.get("train_loss"), "train_loss", where),
        accepted=_optional_int(rec.get("accepted"), "accepted", where),
        rejected=_optional_int(rec.get("rejected"), "rejected", where),
        seconds=None if seconds is None else _as_float(seconds, "seconds", where),
        method=str(rec.get("method") or method),
        dp_epsilon=None if rec.get("dp_epsilon") is None else _as_float(rec["dp_epsilon"], "dp_epsilon", where),
        dp_delta=None if rec.get("dp_delta") is None else _as_float(rec["dp_delta"], "dp_delta", where),
    )


def _read_config(run: RunDir) -> dict[str, Any]:
    path = run.config_file
    try:
        data = run.read_config_data()
    except yaml.YAMLError as exc:
        raise ReportError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ReportError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    return data


def read_run(run_dir: str | os.PathLike[str]) -> RunMetrics:
    """Read ``run_dir/metrics.jsonl`` (and ``config.yaml`` for the method and seed).

    Duplicates (same ``(round, rank, kind)``, or same training round) keep the last line. Records of
    unknown kinds are skipped with a warning; a final line cut short (a run being written) is skipped too.
    Raises :class:`ReportError` when ``metrics.jsonl`` is missing or a line is not a valid record.
    """
    run = RunDir(run_dir)
    run_path = run.path
    metrics_path = run.metrics_file
    if not metrics_path.is_file():
        raise ReportError(
            f"{run_path}: no metrics.jsonl (not a prelort run directory, or the run has not evaluated yet)"
        )
    config = _read_config(run)
    method = str(config.get("method") or run_path.resolve().name)
    seed_value = config.get("seed")
    seed = _optional_int(seed_value, "seed", str(run.config_file))

    text = run.metrics.read_text()
    lines = text.splitlines()
    evals: dict[tuple[int, int | str, str], EvalRecord] = {}
    trains: dict[int, TrainRecord] = {}
    federated: dict[tuple[int, int], FederatedEvalRecord] = {}
    warnings: list[str] = []
    skipped_kinds: set[str] = set()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{metrics_path} line {number}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines) and not text.endswith("\n"):
                warnings.append(f"{where}: skipped an incomplete last line (run still writing?)")
                continue
            raise ReportError(f"{where}: not JSON: {exc}") from None
        if not isinstance(rec, dict):
            raise ReportError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        kind = _record_kind(rec)
        if kind == "train":
            record = _parse_train(rec, method, where)
            trains.pop(record.round, None)  # re-insert so the dict order follows the last occurrence
            trains[record.round] = record
        elif kind in EVAL_KINDS:
            ev = _parse_eval(rec, kind, method, seed, where)
            key = (ev.round, ev.rank, ev.kind)
            evals.pop(key, None)
            evals[key] = ev
        elif kind == "federated_eval":
            fe = _parse_federated(rec, where)
            federated.pop((fe.round, fe.rank), None)
            federated[(fe.round, fe.rank)] = fe
        elif kind is not None:
            skipped_kinds.add(kind)
    if skipped_kinds:
        warnings.append(f"{metrics_path}: skipped records of unknown kind {sorted(skipped_kinds)}")
    if seed is None:
        seeds = {r.seed for r in evals.values() if r.seed is not None}
        seed = seeds.pop() if len(seeds) == 1 else None
    if "method" not in config:
        methods = {r.method for r in evals.values()} | {t.method for t in trains.values()}
        if len(methods) == 1:
            method = methods.pop()
    return RunMetrics(
        run_dir=run_path,
        method=method,
        seed=seed,
        config=config,
        evals=sorted(evals.values(), key=EvalRecord.sort_key),
        trains=sorted(trains.values(), key=lambda t: t.round),
        warnings=warnings,
        federated=sorted(federated.values(), key=lambda r: (r.round, r.rank)),
    )
