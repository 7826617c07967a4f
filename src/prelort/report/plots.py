"""Plots of run records (matplotlib on the Agg canvas, no display): one run's metrics by round, truncation
curve, train loss and DP epsilon; several runs' grouped bars and truncation curves."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..metrics import Metric
from ..metrics import available as available_metrics
from .reading import EvalRecord, RunMetrics
from .tables import _BASE_LABEL, ComparisonRow, _methods_in_order, mean_std


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


def _metric_axis(ax: Any, metric: Metric, values: Sequence[float]) -> None:
    """Name the y axis; a ``log_axis`` metric (perplexity) on a log axis (a random model's ~6e4 and a tuned
    model's ~3 on one plot, and the differences between tuned methods still visible); any other from its
    lower bound up to a little above the largest value (at most its upper bound), saying so when every
    value is 0 (nothing to see, not a broken plot)."""
    ax.set_ylabel(metric.title)
    finite = [v for v in values if not math.isnan(v)]
    if metric.log_axis:
        if finite and min(finite) > 0:
            ax.set_yscale("log")
        return
    low, high = metric.bounds
    top = max(finite, default=0.0)
    if top <= 0:
        ax.set_ylim(low, 1)
        ax.text(0.5, 0.5, "every value is 0", transform=ax.transAxes, ha="center", va="center", color="0.4")
    else:
        ax.set_ylim(low, min(high, top * 1.15))


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
    fig, axes = _figure(len(available_metrics()))
    for ax, metric in zip(axes, available_metrics()):
        for rank in ranks:
            points = sorted((r.round, r.metric(metric.name)) for r in tiers if r.rank == rank)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"rank {rank}")
        if run.base is not None:
            _base_line(ax, run.base.metric(metric.name))
        ax.set_xlabel("round")
        ax.set_title(metric.title)
        _metric_axis(
            ax, metric, [r.metric(metric.name) for r in tiers] + ([run.base.metric(metric.name)] if run.base else [])
        )
        ax.grid(alpha=0.3)
        _integer_x(ax)
    axes[0].legend(fontsize="small")
    fig.suptitle(f"{run.label}: metrics by round, per rank tier")
    return _save(fig, path)


def _plot_truncation(run: RunMetrics, records: list[EvalRecord], source: str, path: Path) -> Path:
    ts = [int(r.rank) for r in records]
    fig, axes = _figure(len(available_metrics()))
    for ax, metric in zip(axes, available_metrics()):
        ax.plot(ts, [r.metric(metric.name) for r in records], marker="o", label=run.method)
        if run.base is not None:
            _base_line(ax, run.base.metric(metric.name))
        _log2_x(ax, ts)
        ax.set_xlabel("rank t (prefix kept)")
        ax.set_title(metric.title)
        _metric_axis(
            ax, metric, [r.metric(metric.name) for r in records] + ([run.base.metric(metric.name)] if run.base else [])
        )
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
        ax.scatter(
            [p[0] for p in rejected],
            [p[1] for p in rejected],
            marker="x",
            color="red",
            zorder=3,
            label="round with rejected updates",
        )
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


def _plot_comparison_bars(rows: Sequence[ComparisonRow], metric: Metric, path: Path) -> Path:
    tier_rows = [r for r in rows if r.kind == "tier"]
    methods = list(dict.fromkeys(r.method for r in tier_rows))
    ranks = sorted({int(r.rank) for r in tier_rows})
    fig, (ax,) = _figure(1, width=max(5.5, 1.1 * len(ranks) * max(1, len(methods)) ** 0.5 + 3))
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        by_rank = {int(r.rank): r for r in tier_rows if r.method == method}
        xs = [j + (i - (len(methods) - 1) / 2) * width for j, rank in enumerate(ranks) if rank in by_rank]
        heights = [by_rank[rank].mean[metric.name] for rank in ranks if rank in by_rank]
        errors = [
            0.0 if math.isnan(by_rank[rank].std[metric.name]) else by_rank[rank].std[metric.name]
            for rank in ranks
            if rank in by_rank
        ]
        ax.bar(xs, heights, width=width, yerr=errors, capsize=2, label=method)
    base = next((r for r in rows if r.kind == "base"), None)
    if base is not None:
        _base_line(ax, base.mean[metric.name])
    ax.set_xticks(range(len(ranks)))
    ax.set_xticklabels([str(r) for r in ranks])
    ax.set_xlabel("client rank tier")
    _metric_axis(
        ax,
        metric,
        [r.mean[metric.name] + (0.0 if math.isnan(r.std[metric.name]) else r.std[metric.name]) for r in rows],
    )
    ax.set_title(f"{metric.title} at the final round ({_spread([r.n_runs for r in tier_rows])})")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small", ncols=2)
    return _save(fig, path)


def _plot_comparison_truncation(runs: Sequence[RunMetrics], base: ComparisonRow | None, path: Path) -> Path:
    fig, axes = _figure(len(available_metrics()))
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
        for ax, metric in zip(axes, available_metrics()):
            stats = [mean_std([r.metric(metric.name) for r in by_t[t]]) for t in ts]
            means = [s[0] for s in stats]
            (line,) = ax.plot(ts, means, marker="o", label=method)
            if any(not math.isnan(s[1]) for s in stats):
                stds = [0.0 if math.isnan(s[1]) else s[1] for s in stats]
                ax.fill_between(
                    ts,
                    [m - s for m, s in zip(means, stds)],
                    [m + s for m, s in zip(means, stds)],
                    color=line.get_color(),
                    alpha=0.15,
                    linewidth=0,
                )
    for ax, metric in zip(axes, available_metrics()):
        if base is not None:
            _base_line(ax, base.mean[metric.name])
        if all_ts:
            _log2_x(ax, sorted(all_ts))
        ax.set_xlabel("rank t (prefix kept)")
        ax.set_title(metric.title)
        _metric_axis(
            ax,
            metric,
            [r.metric(metric.name) for run in runs for r in run.truncation()[0]]
            + ([base.mean[metric.name]] if base is not None else []),
        )
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    seeds_per_method = [len({run.seed for run in runs if run.method == m}) for m in _methods_in_order(runs)]
    fig.suptitle(f"truncation curves ({_spread(seeds_per_method)})")
    return _save(fig, path)
