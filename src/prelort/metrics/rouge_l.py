"""rougeL: ROUGE-L F1 (``rouge_score``) of the decoded predictions against the references, averaged over
the examples; with LCS the longest common subsequence of the token lists, P = LCS / len(prediction),
R = LCS / len(reference), F1 = 2 P R / (P + R). None under teacher_forced (no prediction text)."""

from __future__ import annotations

from rouge_score import rouge_scorer

from .base import EvalResults, Metric

_ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 of ``prediction`` against ``reference`` (0.0 when either has no token)."""
    return float(_ROUGE.score(reference, prediction)["rougeL"].fmeasure)


def _rouge_l(results: EvalResults) -> float | None:
    if results.mode != "generate":
        return None
    pairs = zip((ex["prediction"] for ex in results.examples), results.references)
    return sum(rouge_l(p or "", r) for p, r in pairs) / len(results.examples)


ROUGE_L = Metric(
    name="rougeL",
    compute=_rouge_l,
    header="ROUGE-L",
    title="ROUGE-L F1",
    short="rL",
    digits=3,
    bounds=(0.0, 1.0),
    higher_is_better=True,
)
