"""Tables and plots of run directories (docs/design.md sections 4 and 7).

A run directory holds ``config.yaml`` and ``metrics.jsonl``; the latter has one JSON object per line:

* evaluation records ``{"round", "rank", "kind", "accuracy", "rougeL", "perplexity", "n", "method", "seed"}``
  where ``kind`` is ``"tier"`` (the global model as a client of rank ``t`` receives it), ``"curve"``
  (the truncation curve ``t = 1, 2, 4, ..., R`` after the last round) or ``"base"`` (the zero-shot base
  model, ``round`` 0, ``rank`` ``"base"``);
* training records ``{"round", "kind": "train", "train_loss", "accepted", "rejected", "seconds", "method"}``,
  with ``privacy.dp`` also ``"dp_epsilon"`` (accounted after that round; null for z = 0), ``"dp_delta"``.

A resumed run may write the same ``(round, rank, kind)`` (or the same training round) twice: the last
line wins.

:func:`write_run_report` writes ``summary.csv`` and ``plots/*.png`` into one run directory;
:func:`compare_runs` tabulates the final round of several runs (mean and sample standard deviation over
the runs that share a method) and draws comparison plots. Plots use the Agg canvas (no display).
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

METRICS: tuple[str, ...] = ("accuracy", "rougeL", "perplexity")
METRIC_TITLES = {"accuracy": "accuracy (exact match)", "rougeL": "ROUGE-L F1", "perplexity": "perplexity"}
EVAL_KINDS: tuple[str, ...] = ("base", "tier", "curve")
SUMMARY_COLUMNS: tuple[str, ...] = (
    "method", "seed", "round", "rank", "kind", "accuracy", "rougeL", "perplexity", "n",
)
COMPARISON_COLUMNS: tuple[str, ...] = (
    "method", "kind", "rank", "rounds", "n_runs", "seeds",
    "accuracy_mean", "accuracy_std", "rougeL_mean", "rougeL_std", "perplexity_mean", "perplexity_std",
)
_KIND_ORDER = {kind: i for i, kind in enumerate(EVAL_KINDS)}
_BASE_LABEL = "base (zero-shot)"


class ReportError(ValueError):
    """A run directory or its metrics cannot be read; the message names the file and the problem."""


# --------------------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class EvalRecord:
    """One evaluation of one model (a rank tier, a truncation point, or the base model)."""

    method: str
    seed: int | None
    round: int
    rank: int | str  # an int tier, or "base"
    kind: str  # "base" | "tier" | "curve"
    accuracy: float  # NaN when the record did not carry it
    rougeL: float
    perplexity: float
    n: int | None
    categories: tuple[tuple[str, float], ...] = ()  # (category, accuracy) pairs, when the record has them

    def metric(self, name: str) -> float:
        return float(getattr(self, name))

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
    if any(m in rec for m in METRICS):
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
        accuracy=_as_float(rec.get("accuracy"), "accuracy", where),
        rougeL=_as_float(rec.get("rougeL"), "rougeL", where),
        perplexity=_as_float(rec.get("perplexity"), "perplexity", where),
        n=_optional_int(rec.get("n"), "n", where),
        categories=_parse_categories(rec.get("category_accuracy"), where),
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


def _read_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
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
    run_path = Path(run_dir)
    metrics_path = run_path / "metrics.jsonl"
    if not metrics_path.is_file():
        raise ReportError(
            f"{run_path}: no metrics.jsonl (not a prelort run directory, or the run has not evaluated yet)"
        )
    config = _read_config(run_path)
    method = str(config.get("method") or run_path.resolve().name)
    seed_value = config.get("seed")
    seed = _optional_int(seed_value, "seed", str(run_path / "config.yaml"))

    text = metrics_path.read_text(encoding="utf-8")
    lines = text.splitlines()
    evals: dict[tuple[int, int | str, str], EvalRecord] = {}
    trains: dict[int, TrainRecord] = {}
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
    )


# --------------------------------------------------------------------------------------------- tables


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


def _fmt(value: float, metric: str) -> str:
    if math.isnan(value):
        return "n/a"
    return f"{value:.2f}" if metric == "perplexity" else f"{value:.3f}"


def _fmt_mean_std(mean: float, std: float, metric: str) -> str:
    if math.isnan(mean) or math.isnan(std):
        return _fmt(mean, metric)
    return f"{_fmt(mean, metric)} ± {_fmt(std, metric)}"


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
        rows.append([tier, str(rec.round)] + [_fmt(rec.metric(m), m) for m in METRICS]
                    + ["" if rec.n is None else str(rec.n)])
    table = _markdown(["tier", "round", "accuracy", "ROUGE-L", "perplexity", "n"], rows)
    privacy = privacy_line(run)
    return table if privacy is None else table + "\n\n" + privacy


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
    rows = []
    for rec in records:
        acc = dict(rec.categories)
        rows.append([_BASE_LABEL if rec.kind == "base" else str(rec.rank), str(rec.round)]
                    + [_fmt(acc.get(c, math.nan), "accuracy") for c in categories])
    return _markdown(["tier", "round", *categories], rows)


# --------------------------------------------------------------------------------------------- plots


def _figure(ncols: int, width: float = 4.3, height: float = 3.6) -> tuple[Any, list[Any]]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # Figure + Agg canvas, not pyplot: no global backend switch, no display, no figure registry.
    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def _save(fig: Any, path: Path) -> Path:
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110, format="png")
    os.replace(tmp, path)
    return path


def _integer_x(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _log2_x(ax: Any, ts: Sequence[int]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(ts))
    ax.set_xticklabels([str(t) for t in ts])
    ax.minorticks_off()


def _metric_axis(ax: Any, metric: str, values: Sequence[float]) -> None:
    """Name the y axis; perplexity on a log axis (a random model's ~6e4 and a tuned model's ~3 on one plot,
    and the differences between tuned methods still visible); accuracy and ROUGE-L from 0 up to a little
    above the largest value, saying so when every value is 0 (nothing to see, not a broken plot)."""
    ax.set_ylabel(METRIC_TITLES[metric])
    finite = [v for v in values if not math.isnan(v)]
    if metric == "perplexity":
        if finite and min(finite) > 0:
            ax.set_yscale("log")
        return
    top = max(finite, default=0.0)
    if top <= 0:
        ax.set_ylim(0, 1)
        ax.text(0.5, 0.5, "every value is 0", transform=ax.transAxes, ha="center", va="center", color="0.4")
    else:
        ax.set_ylim(0, min(1.0, top * 1.15))


def _spread(n_runs: Sequence[int]) -> str:
    """How a plot's values were obtained: one seed, or mean ± std over seeds."""
    most = max(n_runs, default=1)
    return "one seed" if most <= 1 else f"mean ± std over up to {most} seeds"


def _base_line(ax: Any, value: float) -> None:
    if not math.isnan(value):
        ax.axhline(value, linestyle="--", color="0.35", linewidth=1.2, label=_BASE_LABEL)


def _plot_metrics_by_round(run: RunMetrics, path: Path) -> Path:
    tiers = run.of_kind("tier")
    ranks = sorted({int(r.rank) for r in tiers})
    fig, axes = _figure(len(METRICS))
    for ax, metric in zip(axes, METRICS):
        for rank in ranks:
            points = sorted((r.round, r.metric(metric)) for r in tiers if r.rank == rank)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"rank {rank}")
        if run.base is not None:
            _base_line(ax, run.base.metric(metric))
        ax.set_xlabel("round")
        ax.set_title(METRIC_TITLES[metric])
        _metric_axis(ax, metric, [r.metric(metric) for r in tiers] + ([run.base.metric(metric)] if run.base else []))
        ax.grid(alpha=0.3)
        _integer_x(ax)
    axes[0].legend(fontsize="small")
    fig.suptitle(f"{run.label}: metrics by round, per rank tier")
    return _save(fig, path)


def _plot_truncation(run: RunMetrics, records: list[EvalRecord], source: str, path: Path) -> Path:
    ts = [int(r.rank) for r in records]
    fig, axes = _figure(len(METRICS))
    for ax, metric in zip(axes, METRICS):
        ax.plot(ts, [r.metric(metric) for r in records], marker="o", label=run.method)
        if run.base is not None:
            _base_line(ax, run.base.metric(metric))
        _log2_x(ax, ts)
        ax.set_xlabel("rank t (prefix kept)")
        ax.set_title(METRIC_TITLES[metric])
        _metric_axis(ax, metric, [r.metric(metric) for r in records] + ([run.base.metric(metric)] if run.base else []))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    fig.suptitle(f"{run.label}: {source}")
    return _save(fig, path)


def _plot_train_loss(run: RunMetrics, path: Path) -> Path:
    fig, (ax,) = _figure(1, width=5.5)
    rounds = [t.round for t in run.trains]
    ax.plot(rounds, [t.train_loss for t in run.trains], marker="o")
    rejected = [(t.round, t.train_loss) for t in run.trains if t.rejected]
    if rejected:
        ax.scatter([p[0] for p in rejected], [p[1] for p in rejected], marker="x", color="red", zorder=3,
                   label="round with rejected updates")
        ax.legend(fontsize="small")
    ax.set_xlabel("round")
    ax.set_ylabel("train loss")
    ax.set_title(f"{run.label}: train loss per round")
    ax.grid(alpha=0.3)
    _integer_x(ax)
    return _save(fig, path)


def _plot_epsilon(run: RunMetrics, path: Path) -> Path:
    fig, (ax,) = _figure(1, width=5.5)
    points = [(t.round, t.dp_epsilon) for t in run.trains if t.dp_epsilon is not None]
    ax.plot([p[0] for p in points], [p[1] for p in points], marker="o")
    delta = next(t.dp_delta for t in run.trains if t.dp_delta is not None)
    budget = (run.config.get("privacy") or {}).get("target_epsilon") if isinstance(run.config, dict) else None
    if isinstance(budget, (int, float)) and not isinstance(budget, bool):
        ax.axhline(float(budget), color="red", linestyle="--", linewidth=1, label=f"budget {budget:g}")
        ax.legend(fontsize="small")
    ax.set_xlabel("round")
    ax.set_ylabel(f"epsilon (delta = {delta:.3g})")
    ax.set_title(f"{run.label}: accounted epsilon after each round")
    ax.grid(alpha=0.3)
    _integer_x(ax)
    return _save(fig, path)


# --------------------------------------------------------------------------------------------- one run


def write_run_report(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Write ``summary.csv`` and ``plots/*.png`` into ``run_dir``.

    ``summary.csv`` has one row per evaluation record after deduplication (columns
    :data:`SUMMARY_COLUMNS`), sorted by round, kind (base, tier, curve) and rank. Plots, each drawn when
    its data exist: ``metrics_by_round.png``, ``truncation_curve.png`` (from "curve" records, else the
    final round's tiers), ``train_loss.png``, ``privacy_epsilon.png`` (``privacy.dp`` runs: epsilon per round).

    Returns ``{"run_dir", "summary_csv", "plots" (list of paths), "n_eval_records", "n_train_records",
    "final_round" (None before any tier record), "final_table" (Markdown), "messages" (list of str)}``.
    """
    run = read_run(run_dir)
    run_path = run.run_dir
    messages = list(run.warnings)
    summary = run_path / "summary.csv"
    _write_csv(
        summary,
        SUMMARY_COLUMNS,
        ([r.method, r.seed, r.round, r.rank, r.kind, r.accuracy, r.rougeL, r.perplexity, r.n] for r in run.evals),
    )
    plots_dir = run_path / "plots"
    plots_dir.mkdir(exist_ok=True)
    plots: list[Path] = []
    if run.evals:
        plots.append(_plot_metrics_by_round(run, plots_dir / "metrics_by_round.png"))
    truncation, source = run.truncation()
    if truncation:
        plots.append(_plot_truncation(run, truncation, source, plots_dir / "truncation_curve.png"))
    if run.trains:
        plots.append(_plot_train_loss(run, plots_dir / "train_loss.png"))
    if any(t.dp_epsilon is not None for t in run.trains):
        plots.append(_plot_epsilon(run, plots_dir / "privacy_epsilon.png"))
    if not run.evals:
        messages.append(
            f"{run_path / 'metrics.jsonl'}: no evaluation records yet; summary.csv has the header only"
            + ("" if run.trains else " and no plot was drawn (no training records either)")
        )
    elif not truncation:
        messages.append("no tier or curve records yet: no truncation curve drawn")
    return {
        "run_dir": run_path,
        "summary_csv": summary,
        "plots": plots,
        "n_eval_records": len(run.evals),
        "n_train_records": len(run.trains),
        "final_round": run.final_round,
        "final_table": final_round_table(run) + (f"\n\naccuracy per category:\n{cats}" if (cats := category_table(run))
                                                 else ""),
        "messages": messages,
    }


# --------------------------------------------------------------------------------------------- several runs


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
    for metric in METRICS:
        means[metric], stds[metric] = mean_std([r.metric(metric) for r in records])
    return ComparisonRow(
        method=method, kind=kind, rank=rank,
        rounds=tuple(sorted({r.round for r in records})),
        seeds=tuple(r.seed for r in records),
        mean=means, std=stds,
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
            per_seed.append(EvalRecord(
                method="base", seed=seed, round=recs[0].round, rank="base", kind="base",
                accuracy=mean_std([r.accuracy for r in recs])[0],
                rougeL=mean_std([r.rougeL for r in recs])[0],
                perplexity=mean_std([r.perplexity for r in recs])[0],
                n=recs[0].n,
            ))
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
        table.append([row.method, tier, rounds, seeds]
                     + [_fmt_mean_std(row.mean[m], row.std[m], m) for m in METRICS])
    return _markdown(["method", "tier", "round", "seeds", "accuracy", "ROUGE-L", "perplexity"], table)


def _plot_comparison_bars(rows: Sequence[ComparisonRow], metric: str, path: Path) -> Path:
    tier_rows = [r for r in rows if r.kind == "tier"]
    methods = list(dict.fromkeys(r.method for r in tier_rows))
    ranks = sorted({int(r.rank) for r in tier_rows})
    fig, (ax,) = _figure(1, width=max(5.5, 1.1 * len(ranks) * max(1, len(methods)) ** 0.5 + 3))
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        by_rank = {int(r.rank): r for r in tier_rows if r.method == method}
        xs = [j + (i - (len(methods) - 1) / 2) * width for j, rank in enumerate(ranks) if rank in by_rank]
        heights = [by_rank[rank].mean[metric] for rank in ranks if rank in by_rank]
        errors = [0.0 if math.isnan(by_rank[rank].std[metric]) else by_rank[rank].std[metric]
                  for rank in ranks if rank in by_rank]
        ax.bar(xs, heights, width=width, yerr=errors, capsize=2, label=method)
    base = next((r for r in rows if r.kind == "base"), None)
    if base is not None:
        _base_line(ax, base.mean[metric])
    ax.set_xticks(range(len(ranks)))
    ax.set_xticklabels([str(r) for r in ranks])
    ax.set_xlabel("client rank tier")
    _metric_axis(ax, metric, [r.mean[metric] + (0.0 if math.isnan(r.std[metric]) else r.std[metric])
                              for r in rows])
    ax.set_title(f"{METRIC_TITLES[metric]} at the final round ({_spread([r.n_runs for r in tier_rows])})")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small", ncols=2)
    return _save(fig, path)


def _plot_comparison_truncation(runs: Sequence[RunMetrics], base: ComparisonRow | None, path: Path) -> Path:
    fig, axes = _figure(len(METRICS))
    all_ts: set[int] = set()
    for method in _methods_in_order(runs):
        by_t: dict[int, list[EvalRecord]] = {}
        for run in runs:
            if run.method == method:
                for rec in run.truncation()[0]:
                    by_t.setdefault(int(rec.rank), []).append(rec)
        if not by_t:
            continue
        ts = sorted(by_t)
        all_ts.update(ts)
        for ax, metric in zip(axes, METRICS):
            stats = [mean_std([r.metric(metric) for r in by_t[t]]) for t in ts]
            means = [s[0] for s in stats]
            (line,) = ax.plot(ts, means, marker="o", label=method)
            if any(not math.isnan(s[1]) for s in stats):
                stds = [0.0 if math.isnan(s[1]) else s[1] for s in stats]
                ax.fill_between(ts, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                                color=line.get_color(), alpha=0.15, linewidth=0)
    for ax, metric in zip(axes, METRICS):
        if base is not None:
            _base_line(ax, base.mean[metric])
        if all_ts:
            _log2_x(ax, sorted(all_ts))
        ax.set_xlabel("rank t (prefix kept)")
        ax.set_title(METRIC_TITLES[metric])
        _metric_axis(ax, metric, [r.metric(metric) for run in runs for r in run.truncation()[0]]
                     + ([base.mean[metric]] if base is not None else []))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    seeds_per_method = [len({run.seed for run in runs if run.method == m}) for m in _methods_in_order(runs)]
    fig.suptitle(f"truncation curves ({_spread(seeds_per_method)})")
    return _save(fig, path)


def compare_runs(run_dirs: Sequence[str | os.PathLike[str]], out_dir: str | os.PathLike[str]) -> str:
    """Compare the final round of several runs; return the Markdown table.

    Writes into ``out_dir``: ``comparison.csv`` (columns :data:`COMPARISON_COLUMNS`, std is the sample
    std over the runs sharing a method, empty with a single run), ``comparison.md``,
    ``plots/comparison_<metric>.png`` (grouped bars: rank tiers x methods, error bars = std) and
    ``plots/comparison_truncation.png`` (every method's truncation curve).
    """
    if not run_dirs:
        raise ReportError("compare_runs needs at least one run directory")
    runs = [read_run(d) for d in run_dirs]
    rows = comparison_rows(runs)
    out = Path(out_dir)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    _write_csv(
        out / "comparison.csv",
        COMPARISON_COLUMNS,
        (
            [row.method, row.kind, row.rank, ";".join(map(str, row.rounds)), row.n_runs,
             ";".join("" if s is None else str(s) for s in row.seeds)]
            + [v for m in METRICS for v in (row.mean[m], row.std[m])]
            for row in rows
        ),
    )
    table = comparison_markdown(rows)
    notes = [f"- {run.run_dir}: {w}" for run in runs for w in run.warnings]
    notes += [f"- {run.run_dir} ({run.label}): no tier records yet, left out of the method rows"
              for run in runs if run.final_round is None]
    md = ["# Comparison of the final round", "", "Runs:", ""]
    md += [f"- `{run.run_dir}`: {run.label}, final round "
           f"{'none yet' if run.final_round is None else run.final_round}" for run in runs]
    md += ["", table, ""]
    if notes:
        md += ["Notes:", ""] + notes + [""]
    tmp = out / "comparison.md.tmp"
    tmp.write_text("\n".join(md), encoding="utf-8")
    os.replace(tmp, out / "comparison.md")
    if any(row.kind == "tier" for row in rows):
        for metric in METRICS:
            _plot_comparison_bars(rows, metric, out / "plots" / f"comparison_{metric}.png")
    if any(run.truncation()[0] for run in runs):
        base = next((r for r in rows if r.kind == "base"), None)
        _plot_comparison_truncation(runs, base, out / "plots" / "comparison_truncation.png")
    return table
