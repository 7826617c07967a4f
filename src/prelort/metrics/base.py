"""The metric interface and its registry (:class:`Metric`, :class:`EvalResults`, :func:`register`); the package
:mod:`prelort.metrics` adds the built-in metrics and is what the rest of prelort imports."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class EvalResults:
    """One evaluation of one model, example by example (subset order): what a metric is computed from."""

    mode: str  # "generate" (predictions decoded) or "teacher_forced" (no prediction text)
    records: Sequence[Mapping[str, Any]]  # the evaluated dataset records ({"instruction", "output", ...})
    # per example: {"id", "category", "correct" (0/1), "loglik" (sum over the response tokens + EOS),
    # "n_tokens", "prediction" (None under teacher_forced)}
    examples: Sequence[Mapping[str, Any]]

    @property
    def references(self) -> list[str]:
        return [str(r["output"]) for r in self.records]


@dataclass(frozen=True)
class Metric:
    """One evaluation metric.

    ``compute`` returns None when the metric does not apply to this evaluation (ROUGE-L without prediction
    text); a record then carries null, tables show ``n/a`` and plots a gap. ``bounds`` is the closed range
    of valid values (``math.inf`` for none above); ``prelort check`` refuses a value outside it or not finite.
    """

    name: str  # the field in metrics.jsonl and summary.csv; comparison.csv has <name>_mean, <name>_std
    compute: Callable[[EvalResults], float | None]
    header: str  # column header of the Markdown tables
    title: str  # plot title and y-axis label
    short: str  # label in the run log's per-round line ("acc=0.500")
    digits: int  # decimals in the Markdown tables and the run log
    bounds: tuple[float, float]
    higher_is_better: bool
    log_axis: bool = False  # plots on a log y axis (values spanning orders of magnitude)

    def format(self, value: float | None) -> str:
        """``value`` with the metric's decimals; ``n/a`` for a missing (None or NaN) value."""
        if value is None or math.isnan(value):
            return "n/a"
        return f"{value:.{self.digits}f}"

    def check(self, value: Any) -> str | None:
        """None when ``value`` is null or a valid number; else the problem (``prelort check``'s words)."""
        low, high = self.bounds
        if value is None or (
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and math.isfinite(value)
            and low <= value <= high
        ):
            return None
        # a range with no upper end names the value alone (the words prelort check has always used)
        return f"{self.name}={value!r}" + (f" not in [{low:g}, {high:g}]" if math.isfinite(high) else "")


_REGISTRY: dict[str, Metric] = {}


# the other fields of an evaluation record (docs/design.md section 8): no metric may take their names
RECORD_FIELDS = frozenset({"round", "rank", "kind", "method", "seed", "n", "mode", "category_accuracy"})


def register(metric: Metric) -> Metric:
    """Make ``metric`` available under ``metric.name`` (after the metrics registered before it)."""
    if metric.name in RECORD_FIELDS:
        raise ValueError(f"metric name {metric.name!r} is a field of every evaluation record")
    if metric.name in _REGISTRY and _REGISTRY[metric.name] is not metric:
        raise ValueError(f"metric {metric.name!r} registered twice")
    _REGISTRY[metric.name] = metric
    return metric


def unregister(name: str) -> Metric:
    """Remove the metric called ``name`` from the registry (e.g. one a test registered); returns it."""
    if name not in _REGISTRY:
        raise KeyError(f"metric {name!r} is not registered")
    return _REGISTRY.pop(name)


def available() -> list[Metric]:
    """Every registered metric in registration order: the order of record fields and table columns."""
    return list(_REGISTRY.values())


def names() -> tuple[str, ...]:
    """The registered metrics' fields, in registration order."""
    return tuple(_REGISTRY)


def get(name: str) -> Metric:
    """The metric called ``name``; a clear error lists the registered ones."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown metric {name!r}; registered: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def compute(results: EvalResults) -> dict[str, float | None]:
    """Every registered metric of one evaluation, by name, in registration order."""
    return {metric.name: metric.compute(results) for metric in _REGISTRY.values()}
