"""Streaming sums of zero-padded LoRA factors: what every sum-aggregatable method (and SecAgg, DP) adds up.

A server folds each client's factors X_k (rank r_k <= R along the rank axis, see
:func:`prelort.rank_geometry.rank_dim`) with weight p_k into two plain sums (docs/design.md section 2)

    N   = sum_k p_k * pad(X_k, R)          the global factor's shape (float64)
    D_i = sum_{k: r_k > i} p_k             length R: the padded weight masks

and finishes the round from them by a sum rule (:data:`SumRule`): the segment-wise mean N_i / D_i
(a dimension no client covered keeps its previous value) or the padded mean N / D_0 = N / sum_k p_k
(zero-padding FedAvg). :func:`mean_from_sums` is the one place either mean is taken - a plain round, client-level
DP and the SecAgg+ finish all end there (:func:`finish_from_sums` for a whole state). :class:`PaddedSums` holds
the sums of one factor, :class:`FactorSums` those of a whole adapter, fed a client at a time with memory flat in
the number of clients.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor

from .rank_geometry import rank_dim

__all__ = [
    "SumRule",
    "mean_from_sums",
    "finish_from_sums",
    "PaddedSums",
    "FactorSums",
    "check_weight",
]

# How a round finishes the two padded sums N = sum_k w_k pad(X_k), D_i = sum_{k: r_k > i} w_k:
# "segment": dimension i = N_i / D_i (where D_i > 0); "padded": every dimension = N / D_0.
SumRule = Literal["segment", "padded"]


class PaddedSums:
    """Streaming accumulator of the two plain sums over zero-padded factors.

    After ``add(X_k, p_k)`` for every client k (X_k of rank r_k <= R along ``dim``):

        num   = sum_k p_k * pad(X_k, R)          float64, the global factor's shape
        den_i = sum_{k: r_k > i} p_k             float64, length R (padded weight masks)
        total = sum_k p_k

    Memory is at most one global-size float64 tensor plus the total weight per client rank,
    whatever the number of clients, so a server can fold updates in as they arrive. Two things are
    kept compact because they cost more than the adds themselves at small shapes (measured in
    bench/aggregation.py): the numerator is only allocated up to the largest rank seen so far
    (``allocated``; beyond it every term is zero padding), and ``den`` is built from the per-rank
    totals when read. ``num`` is the full-size tensor (built on demand when ``allocated < R``),
    ``compact_num`` its allocated prefix. From the sums (both by :func:`mean_from_sums`):

        segment_mean: dimension i = num_i / den_i (previous value where den_i = 0)
        padded_mean:  every dimension = num / den_0 = num / total (zero-padding FedAvg: the dilution)
    """

    def __init__(self, shape: Sequence[int], dim: int, *, device: torch.device | str | None = None):
        shape = [int(n) for n in shape]
        if not 0 <= dim < len(shape):
            raise ValueError(f"rank axis {dim} outside a {len(shape)}-d factor")
        self.shape = tuple(shape)
        self.dim = dim
        self.rank = shape[dim]
        self.allocated = 0  # numerator dimensions held: [0, allocated); the rest is zero
        self._num = torch.zeros(self._shape_at(0), dtype=torch.float64, device=device)
        self.total = 0.0
        # D_0, the weight of the clients of rank >= 1, summed in arrival order like ``total`` (so with real
        # clients it is the very same float, whatever order the per-rank totals below would add up in)
        self._covering = 0.0
        self.count = 0
        self._rank_weight: dict[int, float] = {}  # client rank -> sum of the weights of clients of that rank

    @property
    def device(self) -> torch.device:
        return self._num.device

    def _shape_at(self, k: int) -> list[int]:
        shape = list(self.shape)
        shape[self.dim] = k
        return shape

    def check(self, x: Tensor) -> int:
        """The rank of factor ``x`` after checking its shape against the global factor's; a clear error otherwise."""
        shape = tuple(x.shape)
        if len(shape) != len(self.shape):
            raise ValueError(f"factor has {len(shape)} axes, expected {len(self.shape)}")
        k = shape[self.dim]
        if k > self.rank:
            raise ValueError(f"factor of rank {k} exceeds global rank {self.rank}")
        if shape[: self.dim] != self.shape[: self.dim] or shape[self.dim + 1 :] != self.shape[self.dim + 1 :]:
            raise ValueError(f"factor has shape {shape}, expected {self.shape} up to the rank axis {self.dim}")
        return k

    def reserve(self, k: int) -> None:
        """Make the numerator hold at least the first ``k`` dimensions. Growing reallocates it (views of the
        old numerator are then stale) by at least 2x, so ascending ranks cost O(R) copies in all."""
        if k <= self.allocated:
            return
        size = min(self.rank, max(k, 2 * self.allocated))
        grown = torch.zeros(self._shape_at(size), dtype=torch.float64, device=self._num.device)
        grown.narrow(self.dim, 0, self.allocated).copy_(self._num)
        self._num, self.allocated = grown, size

    def prefix(self, k: int) -> Tensor:
        """The numerator's first ``k`` dimensions (a view; call :meth:`reserve` first)."""
        return self._num.narrow(self.dim, 0, k)

    def add(self, x: Tensor, weight: float) -> None:
        """Fold in one client's factor ``x`` (rank = ``x.shape[dim]``) with weight ``weight`` >= 0."""
        w = check_weight(weight)
        k = self.check(x)
        self.reserve(k)
        # x is converted to float64 (a temporary of its size) and added in place: float64 sums
        self.prefix(k).add_(x.to(device=self._num.device), alpha=w)
        self.record(k, w)

    def record(self, k: int, w: float) -> None:
        """Book one client of rank ``k`` and weight ``w`` (its numerator term is added by the caller)."""
        self._rank_weight[k] = self._rank_weight.get(k, 0.0) + w
        self.total += w
        if k > 0:
            self._covering += w
        self.count += 1

    @property
    def num(self) -> Tensor:
        """sum_k p_k * pad(X_k, R): float64, the global factor's shape."""
        if self.allocated == self.rank:
            return self._num
        full = torch.zeros(self.shape, dtype=torch.float64, device=self._num.device)
        full.narrow(self.dim, 0, self.allocated).copy_(self._num)
        return full

    @property
    def compact_num(self) -> Tensor:
        """num's first ``allocated`` dimensions (beyond them every term was zero padding): what
        :func:`mean_from_sums` reads, without building the full tensor."""
        return self._num

    @property
    def den(self) -> Tensor:
        """den_i = sum of the weights of the clients of rank > i (float64, length R)."""
        at_rank = [0.0] * (self.rank + 1)
        for k, w in self._rank_weight.items():
            at_rank[k] += w
        den, running = [0.0] * self.rank, 0.0
        for i in range(self.rank, 0, -1):  # den_{i-1} = sum of the weights of ranks >= i
            running += at_rank[i]
            den[i - 1] = running
        if den:
            den[0] = self._covering  # D_0 in arrival order: the padded rule's divisor is the float ``total`` is
        return torch.tensor(den, dtype=torch.float64, device=self._num.device)

    def _check_previous(self, previous: Tensor) -> None:
        if tuple(previous.shape) != self.shape:
            raise ValueError(f"previous global factor has shape {tuple(previous.shape)}, sums have {self.shape}")

    def segment_mean(self, previous: Tensor) -> Tensor:
        """num_i / den_i per dimension; an uncovered dimension keeps ``previous`` (dtype of ``previous``)."""
        self._check_previous(previous)
        return mean_from_sums(self._num, self.den, previous, self.dim, "segment")

    def padded_mean(self, previous: Tensor) -> Tensor:
        """num / total: zero-padded FedAvg over all clients; ``previous`` unchanged if total weight is 0."""
        self._check_previous(previous)
        return mean_from_sums(self._num, self.den, previous, self.dim, "padded")


def check_weight(weight: float) -> float:
    """``weight`` as a float, or a clear error unless it is finite and >= 0."""
    w = float(weight)
    if not math.isfinite(w) or w < 0:
        raise ValueError(f"weight must be finite and >= 0, got {weight}")
    return w


class FactorSums(Mapping[str, PaddedSums]):
    """One :class:`PaddedSums` per factor of an adapter (name -> sums), fed a whole client at a time.

    ``add({name: X_k}, p_k)`` computes exactly what ``PaddedSums.add`` does for every factor (the
    same float64 ``num += p_k * X_k``, clients folded in arrival order, so the sums are identical),
    but faster, for two reasons measured in bench/aggregation.py:

    * one fused ``torch._foreach_add_`` per block of factors instead of a Python call per tensor
      (hundreds of factors of a few hundred KiB each: the calls cost as much as the adds);
    * a small bounded buffer: up to ``buffer_clients`` updates (at most ``buffer_bytes``) are held
      and then added module-major, each block of sums (``block_bytes``, sized for a core's L2
      cache) taking all buffered clients while it is in cache, instead of streaming the whole
      float64 sums through memory once per client.

    Memory stays flat in the number of clients: the sums plus at most the buffer. The buffered
    tensors are kept by reference until the next flush: do not modify them in place meanwhile.
    Reading any member (``sums[name]``, iteration) flushes first.
    """

    def __init__(
        self,
        shapes: Mapping[str, Sequence[int]],
        dims: Mapping[str, int],
        *,
        device: torch.device | str | None = None,
        buffer_clients: int = 8,
        buffer_bytes: int = 64 * 2**20,
        block_bytes: int = 2**20,
    ):
        if set(shapes) != set(dims):
            raise ValueError("shapes and dims must name the same factors")
        if buffer_clients < 1:
            raise ValueError(f"buffer_clients must be >= 1, got {buffer_clients}")
        self._sums = {name: PaddedSums(shape, dims[name], device=device) for name, shape in shapes.items()}
        self._names = list(self._sums)
        self._prefixes: dict[str, dict[int, Tensor]] = {name: {} for name in self._sums}  # rank -> numerator prefix
        self.buffer_clients = int(buffer_clients)
        self.buffer_bytes = int(buffer_bytes)
        self._pending: list[tuple[list[Tensor], list[Tensor], float]] = []
        self._pending_bytes = 0
        # Blocks of consecutive factors whose float64 sums together fit in block_bytes (at least one each).
        self._blocks: list[tuple[int, int]] = []
        lo, size = 0, 0
        for i, name in enumerate(self._names):
            nbytes = math.prod(self._sums[name].shape) * 8  # the float64 sums once fully allocated
            if i > lo and size + nbytes > block_bytes:
                self._blocks.append((lo, i))
                lo, size = i, 0
            size += nbytes
        if self._names:
            self._blocks.append((lo, len(self._names)))

    def __getitem__(self, name: str) -> PaddedSums:
        self.flush()
        return self._sums[name]

    def __iter__(self):
        self.flush()
        return iter(self._sums)

    def __len__(self) -> int:
        return len(self._sums)

    def add(self, factors: Mapping[str, Tensor], weight: float) -> None:
        """Fold in one client's factors (name -> tensor; every factor of the adapter) with weight ``weight``."""
        w = check_weight(weight)
        if factors.keys() != self._sums.keys():
            missing = sorted(set(self._sums) - set(factors))
            extra = sorted(set(factors) - set(self._sums))
            raise ValueError(f"client factors do not match the adapter: missing {missing[:3]}, unexpected {extra[:3]}")
        views: list[Tensor] = []
        xs: list[Tensor] = []
        ranks: list[int] = []
        nbytes = 0
        for name in self._names:  # check everything before booking anything: a bad update changes nothing
            acc, x = self._sums[name], factors[name]
            k = acc.check(x)
            if x.device != acc.device:
                x = x.to(acc.device)
            if k > acc.allocated:
                self.flush()  # the buffered clients' views point into the numerator about to be replaced
                acc.reserve(k)
                self._prefixes[name] = {}
            view = self._prefixes[name].get(k)
            if view is None:
                view = self._prefixes[name][k] = acc.prefix(k)
            views.append(view)
            xs.append(x)
            ranks.append(k)
            nbytes += x.nbytes
        for name, k in zip(self._names, ranks):
            self._sums[name].record(k, w)
        self._pending.append((views, xs, w))
        self._pending_bytes += nbytes
        if len(self._pending) >= self.buffer_clients or self._pending_bytes >= self.buffer_bytes:
            self.flush()

    def flush(self) -> None:
        """Add the buffered clients into the sums (module-major, clients in arrival order)."""
        if not self._pending:
            return
        pending, self._pending, self._pending_bytes = self._pending, [], 0
        for lo, hi in self._blocks:
            for views, xs, w in pending:
                torch._foreach_add_(views[lo:hi], xs[lo:hi], alpha=w)


def _fits(num: Tensor, previous: Tensor, dim: int) -> bool:
    """``num`` has ``previous``'s shape, except that it may stop early on the rank axis ``dim``."""
    return (
        num.dim() == previous.dim()
        and num.shape[dim] <= previous.shape[dim]
        and all(n == p for j, (n, p) in enumerate(zip(num.shape, previous.shape)) if j != dim)
    )


def mean_from_sums(num: Tensor, den: Tensor, previous: Tensor, dim: int, rule: SumRule = "segment") -> Tensor:
    """One factor's new value from its two sums by the sum rule ``rule``: the one place a round's mean is taken.

    ``segment``: N_i / D_i where D_i > 0, else ``previous``_i (a dimension no client covered this round keeps
    its previous global value); ``padded``: N / D_0 (every client covers dimension 0, so D_0 = sum_k w_k),
    ``previous`` if D_0 = 0.

    ``dim`` is the rank axis; ``num`` may stop early on it (:attr:`PaddedSums.compact_num`): the dimensions it
    lacks are zero. The result has ``previous``'s dtype and is divided straight into it.
    """
    if not _fits(num, previous, dim):
        raise ValueError(f"previous global factor has shape {tuple(previous.shape)}, sums have {tuple(num.shape)}")
    if rule == "padded":
        total = float(den[0]) if den.numel() else 0.0
        if not total > 0:
            return previous.clone()
        held = num.shape[dim]
        out = torch.empty_like(previous)
        torch.div(num, total, out=out.narrow(dim, 0, held))
        out.narrow(dim, held, previous.shape[dim] - held).zero_()
        return out
    if rule != "segment":
        raise ValueError(f"unknown sum rule {rule!r} (expected segment or padded)")
    covered = den > 0
    c = int(covered.sum())
    if bool(covered[:c].all()) and c <= num.shape[dim]:
        # The usual case (D_i is non-increasing in i for sums of real clients): a covered prefix.
        return _divide_covered_prefix(num, den, previous, dim, c)
    if num.shape[dim] < previous.shape[dim]:  # spell out the zeros the compact numerator leaves implicit
        full = num.new_zeros(previous.shape)
        full.narrow(dim, 0, num.shape[dim]).copy_(num)
        num = full
    shape = [1] * num.dim()
    shape[dim] = num.shape[dim]
    d, covered = den.view(shape), covered.view(shape)
    mean = num / torch.where(covered, d, torch.ones_like(d))
    return torch.where(covered, mean, previous.to(torch.float64)).to(previous.dtype)


def finish_from_sums(
    rule: SumRule, previous: Mapping[str, Tensor], num: Mapping[str, Tensor], den: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """The new global tensors (name -> tensor, for every name of ``previous``: the global LoRA factors
    ``<module>.lora_A`` / ``.lora_B``) from their sums (plain, noised or securely aggregated), each by
    :func:`mean_from_sums`. ``num[name]`` may stop early on the rank axis; ``den[name]`` has length R."""
    out: dict[str, Tensor] = {}
    for name, prev in previous.items():
        if name not in num or name not in den:
            raise ValueError(f"sums lack global tensor {name!r}")
        n, d = num[name].to(torch.float64), den[name].to(torch.float64)
        dim = rank_dim(name.rpartition(".")[2])
        if not _fits(n, prev, dim) or d.shape != (prev.shape[dim],):
            raise ValueError(
                f"sums of {name!r} have shapes {tuple(n.shape)}, {tuple(d.shape)}; the global tensor "
                f"has {tuple(prev.shape)}"
            )
        out[name] = mean_from_sums(n, d, prev, dim, rule)
    return out


def _divide_covered_prefix(num: Tensor, den: Tensor, previous: Tensor, dim: int, c: int) -> Tensor:
    """N_i / D_i for i < c (``num`` holds at least c dimensions), ``previous`` beyond: divided straight
    into the result's dtype, so no full-size float64 temporaries."""
    shape = [1] * previous.dim()
    shape[dim] = c
    out = torch.empty_like(previous)
    torch.div(num.narrow(dim, 0, c), den[:c].view(shape), out=out.narrow(dim, 0, c))
    rest = previous.shape[dim] - c
    out.narrow(dim, c, rest).copy_(previous.narrow(dim, c, rest))
    return out
