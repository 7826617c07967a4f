"""Rank geometry of prefix-nested LoRA: which axis is the rank, segments, truncations, masks, prefixes.

Pure functions on shapes and tensors (docs/design.md section 1-2). A LoRA factor pair of rank r is
A (r x d_in) and B (d_out x r); rank dimension i is (row i of A, column i of B).
The adapter at rank t is the prefix of the first t dimensions, with ONE scale
s = alpha / R for the whole federation:

    dW_t = s * B[:, :t] @ A[:t, :]

so dW_R = dW_t + s * B[:, t:] @ A[t:, :] exactly, and truncating the global
adapter gives the function a rank-t client trains.

The one place that says which axis of a factor is the rank (:func:`rank_dim`), which shape a factor has
at a rank (:func:`factor_shape`, :func:`factor_rank`), the rank of an adapter (:func:`adapter_rank`) and
its prefix (:func:`adapter_prefix`). The sums the server aggregates with live in
:mod:`prelort.factor_sums`. Nothing here knows about models, files or engines.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

__all__ = [
    "segments",
    "nested_truncations",
    "rank_mask",
    "truncate",
    "pad",
    "rank_dim",
    "factor_shape",
    "factor_rank",
    "adapter_rank",
    "adapter_prefix",
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


def factor_shape(kind: str, rank: int, d_out: int, d_in: int) -> tuple[int, int]:
    """The shape of a factor of a (d_out x d_in) layer at ``rank``: lora_A (rank, d_in), lora_B (d_out, rank)."""
    return (rank, d_in) if rank_dim(kind) == 0 else (d_out, rank)


def factor_rank(kind: str, x: Tensor, d_out: int, d_in: int) -> int | None:
    """The rank of factor ``x`` of a (d_out x d_in) layer: its size along the rank axis, or None unless
    ``x`` is a matrix whose other axis fits the layer (d_in columns of lora_A, d_out rows of lora_B)."""
    dim = rank_dim(kind)
    if x.ndim != 2 or x.shape[1 - dim] != (d_in if dim == 0 else d_out):
        return None
    return int(x.shape[dim])


def adapter_rank(adapter: Mapping[str, Tensor]) -> int:
    """The rank of an adapter (``<module>.lora_A`` / ``.lora_B`` tensors): the rows of its first lora_A."""
    a = next(v for k, v in adapter.items() if k.endswith(".lora_A"))
    return int(a.shape[0])


def adapter_prefix(adapter: Mapping[str, Tensor], rank: int) -> dict[str, Tensor]:
    """The first ``rank`` dimensions of an adapter: A[:rank], B[:, :rank] (views, no copy)."""
    return {k: v[:rank] if k.endswith("lora_A") else v[:, :rank] for k, v in adapter.items()}
