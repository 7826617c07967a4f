"""Tables of run records: CSV files and Markdown, for one run (its final round) and for several runs
(mean and sample standard deviation over the runs that share a method)."""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..metrics import Metric
from ..metrics import available as available_metrics
from ..metrics import get as get_metric
from .reading import EvalRecord, RunMetrics

_BASE_LABEL = "base (zero-shot)"


def summary_columns() -> tuple[str, ...]:
    """summary.csv's columns: the record's keys with every registered metric (registry order) before ``n``."""
    return ("method", "seed", "round", "rank", "kind", *(m.name for m in available_metrics()), "n")


def comparison_columns() -> tuple[str, ...]:
    """comparison.csv's columns: ``<metric>_mean``, ``<metric>_std`` of every registered metric."""
    return (
        "method",
        "kind",
        "rank",
        "rounds",
        "n_runs",
        "seeds",
        *(f"{m.name}_{stat}" for m in available_metrics() for stat in ("mean", "std")),
    )


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    return str(value)


def _write_csv(path: Path, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Write atomically so a reader never sees a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_cell(v) for v in row])
    os.replace(tmp, path)


def _fmt_mean_std(mean: float, std: float, metric: Metric) -> str:
    if math.isnan(mean) or math.isnan(std):
        return metric.format(mean)
    return f"{metric.format(mean)} ± {metric.format(std)}"


def _markdown(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def final_round_table(run: RunMetrics) -> str:
    """A Markdown table of the base model and every rank tier at the run's final round."""
    rows = []
    records = ([run.base] if run.base is not None else []) + run.final_tiers()
    for rec in records:
        tier = _BASE_LABEL if rec.kind == "base" else str(rec.rank)
        rows.append(
            [tier, str(rec.round)]
            + [m.format(rec.metric(m.name)) for m in available_metrics()]
            + ["" if rec.n is None else str(rec.n)]
        )
    table = _markdown(["tier", "round", *(m.header for m in available_metrics()), "n"], rows)
    privacy = privacy_line(run)
    table = table if privacy is None else table + "\n\n" + privacy
    on_site = federated_eval_table(run)
    return table if not on_site else table + "\n\non-site evaluation (the sites' own held-out records):\n" + on_site


def federated_eval_table(run: RunMetrics) -> str:
    """A Markdown table of the last on-site evaluation per rank tier (empty when there is none): the sites
    counted, examples, accuracy (correct / n), and perplexity from the summed log-likelihood."""
    if not run.federated:
        return ""
    last = max(r.round for r in run.federated)
    rows = [
        [str(r.rank), str(r.round), str(r.sites), str(r.n), f"{r.accuracy:.4f}", f"{r.perplexity:.4g}"]
        for r in run.federated
        if r.round == last
    ]
    return _markdown(["tier", "round", "sites", "n", "accuracy", "perplexity"], rows)


def privacy_line(run: RunMetrics) -> str | None:
    """``client-level DP: epsilon = E at delta = D after round R`` from the last training record of a
    ``privacy.dp`` run (None without DP records)."""
    dp = [t for t in run.trains if t.dp_delta is not None]
    if not dp:
        return None
    last = max(dp, key=lambda t: t.round)
    eps = "inf (no noise)" if last.dp_epsilon is None else f"{last.dp_epsilon:.4g}"
    return f"client-level DP: epsilon = {eps} at delta = {last.dp_delta:.3g} after round {last.round}"


def category_table(run: RunMetrics) -> str:
    """A Markdown table of accuracy per category (columns) for the base model and every rank tier at the
    final round; empty when the records carry no per-category accuracy."""
    records = [r for r in ([run.base] if run.base is not None else []) + run.final_tiers() if r.categories]
    if not records:
        return ""
    categories = sorted({c for r in records for c, _ in r.categories})
    accuracy = get_metric("accuracy")  # category_accuracy: the accuracy metric within each category
    rows = []
    for rec in records:
        acc = dict(rec.categories)
        rows.append(
            [_BASE_LABEL if rec.kind == "base" else str(rec.rank), str(rec.round)]
            + [accuracy.format(acc.get(c, math.nan)) for c in categories]
        )
    return _markdown(["tier", "round", *categories], rows)


# -- several runs --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ComparisonRow:
    """Final-round metrics of one method at one tier (or the base model), over the runs that have them."""

    method: str
    kind: str  # "base" | "tier"
    rank: int | str
    rounds: tuple[int, ...]
    seeds: tuple[int | None, ...]
    mean: dict[str, float]
    std: dict[str, float]  # sample standard deviation (ddof = 1); NaN with fewer than two values

    @property
    def n_runs(self) -> int:
        return len(self.seeds)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation ``sqrt(sum (x - mean)^2 / (n - 1))`` of the non-NaN values.

    NaN when there are no values; the std is NaN with a single value.
    """
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return math.nan, math.nan
    mean = sum(finite) / len(finite)
    if len(finite) < 2:
        return mean, math.nan
    return mean, math.sqrt(sum((v - mean) ** 2 for v in finite) / (len(finite) - 1))


def _aggregate(method: str, kind: str, rank: int | str, records: list[EvalRecord]) -> ComparisonRow:
    means, stds = {}, {}
    for metric in available_metrics():
        means[metric.name], stds[metric.name] = mean_std([r.metric(metric.name) for r in records])
    return ComparisonRow(
        method=method,
        kind=kind,
        rank=rank,
        rounds=tuple(sorted({r.round for r in records})),
        seeds=tuple(r.seed for r in records),
        mean=means,
        std=stds,
    )


def _methods_in_order(runs: Sequence[RunMetrics]) -> list[str]:
    return list(dict.fromkeys(run.method for run in runs))


def comparison_rows(runs: Sequence[RunMetrics]) -> list[ComparisonRow]:
    """The base row, then per method (in order of first appearance) one row per rank tier.

    A method's tier row aggregates each of its runs' final-round record at that tier. The base model
    does not depend on the method, so the base row averages the base records of runs sharing a seed
    first, then takes mean and std over seeds.
    """
    rows: list[ComparisonRow] = []
    base_by_seed: dict[int | None, list[EvalRecord]] = {}
    for run in runs:
        if run.base is not None:
            base_by_seed.setdefault(run.base.seed, []).append(run.base)
    if base_by_seed:
        per_seed = []
        for seed, recs in base_by_seed.items():
            per_seed.append(
                EvalRecord(
                    method="base",
                    seed=seed,
                    round=recs[0].round,
                    rank="base",
                    kind="base",
                    values=tuple((m.name, mean_std([r.metric(m.name) for r in recs])[0]) for m in available_metrics()),
                    n=recs[0].n,
                )
            )
        rows.append(_aggregate("base", "base", "base", per_seed))
    for method in _methods_in_order(runs):
        by_rank: dict[int, list[EvalRecord]] = {}
        for run in runs:
            if run.method != method:
                continue
            for rec in run.final_tiers():
                by_rank.setdefault(int(rec.rank), []).append(rec)
        for rank in sorted(by_rank):
            rows.append(_aggregate(method, "tier", rank, by_rank[rank]))
    return rows


def comparison_markdown(rows: Sequence[ComparisonRow]) -> str:
    """Rows as a Markdown table: ``mean ± std`` where a method has several runs."""
    table = []
    for row in rows:
        tier = _BASE_LABEL if row.kind == "base" else str(row.rank)
        rounds = ",".join(str(r) for r in row.rounds)
        seeds = ",".join("?" if s is None else str(s) for s in row.seeds)
        table.append(
            [row.method, tier, rounds, seeds]
            + [_fmt_mean_std(row.mean[m.name], row.std[m.name], m) for m in available_metrics()]
        )
    return _markdown(["method", "tier", "round", "seeds", *(m.header for m in available_metrics())], table)
