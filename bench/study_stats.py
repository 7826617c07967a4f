"""Statistics of the quality study (docs/quality-study.md): pure functions on per-example verdicts.

- :class:`Resampler`: the two-stage bootstrap over seeds, then examples within each drawn seed, with one set of
  drawn indices shared by every comparison (so paired differences and the "best baseline" use the same draws).
- :func:`paired_replicates` / :func:`replicates`: bootstrap replicates of a mean (difference) over seeds and
  examples.
- :func:`percentile_ci`, :func:`bootstrap_p`, :func:`holm` (statsmodels), :func:`mdd`, :func:`decide`.

Inputs are per seed arrays of per-example values (0/1 verdicts), in the same example order for the arms
compared on that seed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from statistics import NormalDist
from typing import Any

import numpy as np
from statsmodels.stats.multitest import multipletests

# the decision rule of issue 12 (docs/quality-study.md), fixed in advance
UPPER_MARGIN = 0.0  # upper tiers: CI lower bound above this
LOWER_MARGIN = -0.02  # lower tiers: CI lower bound above this
EQUIVALENCE = 0.03  # refuted when every tier's CI lies within +-this


class Resampler:
    """Bootstrap draws for ``sizes[s]`` examples on seed s: ``replicates`` x (seed draw, example draws).

    Replicate b draws S seeds with replacement (``seeds[b, k]``) and, for each drawn position k, n_j examples
    of that seed j with replacement, as ``floor(u[b, k, :n_j] * n_j)`` with ``u`` uniform in [0, 1): the same
    ``u`` serve every comparison, so two statistics computed from one resampler are paired draw by draw.
    """

    def __init__(self, sizes: Sequence[int], replicates: int = 10_000, seed: int = 0):
        if not sizes or any(int(n) < 1 for n in sizes):
            raise ValueError(f"every seed needs at least one example, got sizes {list(sizes)}")
        if replicates < 1:
            raise ValueError(f"replicates must be >= 1, got {replicates}")
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.replicates = int(replicates)
        rng = np.random.default_rng(seed)
        s, n_max = len(sizes), int(self.sizes.max())
        self.seeds = rng.integers(0, s, size=(self.replicates, s))
        self.u = rng.random((self.replicates, s, n_max), dtype=np.float32)

    def means(self, values: Sequence[Sequence[float]]) -> np.ndarray:
        """Replicates of the pooled mean over (seed, example) pairs of ``values[s][i]`` (shape (B,))."""
        if len(values) != len(self.sizes):
            raise ValueError(f"{len(values)} seeds of values for a resampler of {len(self.sizes)} seeds")
        n_max = int(self.sizes.max())
        padded = np.zeros((len(values), n_max), dtype=np.float64)
        for s, v in enumerate(values):
            v = np.asarray(v, dtype=np.float64)
            if v.shape != (self.sizes[s],):
                raise ValueError(f"seed {s}: {v.shape[0] if v.ndim == 1 else v.shape} values, expected {self.sizes[s]}")
            padded[s, : len(v)] = v
        total = np.zeros(self.replicates)
        count = np.zeros(self.replicates)
        positions = np.arange(n_max)
        for k in range(len(self.sizes)):
            j = self.seeds[:, k]
            n = self.sizes[j]
            idx = np.minimum((self.u[:, k, :] * n[:, None]).astype(np.int64), n[:, None] - 1)
            mask = positions[None, :] < n[:, None]
            total += (padded[j[:, None], idx] * mask).sum(axis=1)
            count += n
        return total / count


def pooled_mean(values: Sequence[Sequence[float]]) -> float:
    flat = np.concatenate([np.asarray(v, dtype=np.float64) for v in values])
    return float(flat.mean())


def paired_differences(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]]) -> list[np.ndarray]:
    """Per seed, a - b example by example (the arms must hold the same examples in the same order)."""
    if len(a) != len(b):
        raise ValueError(f"{len(a)} seeds against {len(b)}")
    out = []
    for s, (x, y) in enumerate(zip(a, b)):
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        if x.shape != y.shape:
            raise ValueError(f"seed {s}: {x.shape[0]} examples against {y.shape[0]}: not paired")
        out.append(x - y)
    return out


def percentile_ci(reps: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The central ``level`` percentile interval of the replicates (numpy's quantiles: the replicates come from
    :class:`Resampler`'s two-stage draws, which no library's bootstrap routine makes)."""
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    tail = (1 - level) / 2
    lo, hi = np.quantile(np.asarray(reps, dtype=np.float64), [tail, 1 - tail])
    return float(lo), float(hi)


def bootstrap_p(reps: np.ndarray, null: float = 0.0) -> float:
    """Two-sided bootstrap p-value of H0: statistic = ``null``: 2 min(P(D* <= null), P(D* >= null)), each
    estimated as (k + 1) / (B + 1), capped at 1."""
    reps = np.asarray(reps, dtype=np.float64)
    b = reps.size
    below = (np.count_nonzero(reps <= null) + 1) / (b + 1)
    above = (np.count_nonzero(reps >= null) + 1) / (b + 1)
    return float(min(1.0, 2 * min(below, above)))


def holm(pvalues: Sequence[float], alpha: float = 0.05) -> dict[str, list[Any]]:
    """Holm's step-down correction, by statsmodels' ``multipletests(method="holm")``.

    ``adjusted[i]`` = max over the j-th smallest p-values up to i's position of min(1, (m - j + 1) p_(j));
    ``reject[i]``: hypothesis i is rejected at family-wise level ``alpha``; ``level[i]`` = alpha / (m - j_i + 1),
    the level at which Holm tests hypothesis i (j_i its position in ascending order; ties keep input order),
    which the study's Holm-adjusted intervals are taken at.
    """
    p = [float(x) for x in pvalues]
    if not p:
        return {"adjusted": [], "reject": [], "level": []}
    reject, adjusted, _, _ = multipletests(p, alpha=alpha, method="holm")
    m = len(p)
    level = [0.0] * m
    for pos, i in enumerate(sorted(range(m), key=lambda i: (p[i], i))):
        level[i] = alpha / (m - pos)
    return {"adjusted": [float(a) for a in adjusted], "reject": [bool(r) for r in reject], "level": level}


def mdd(se: float, alpha: float = 0.05, power: float = 0.8) -> float:
    """Minimum detectable difference of a two-sided test at ``alpha`` with ``power``:
    (z_{1 - alpha/2} + z_{power}) x se (normal approximation of the bootstrap distribution)."""
    z = NormalDist().inv_cdf
    return float((z(1 - alpha / 2) + z(power)) * se)


def decide(cis: Mapping[int, tuple[float, float]], equivalence: float | None = EQUIVALENCE) -> dict[str, Any]:
    """The pre-registered verdict from each tier's CI of PreLort minus the best baseline.

    The upper half of the tiers (8 and 16 of 2/4/8/16) must have lo > 0 and the lower half lo > -0.02 for
    *confirmed*; *refuted* when some tier has hi < 0, or every tier lies within +-``equivalence`` (study 1's
    0.03; None drops that branch, as study 2's stage C does); else *inconclusive*. Refuted is checked first.
    """
    if not cis:
        raise ValueError("no tiers to decide on")
    tiers = sorted(int(t) for t in cis)
    upper = tiers[len(tiers) // 2 :]
    lower = tiers[: len(tiers) // 2]
    below = [t for t in tiers if cis[t][1] < 0]
    if below:
        return {"verdict": "refuted", "reason": f"CI below 0 at tier(s) {below}"}
    if equivalence is not None and all(-equivalence <= cis[t][0] and cis[t][1] <= equivalence for t in tiers):
        return {"verdict": "refuted", "reason": f"CI within +-{equivalence} at every tier"}
    if all(cis[t][0] > UPPER_MARGIN for t in upper) and all(cis[t][0] > LOWER_MARGIN for t in lower):
        return {
            "verdict": "confirmed",
            "reason": f"CI above 0 at tier(s) {upper} and above {LOWER_MARGIN} at tier(s) {lower}",
        }
    return {"verdict": "inconclusive", "reason": "neither confirmed nor refuted by the pre-registered rule"}
