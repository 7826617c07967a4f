"""Prefix-nested LoRA: segments, rank masks, padding and segment-wise averaging.

Pure functions on tensors (DESIGN section 1-2). A LoRA factor pair of rank r is
A (r x d_in) and B (d_out x r); rank dimension i is (row i of A, column i of B).
The adapter at rank t is the prefix of the first t dimensions, with ONE scale
s = alpha / R for the whole federation:

    dW_t = s * B[:, :t] @ A[:t, :]

so dW_R = dW_t + s * B[:, t:] @ A[t:, :] exactly, and truncating the global
adapter gives the function a rank-t client trains.

Nothing here knows about models, files or engines.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

__all__ = [
    "segments",
    "nested_truncations",
    "rank_mask",
    "truncate",
    "pad",
    "rank_dim",
    "segment_weighted_mean",
    "padded_weighted_sums",
    "mean_from_sums",
    "PaddedSums",
]


def _check_ranks(ranks: Iterable[int]) -> list[int]:
    out = sorted({int(r) for r in ranks})
    if not out:
        raise ValueError("need at least one rank")
    if out[0] <= 0:
        raise ValueError(f"ranks must be positive, got {out[0]}")
    return out


def segments(ranks: Iterable[int]) -> list[tuple[int, int]]:
    """Cut the rank dimensions at the distinct client ranks.

    With distinct sorted ranks r(1) < ... < r(S), segment j is [r(j-1), r(j)), r(0) = 0.
    >>> segments([4, 2, 8, 2])
    [(0, 2), (2, 4), (4, 8)]
    """
    bounds = _check_ranks(ranks)
    return list(zip([0] + bounds[:-1], bounds))


def nested_truncations(rank: int, federation_ranks: Iterable[int]) -> list[int]:
    """T_k: the segment boundaries r(j) <= rank, always including ``rank`` itself (ascending)."""
    if rank <= 0:
        raise ValueError(f"rank must be positive, got {rank}")
    return sorted({r for r in _check_ranks(federation_ranks) if r <= rank} | {int(rank)})


def rank_mask(t: int, r: int, *, dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    """Vector m of length r with m_i = 1 for i < t else 0.

    Multiplying the output of A (the rank dimension) by m computes the rank-t
    truncation without copying weights; gradients then reach dimension i only
    from truncations t > i.
    """
    if not 0 <= t <= r:
        raise ValueError(f"truncation {t} outside [0, {r}]")
    m = torch.zeros(r, dtype=dtype, device=device)
    m[:t] = 1
    return m


def rank_dim(kind: str) -> int:
    """Which axis of a factor is the rank: rows of lora_A (0), columns of lora_B (1)."""
    if kind == "lora_A":
        return 0
    if kind == "lora_B":
        return 1
    raise ValueError(f"unknown LoRA factor kind {kind!r} (expected lora_A or lora_B)")


def truncate(x: Tensor, t: int, dim: int) -> Tensor:
    """The first t entries of ``x`` along the rank axis ``dim`` (a view, no copy)."""
    if not 0 <= t <= x.shape[dim]:
        raise ValueError(f"cannot truncate rank {x.shape[dim]} to {t}")
    return x.narrow(dim, 0, t)


def pad(x: Tensor, r: int, dim: int) -> Tensor:
    """Zero-pad ``x`` along the rank axis ``dim`` to size r."""
    have = x.shape[dim]
    if have > r:
        raise ValueError(f"cannot pad rank {have} down to {r}")
    if have == r:
        return x
    shape = list(x.shape)
    shape[dim] = r - have
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


class PaddedSums:
    """Streaming accumulator of the two plain sums over zero-padded factors.

    After ``add(X_k, p_k)`` for every client k (X_k of rank r_k <= R along ``dim``):

        num   = sum_k p_k * pad(X_k, R)          float64, the global factor's shape
        den_i = sum_{k: r_k > i} p_k             float64, length R (padded weight masks)
        total = sum_k p_k

    Memory is one global-size float64 tensor plus a length-R vector, whatever the number of
    clients, so a server can fold updates in as they arrive. From the sums:

        segment_mean: dimension i = num_i / den_i (PreLort; previous value where den_i = 0)
        padded_mean:  every dimension = num / total (zero-padding FedAvg: the dilution)
    """

    def __init__(self, shape: Sequence[int], dim: int, *, device: torch.device | str | None = None):
        shape = [int(n) for n in shape]
        if not 0 <= dim < len(shape):
            raise ValueError(f"rank axis {dim} outside a {len(shape)}-d factor")
        self.shape = tuple(shape)
        self.dim = dim
        self.rank = shape[dim]
        self.num = torch.zeros(shape, dtype=torch.float64, device=device)
        self.den = torch.zeros(self.rank, dtype=torch.float64, device=device)
        self.total = 0.0
        self.count = 0

    def add(self, x: Tensor, weight: float) -> None:
        """Fold in one client's factor ``x`` (rank = ``x.shape[dim]``) with weight ``weight`` >= 0."""
        w = float(weight)
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"weight must be finite and >= 0, got {weight}")
        if x.dim() != len(self.shape):
            raise ValueError(f"factor has {x.dim()} axes, expected {len(self.shape)}")
        k = x.shape[self.dim]
        if k > self.rank:
            raise ValueError(f"factor of rank {k} exceeds global rank {self.rank}")
        for axis, (have, want) in enumerate(zip(x.shape, self.shape)):
            if axis != self.dim and have != want:
                raise ValueError(
                    f"factor has shape {tuple(x.shape)}, expected {self.shape} up to the rank axis {self.dim}"
                )
        # in-place add promotes x to float64 element by element: no float64 copy of the update
        self.num.narrow(self.dim, 0, k).add_(x.to(device=self.num.device), alpha=w)
        self.den[:k] += w
        self.total += w
        self.count += 1

    def segment_mean(self, previous: Tensor) -> Tensor:
        """num_i / den_i per dimension; an uncovered dimension keeps ``previous`` (dtype of ``previous``)."""
        return mean_from_sums(self.num, self.den, previous, self.dim)

    def padded_mean(self, previous: Tensor) -> Tensor:
        """num / total: zero-padded FedAvg over all clients; ``previous`` unchanged if total weight is 0."""
        if tuple(previous.shape) != self.shape:
            raise ValueError(f"previous global factor has shape {tuple(previous.shape)}, sums have {self.shape}")
        if self.total <= 0:
            return previous.clone()
        return (self.num / self.total).to(dtype=previous.dtype, device=previous.device)


def padded_weighted_sums(
    factors: Sequence[Tensor], weights: Sequence[float], r: int, dim: int
) -> tuple[Tensor, Tensor]:
    """The two plain sums segment-wise averaging needs (secure-aggregation friendly).

        numerator   N = sum_k p_k * pad(X_k, R)                 (same shape as the global factor)
        denominator D = sum_k p_k * pad(1_{r_k}, R)             (length R: D_i = sum_{k: r_k > i} p_k)

    Each term has a fixed shape, so a server (or SecAgg) only ever sees sums.
    """
    if len(factors) != len(weights):
        raise ValueError(f"{len(factors)} factors but {len(weights)} weights")
    if not factors:
        raise ValueError("no factors to sum")
    shape = list(factors[0].shape)
    shape[dim] = r
    sums = PaddedSums(shape, dim)
    for x, p in zip(factors, weights):
        sums.add(x, p)
    return sums.num, sums.den


def mean_from_sums(num: Tensor, den: Tensor, previous: Tensor, dim: int) -> Tensor:
    """Finish the segment-wise mean from the two sums: N_i / D_i where D_i > 0, else ``previous``_i.

    A dimension no client covered this round keeps its previous global value.
    """
    if previous.shape != num.shape:
        raise ValueError(f"previous global factor has shape {tuple(previous.shape)}, sums have {tuple(num.shape)}")
    shape = [1] * num.dim()
    shape[dim] = num.shape[dim]
    d = den.view(shape)
    covered = d > 0
    mean = num / torch.where(covered, d, torch.ones_like(d))
    return torch.where(covered, mean, previous.to(torch.float64)).to(previous.dtype)


def segment_weighted_mean(
    factors: Sequence[Tensor], weights: Sequence[float], previous: Tensor, dim: int
) -> Tensor:
    """Segment-wise weighted mean of factors of different ranks (PreLort aggregation).

    For every segment seg_j = [r(j-1), r(j)) with covering clients C_j = {k : r_k >= r(j)}:

        X_new[seg_j] = sum_{k in C_j} p_k X_k[seg_j] / sum_{k in C_j} p_k

    i.e. dimension i is the p-weighted mean over the clients with r_k > i; a
    segment no client covers keeps ``previous``. ``dim`` is the rank axis
    (0 for lora_A, 1 for lora_B). Computed directly, segment by segment; it
    equals ``mean_from_sums(*padded_weighted_sums(...))``.
    """
    if len(factors) != len(weights):
        raise ValueError(f"{len(factors)} factors but {len(weights)} weights")
    R = previous.shape[dim]
    out = previous.clone()
    if not factors:
        return out
    ranks = [x.shape[dim] for x in factors]
    if max(ranks) > R:
        raise ValueError(f"factor of rank {max(ranks)} exceeds global rank {R}")
    for lo, hi in segments(ranks):
        members = [(x, p) for x, p in zip(factors, weights) if x.shape[dim] >= hi]
        total = sum(float(p) for _, p in members)
        if total <= 0:
            continue  # only zero-weight clients: nothing to average, keep the previous value
        acc = sum(float(p) * x.narrow(dim, lo, hi - lo).to(torch.float64) for x, p in members)
        out.narrow(dim, lo, hi - lo).copy_((acc / total).to(out.dtype))
    return out
