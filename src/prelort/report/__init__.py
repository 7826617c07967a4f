"""Tables and plots of run directories (docs/design.md sections 4 and 7).

:func:`write_run_report` writes ``summary.csv`` and ``plots/*.png`` into one run directory;
:func:`compare_runs` tabulates the final round of several runs (mean and sample standard deviation over
the runs that share a method) and draws comparison plots. Plots use the Agg canvas (no display).

The package: :mod:`.reading` (run directories into records; the ``metrics.jsonl`` format),
:mod:`.tables` (CSV and Markdown), :mod:`.plots` (matplotlib); the entry points above live here.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..metrics import available as available_metrics
from ..rundir import RunDir
from .plots import (
    _plot_comparison_bars,
    _plot_comparison_truncation,
    _plot_epsilon,
    _plot_metrics_by_round,
    _plot_train_loss,
    _plot_truncation,
)
from .reading import EVAL_KINDS, EvalRecord, ReportError, RunMetrics, TrainRecord, read_run
from .tables import (
    ComparisonRow,
    _write_csv,
    category_table,
    comparison_columns,
    comparison_markdown,
    comparison_rows,
    federated_eval_table,
    final_round_table,
    mean_std,
    privacy_line,
    summary_columns,
)

__all__ = [
    "EVAL_KINDS",
    "ComparisonRow",
    "EvalRecord",
    "ReportError",
    "RunMetrics",
    "TrainRecord",
    "category_table",
    "compare_runs",
    "comparison_columns",
    "comparison_markdown",
    "comparison_rows",
    "federated_eval_table",
    "final_round_table",
    "mean_std",
    "privacy_line",
    "read_run",
    "summary_columns",
    "write_run_report",
]


def write_run_report(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Write ``summary.csv`` and ``plots/*.png`` into ``run_dir``.

    ``summary.csv`` has one row per evaluation record after deduplication (columns
    :func:`summary_columns`), sorted by round, kind (base, tier, curve) and rank. Plots, each drawn when
    its data exist: ``metrics_by_round.png``, ``truncation_curve.png`` (from "curve" records, else the
    final round's tiers), ``train_loss.png``, ``privacy_epsilon.png`` (``privacy.dp`` runs: epsilon per round).

    Returns ``{"run_dir", "summary_csv", "plots" (list of paths), "n_eval_records", "n_train_records",
    "final_round" (None before any tier record), "final_table" (Markdown), "messages" (list of str)}``.
    """
    run = read_run(run_dir)
    run_path = run.run_dir
    messages = list(run.warnings)
    summary = RunDir(run_path).summary_csv
    _write_csv(
        summary,
        summary_columns(),
        (
            [r.method, r.seed, r.round, r.rank, r.kind, *(r.metric(m.name) for m in available_metrics()), r.n]
            for r in run.evals
        ),
    )
    plots_dir = RunDir(run_path).plots_dir
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
        "final_table": final_round_table(run)
        + (f"\n\naccuracy per category:\n{cats}" if (cats := category_table(run)) else ""),
        "messages": messages,
    }


def compare_runs(run_dirs: Sequence[str | os.PathLike[str]], out_dir: str | os.PathLike[str]) -> str:
    """Compare the final round of several runs; return the Markdown table.

    Writes into ``out_dir``: ``comparison.csv`` (columns :func:`comparison_columns`, std is the sample
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
        comparison_columns(),
        (
            [
                row.method,
                row.kind,
                row.rank,
                ";".join(map(str, row.rounds)),
                row.n_runs,
                ";".join("" if s is None else str(s) for s in row.seeds),
            ]
            + [v for m in available_metrics() for v in (row.mean[m.name], row.std[m.name])]
            for row in rows
        ),
    )
    table = comparison_markdown(rows)
    notes = [f"- {run.run_dir}: {w}" for run in runs for w in run.warnings]
    notes += [
        f"- {run.run_dir} ({run.label}): no tier records yet, left out of the method rows"
        for run in runs
        if run.final_round is None
    ]
    md = ["# Comparison of the final round", "", "Runs:", ""]
    md += [
        f"- `{run.run_dir}`: {run.label}, final round {'none yet' if run.final_round is None else run.final_round}"
        for run in runs
    ]
    md += ["", table, ""]
    if notes:
        md += ["Notes:", ""] + notes + [""]
    tmp = out / "comparison.md.tmp"
    tmp.write_text("\n".join(md), encoding="utf-8")
    os.replace(tmp, out / "comparison.md")
    if any(row.kind == "tier" for row in rows):
        for metric in available_metrics():
            _plot_comparison_bars(rows, metric, out / "plots" / f"comparison_{metric.name}.png")
    if any(run.truncation()[0] for run in runs):
        base = next((r for r in rows if r.kind == "base"), None)
        _plot_comparison_truncation(runs, base, out / "plots" / "comparison_truncation.png")
    return table
