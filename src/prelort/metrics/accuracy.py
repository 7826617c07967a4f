"""accuracy: the share of examples answered exactly (evaluation's per-example ``correct`` verdict: greedy
decoding's normalised exact match, or its teacher-forced equivalent; see :mod:`prelort.evaluate`)."""

from __future__ import annotations

from .base import EvalResults, Metric


def _accuracy(results: EvalResults) -> float:
    return sum(ex["correct"] for ex in results.examples) / len(results.examples)


ACCURACY = Metric(
    name="accuracy",
    compute=_accuracy,
    header="accuracy",
    title="accuracy (exact match)",
    short="acc",
    digits=3,
    bounds=(0.0, 1.0),
    higher_is_better=True,
)
