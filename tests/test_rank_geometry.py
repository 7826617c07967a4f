"""Rank geometry: segments, truncation sets, rank axes and factor shapes, masks, truncation = rank-t adapter."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prelort.rank_geometry import (
    adapter_prefix,
    adapter_rank,
    factor_rank,
    factor_shape,
    nested_truncations,
    pad,
    rank_dim,
    rank_mask,
    segments,
    truncate,
)

FAST = settings(max_examples=40, deadline=None)


def _rand(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# -- segments and truncation sets ------------------------------------------------------------------


def test_segments_cut_at_distinct_sorted_ranks():
    assert segments([4, 2, 8, 2]) == [(0, 2), (2, 4), (4, 8)]
    assert segments([3]) == [(0, 3)]


def test_nested_truncations_are_boundaries_up_to_own_rank():
    assert nested_truncations(4, [1, 2, 4, 8]) == [1, 2, 4]
    assert nested_truncations(8, [1, 2, 4, 8]) == [1, 2, 4, 8]
    assert nested_truncations(1, [1, 2, 4, 8]) == [1]
    # a rank that is not a boundary is still included itself
    assert nested_truncations(3, [2, 4]) == [2, 3]


@pytest.mark.parametrize("bad", [[], [0, 2], [-1]])
def test_segments_reject_bad_ranks(bad):
    with pytest.raises(ValueError):
        segments(bad)


def test_rank_dim_names_the_rank_axis():
    assert rank_dim("lora_A") == 0 and rank_dim("lora_B") == 1
    with pytest.raises(ValueError, match="unknown LoRA factor kind"):
        rank_dim("delta")


def test_truncate_is_a_view_and_pad_adds_zeros():
    a = _rand(0, 4, 3)
    t = truncate(a, 2, 0)
    assert t.data_ptr() == a.data_ptr()  # no copy
    assert torch.equal(t, a[:2])
    b = _rand(1, 3, 2)
    p = pad(b, 5, 1)
    assert p.shape == (3, 5) and torch.equal(p[:, :2], b) and not p[:, 2:].any()
    with pytest.raises(ValueError):
        pad(b, 1, 1)
    with pytest.raises(ValueError):
        truncate(a, 5, 0)


# -- truncation computes the rank-t function ------------------------------------------------------


@FAST
@given(
    d_in=st.integers(1, 5),
    d_out=st.integers(1, 5),
    R=st.integers(1, 6),
    data=st.data(),
    seed=st.integers(0, 10_000),
)
def test_truncation_is_the_rank_t_adapter_with_the_same_prefix(d_in, d_out, R, data, seed):
    t = data.draw(st.integers(0, R))
    alpha = 7.0
    s = alpha / R  # ONE scale for every rank, never alpha / t
    A = _rand(seed, R, d_in)
    B = _rand(seed + 1, d_out, R)
    x = _rand(seed + 2, 3, d_in)

    # a rank-t client's own adapter: independent copies of the prefix, same constant scale
    A_t, B_t = A[:t].clone(), B[:, :t].clone()
    y_client = s * (x @ A_t.T) @ B_t.T

    y_truncate = s * (x @ truncate(A, t, rank_dim("lora_A")).T) @ truncate(B, t, rank_dim("lora_B")).T
    y_mask = s * ((x @ A.T) * rank_mask(t, R, dtype=torch.float64)) @ B.T
    torch.testing.assert_close(y_truncate, y_client, rtol=0, atol=1e-12)
    torch.testing.assert_close(y_mask, y_client, rtol=0, atol=1e-12)

    dW = lambda k: s * B[:, :k] @ A[:k]  # noqa: E731
    tail = s * B[:, t:] @ A[t:]
    torch.testing.assert_close(dW(R), dW(t) + tail, rtol=0, atol=1e-12)
    torch.testing.assert_close(dW(t), s * B_t @ A_t, rtol=0, atol=1e-12)


def test_mask_blocks_gradients_beyond_the_truncation():
    R, t = 5, 2
    A = _rand(0, R, 3).requires_grad_()
    B = _rand(1, 4, R).requires_grad_()
    x = _rand(2, 6, 3)
    y = ((x @ A.T) * rank_mask(t, R, dtype=torch.float64)) @ B.T
    y.square().sum().backward()
    assert not A.grad[t:].any() and not B.grad[:, t:].any()
    assert A.grad[:t].abs().sum() > 0 and B.grad[:, :t].abs().sum() > 0


def test_rank_mask_values_and_bounds():
    assert rank_mask(2, 4).tolist() == [1, 1, 0, 0]
    assert rank_mask(0, 3).tolist() == [0, 0, 0]
    with pytest.raises(ValueError):
        rank_mask(5, 4)


def test_factor_shapes_and_ranks_of_a_layer():
    # a (d_out=7) x (d_in=5) layer at rank 3
    assert factor_shape("lora_A", 3, 7, 5) == (3, 5)
    assert factor_shape("lora_B", 3, 7, 5) == (7, 3)
    assert factor_rank("lora_A", torch.zeros(3, 5), 7, 5) == 3
    assert factor_rank("lora_B", torch.zeros(7, 2), 7, 5) == 2
    assert factor_rank("lora_A", torch.zeros(3, 7), 7, 5) is None  # other axis is not d_in
    assert factor_rank("lora_B", torch.zeros(5, 3), 7, 5) is None  # other axis is not d_out
    assert factor_rank("lora_A", torch.zeros(3, 5, 1), 7, 5) is None  # not a matrix
    with pytest.raises(ValueError, match="unknown LoRA factor kind 'delta'"):
        factor_shape("delta", 3, 7, 5)


def test_adapter_rank_and_prefix():
    adapter = {"q.lora_A": _rand(0, 4, 5), "q.lora_B": _rand(1, 7, 4)}
    assert adapter_rank(adapter) == 4
    prefix = adapter_prefix(adapter, 2)
    assert adapter_rank(prefix) == 2 and prefix["q.lora_B"].shape == (7, 2)
    assert torch.equal(prefix["q.lora_A"], adapter["q.lora_A"][:2])
    assert torch.equal(prefix["q.lora_B"], adapter["q.lora_B"][:, :2])
    assert prefix["q.lora_A"].data_ptr() == adapter["q.lora_A"].data_ptr()  # views, no copy
