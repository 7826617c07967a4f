"""``nll``: the mean negative log-likelihood of a response token, in nats (the log of the pooled perplexity),
a metric the test suite adds. Lower is better; it has no upper bound and plots on a linear axis.

tests/metrics/test_metrics.py loads this file, which registers the metric, and follows it from evaluation
to metrics.jsonl, ``prelort report`` and ``prelort check``.
"""

from __future__ import annotations

import math

from prelort.metrics import EvalResults, Metric, register


def _nll(results: EvalResults) -> float:
    return -sum(ex["loglik"] for ex in results.examples) / sum(ex["n_tokens"] for ex in results.examples)


NLL = register(
    Metric(
        name="nll",
        compute=_nll,
        header="NLL/token",
        title="response-token NLL (nats)",
        short="nll",
        digits=3,
        bounds=(0.0, math.inf),
        higher_is_better=False,
    )
)
