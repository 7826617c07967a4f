"""Robust statistics over a round's clients: pure functions on tensors (docs/security.md, "One client against
the rest").

Three defences of the round loop are built from them (:mod:`prelort.federation` applies them; methods reach
the coordinate-wise aggregate through :meth:`prelort.methods.toolkit.SumRuleMethod.aggregate_robust`):

* **clip to the median** (``robust.clip_to_median`` = k): per segment of the rank dimensions, each client's
  change (its update minus what it received) is scaled down to at most k times the segment's (lower) median
  change norm over the clients that cover it (:func:`segment_change_norms`, :func:`segment_medians`, :func:`median_clip_scales`,
  :func:`scale_segments`);
* **cap the weight** (``robust.max_examples_ratio`` = c): a client's number of examples is capped at c times
  the round's (lower) median (:func:`cap_at_median`);
* **coordinate-wise aggregate** (``robust.aggregator``): the mean, the trimmed mean or the median of each entry
  over the clients stacked on axis 0 (:func:`coordinatewise`).

The lower median (the smaller middle value of an even count) is the one used throughout: with two clients
it is the smaller one, so one hostile client never sets the bound its partner is held to.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal, get_args

import torch
from torch import Tensor

from .rank_geometry import rank_dim

__all__ = [
    "AGGREGATORS",
    "Aggregator",
    "cap_at_median",
    "coordinatewise",
    "lower_median",
    "median_clip_scales",
    "scale_segments",
    "segment_change_norms",
    "segment_medians",
    "trim_count",
]

# How a round combines its clients' values of one entry (robust.aggregator).
Aggregator = Literal["mean", "trimmed_mean", "median"]
AGGREGATORS: tuple[str, ...] = get_args(Aggregator)


def lower_median(values: Sequence[float]) -> float:
    """The lower median: the middle value, the smaller of the two middle ones for an even count."""
    if not values:
        raise ValueError("the median of no values")
    ordered = sorted(float(v) for v in values)
    return ordered[(len(ordered) - 1) // 2]


def _kind_dim(name: str) -> int:
    return rank_dim(name.rpartition(".")[2])


def segment_change_norms(change: Mapping[str, Tensor], bounds: Sequence[tuple[int, int]]) -> list[float | None]:
    """Per segment [lo, hi) of the rank dimensions, the Frobenius norm (float64) of the change's part in it
    (rows lo..hi-1 of every lora_A, those columns of every lora_B), or None where the change has no
    dimension in the segment (a client of rank <= lo does not cover it). ``change``: tensor name
    (``<module>.lora_A`` / ``.lora_B``) -> the client's update minus what it received."""
    totals: list[float | None] = [None] * len(bounds)
    for name, x in change.items():
        dim = _kind_dim(name)
        have = x.shape[dim]
        for j, (lo, hi) in enumerate(bounds):
            if have <= lo:
                continue
            part = x.narrow(dim, lo, min(hi, have) - lo).to(torch.float64)
            totals[j] = (totals[j] or 0.0) + float(part.pow(2).sum())
    return [None if t is None else math.sqrt(t) for t in totals]


def segment_medians(norms: Sequence[Sequence[float | None]]) -> list[float | None]:
    """Per segment, the lower median of the clients' change norms (rows of ``norms``, from
    :func:`segment_change_norms`) over the clients that changed it; None for a segment no client changed. A client
    that covers a segment without changing it (PreLort's ``nested: sample`` may never draw a truncation that
    reaches it in a round, and lazy Adam then leaves it as received) pulls nothing and must not set the bound
    to 0 for the ones that trained it."""
    segments = max((len(row) for row in norms), default=0)
    out: list[float | None] = []
    for j in range(segments):
        covering = [n for row in norms if j < len(row) and (n := row[j]) is not None and n > 0]
        out.append(lower_median(covering) if covering else None)
    return out


def median_clip_scales(
    norms: Sequence[Sequence[float | None]], medians: Sequence[float | None], factor: float
) -> list[list[float]]:
    """Per client (rows of ``norms``) and segment j, the factor min(1, ``factor`` x medians[j] / norm) its change
    in segment j is multiplied by (1 where it does not cover the segment)."""
    if not (math.isfinite(factor) and factor >= 1):
        raise ValueError(f"the median clip factor must be a number >= 1, got {factor}")
    scales = []
    for row in norms:
        scales.append(
            [
                1.0 if n is None or m is None or n <= factor * m else factor * m / n
                for n, m in zip(list(row) + [None] * (len(medians) - len(row)), medians)
            ]
        )
    return scales


def scale_segments(
    change: Mapping[str, Tensor], scales: Sequence[float], bounds: Sequence[tuple[int, int]]
) -> dict[str, Tensor]:
    """The change with its part in segment j (``bounds[j]``) multiplied by ``scales[j]`` (new tensors)."""
    out = {}
    for name, x in change.items():
        dim = _kind_dim(name)
        y = x.clone()
        for (lo, hi), s in zip(bounds, scales):
            if s != 1.0 and x.shape[dim] > lo:
                y.narrow(dim, lo, min(hi, x.shape[dim]) - lo).mul_(s)
        out[name] = y
    return out


def cap_at_median(counts: Sequence[int], ratio: float) -> list[int]:
    """Each count capped at ``ratio`` x the lower median of ``counts`` (rounded down, at least 1)."""
    if not (math.isfinite(ratio) and ratio >= 1):
        raise ValueError(f"the weight cap ratio must be a number >= 1, got {ratio}")
    if not counts:
        return []
    cap = max(1, math.floor(ratio * lower_median(counts)))
    return [min(int(c), cap) for c in counts]


def trim_count(n: int, fraction: float) -> int:
    """How many values a trimmed mean of ``n`` drops at EACH end: ceil(fraction x n), but at most (n - 1) // 2,
    so at least one value (two for an even n) stays."""
    if not 0 <= fraction < 0.5:
        raise ValueError(f"trim fraction must be in [0, 0.5), got {fraction}")
    return min(math.ceil(fraction * n), (n - 1) // 2)


def coordinatewise(stack: Tensor, aggregator: Aggregator, trim_fraction: float = 0.0) -> Tensor:
    """Combine the clients' values of every entry: ``stack`` holds one client per index of axis 0.

    ``mean``: the plain (unweighted) mean; ``median``: the median of each entry (the mean of the two middle
    values for an even count); ``trimmed_mean``: the mean after dropping :func:`trim_count` values at each end
    of each entry. Float64 inside, ``stack``'s dtype out."""
    n = stack.shape[0]
    if n == 0:
        raise ValueError("no clients to aggregate")
    x = stack.to(torch.float64)
    if aggregator == "mean":
        out = x.mean(dim=0)
    elif aggregator == "median":
        ordered = x.sort(dim=0).values
        out = (ordered[(n - 1) // 2] + ordered[n // 2]) / 2
    elif aggregator == "trimmed_mean":
        t = trim_count(n, trim_fraction)
        out = x.sort(dim=0).values[t : n - t].mean(dim=0)
    else:
        raise ValueError(f"unknown aggregator {aggregator!r} (expected one of {', '.join(AGGREGATORS)})")
    return out.to(stack.dtype)
