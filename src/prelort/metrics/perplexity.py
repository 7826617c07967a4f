"""perplexity: exp( sum of response-token NLL / number of response tokens ), pooled over the whole set
(not a mean of per-example perplexities). Plots use a log axis: a random model's ~6e4 and a tuned
model's ~3 share a plot with the differences between tuned methods still visible."""

from __future__ import annotations

import math

from .base import EvalResults, Metric


def _perplexity(results: EvalResults) -> float:
    total_tokens = sum(ex["n_tokens"] for ex in results.examples)
    if total_tokens == 0:
        raise ValueError("no response token to score (every label is -100)")
    return math.exp(-sum(ex["loglik"] for ex in results.examples) / total_tokens)


PERPLEXITY = Metric(
    name="perplexity",
    compute=_perplexity,
    header="perplexity",
    title="perplexity",
    short="ppl",
    digits=2,
    bounds=(1.0, math.inf),
    higher_is_better=False,
    log_axis=True,
)
