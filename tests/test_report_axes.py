"""Comparison plots a newcomer can read (issue 16): named y axes, perplexity on a log axis, accuracy zoomed
to its values (or saying that every value is 0), and "one seed" said as such."""

from __future__ import annotations

from prelort import metrics
from prelort.report import plots


def axes():
    fig, (ax,) = plots._figure(1)
    return ax


def test_perplexity_is_on_a_log_axis_with_a_name():
    ax = axes()
    plots._metric_axis(ax, metrics.get("perplexity"), [63000.0, 3.2, 3.4])
    assert ax.get_yscale() == "log" and ax.get_ylabel() == "perplexity"


def test_accuracy_axis_is_zoomed_to_the_values_and_all_zero_is_said():
    ax = axes()
    plots._metric_axis(ax, metrics.get("accuracy"), [0.2, 0.3125])
    assert ax.get_ylabel() == "accuracy (exact match)"
    assert ax.get_ylim() == (0.0, 0.3125 * 1.15)
    ax = axes()
    plots._metric_axis(ax, metrics.get("rougeL"), [0.0, 0.0])
    assert ax.get_ylim() == (0.0, 1.0)
    assert [t.get_text() for t in ax.texts] == ["every value is 0"]


def test_one_seed_is_said_as_such():
    assert plots._spread([1, 1, 1]) == "one seed"
    assert plots._spread([3, 2]) == "mean ± std over up to 3 seeds"
