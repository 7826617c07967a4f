"""Streaming padded sums: the segment-wise mean from the two sums and the streaming forms, against
independent test oracles (a per-dimension mean, a direct segment-by-segment mean)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from prelort.factor_sums import FactorSums, PaddedSums, mean_from_sums
from prelort.rank_geometry import rank_dim, segments

FAST = settings(max_examples=40, deadline=None)


def _rand(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# -- test oracles: the two sums and the segment-wise mean computed directly, not streamed -------------------


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


def segment_weighted_mean(factors: Sequence[Tensor], weights: Sequence[float], previous: Tensor, dim: int) -> Tensor:
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


# -- segment-wise weighted mean -----------------------------------------------------------------------


def naive_per_dimension_mean(factors, weights, previous, dim):
    """Independent reference: dimension i = weighted mean over clients with r_k > i, else previous."""
    out = previous.clone().to(torch.float64)
    for i in range(previous.shape[dim]):
        num, den = 0.0, 0.0
        for x, p in zip(factors, weights):
            if x.shape[dim] > i:
                num = num + p * x.select(dim, i).to(torch.float64)
                den += p
        if den > 0:
            out.select(dim, i).copy_(num / den)
    return out


clients_st = st.lists(st.tuples(st.integers(1, 6), st.integers(0, 20)), min_size=1, max_size=5)


@FAST
@given(
    clients=clients_st,
    R_extra=st.integers(0, 2),
    other=st.integers(1, 4),
    kind=st.sampled_from(["lora_A", "lora_B"]),
    seed=st.integers(0, 10_000),
)
def test_segment_mean_matches_naive_two_sums_and_streaming(clients, R_extra, other, kind, seed):
    dim = rank_dim(kind)
    R = max(r for r, _ in clients) + R_extra
    shape = lambda r: (r, other) if dim == 0 else (other, r)  # noqa: E731
    factors = [_rand(seed + k, *shape(r)) for k, (r, _) in enumerate(clients)]
    weights = [float(p) for _, p in clients]
    previous = _rand(seed + 99, *shape(R))

    expected = naive_per_dimension_mean(factors, weights, previous, dim)
    direct = segment_weighted_mean(factors, weights, previous, dim)
    two_sums = mean_from_sums(*padded_weighted_sums(factors, weights, R, dim), previous, dim)
    stream = PaddedSums(previous.shape, dim)
    for x, p in zip(factors, weights):
        stream.add(x, p)
    streamed = stream.segment_mean(previous)

    torch.testing.assert_close(direct, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(two_sums, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(streamed, expected, rtol=1e-12, atol=1e-12)


@FAST
@given(n=st.integers(1, 5), r=st.integers(1, 4), seed=st.integers(0, 10_000))
def test_equal_ranks_is_fedavg(n, r, seed):
    factors = [_rand(seed + k, r, 3) for k in range(n)]
    weights = [float(k + 1) for k in range(n)]
    fedavg = sum(p * x for p, x in zip(weights, factors)) / sum(weights)
    out = segment_weighted_mean(factors, weights, torch.zeros(r, 3, dtype=torch.float64), 0)
    torch.testing.assert_close(out, fedavg, rtol=1e-12, atol=1e-12)


def test_worked_example_and_uncovered_segment_keeps_previous():
    # ranks 1 and 2 (weights 1 and 3) into a rank-4 global A
    a1 = torch.full((1, 2), 4.0, dtype=torch.float64)
    a2 = torch.full((2, 2), 8.0, dtype=torch.float64)
    previous = torch.full((4, 2), -1.0, dtype=torch.float64)
    out = segment_weighted_mean([a1, a2], [1.0, 3.0], previous, 0)
    assert out[0].tolist() == [7.0, 7.0]  # (1*4 + 3*8) / 4
    assert out[1].tolist() == [8.0, 8.0]  # only the rank-2 client covers it: NOT diluted
    assert out[2:].tolist() == [[-1.0, -1.0]] * 2  # no contributor: previous value
    # zero-padding would have diluted dimension 1 to 3*8/4 = 6
    sums = PaddedSums((4, 2), 0)
    sums.add(a1, 1.0)
    sums.add(a2, 3.0)
    assert sums.padded_mean(previous)[1].tolist() == [6.0, 6.0]
    assert sums.den.tolist() == [4.0, 3.0, 0.0, 0.0] and sums.total == 4.0 and sums.count == 2


def test_padded_sums_reject_bad_input():
    sums = PaddedSums((3, 2), 0)
    with pytest.raises(ValueError, match="exceeds global rank 3"):
        sums.add(torch.zeros(4, 2), 1.0)
    with pytest.raises(ValueError, match="weight"):
        sums.add(torch.zeros(2, 2), -1.0)
    with pytest.raises(ValueError, match="weight"):
        sums.add(torch.zeros(2, 2), float("nan"))
    with pytest.raises(ValueError, match="expected"):
        sums.add(torch.zeros(2, 5), 1.0)
    with pytest.raises(ValueError, match="shape"):
        sums.segment_mean(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="shape"):
        sums.padded_mean(torch.zeros(2, 2))


def test_padded_mean_without_weight_keeps_previous_and_result_dtype_follows_previous():
    previous = torch.ones(2, 3)
    sums = PaddedSums((2, 3), 0)
    sums.add(torch.full((1, 3), 5.0), 0.0)
    assert torch.equal(sums.padded_mean(previous), previous)
    sums.add(torch.full((2, 3), 2.0), 1.0)
    out = sums.segment_mean(previous)
    assert out.dtype == torch.float32 and out.tolist() == [[2.0] * 3] * 2


# -- FactorSums: the whole-client, buffered form used by the methods ------------------------------------------


def _adapter_shapes(R: int) -> tuple[dict[str, tuple[int, int]], dict[str, int]]:
    shapes = {"q.lora_A": (R, 5), "q.lora_B": (7, R), "v.lora_A": (R, 3), "v.lora_B": (4, R)}
    return shapes, {name: rank_dim(name.rpartition(".")[2]) for name in shapes}


def _client(
    seed: int, rank: int, shapes: dict[str, tuple[int, int]], dims: dict[str, int], dtype=torch.float32
) -> dict[str, torch.Tensor]:
    out = {}
    for i, (name, shape) in enumerate(shapes.items()):
        s = list(shape)
        s[dims[name]] = rank
        out[name] = _rand(seed * 10 + i, *s).to(dtype)
    return out


@pytest.mark.parametrize("buffer_clients,block_bytes", [(1, 2**20), (3, 1), (8, 2**20), (100, 64)])
def test_factor_sums_equal_per_tensor_padded_sums_bit_for_bit(buffer_clients, block_bytes):
    # float32 updates into float64 sums, as on a server: buffering and blocking change the order of the
    # operations across tensors only, never the order of the clients within an entry, so the sums are identical.
    R = 6
    shapes, dims = _adapter_shapes(R)
    clients = [
        (_client(k, r, shapes, dims), float(w))
        for k, (r, w) in enumerate([(2, 3), (6, 1), (1, 7), (4, 2), (6, 5), (2, 0), (3, 11)])
    ]
    fused = FactorSums(shapes, dims, buffer_clients=buffer_clients, block_bytes=block_bytes)
    plain = {name: PaddedSums(shape, dims[name]) for name, shape in shapes.items()}
    for factors, w in clients:
        fused.add(factors, w)
        for name, x in factors.items():
            plain[name].add(x, w)
    assert set(fused) == set(shapes) and len(fused) == 4
    for name in shapes:
        assert torch.equal(fused[name].num, plain[name].num), name
        assert torch.equal(fused[name].den, plain[name].den), name
        assert fused[name].total == plain[name].total == 29.0 and fused[name].count == 7
    assert fused["q.lora_A"].den.tolist() == [29.0, 22.0, 19.0, 8.0, 6.0, 6.0]  # weight of clients of rank > i


def test_factor_sums_reading_flushes_the_buffer():
    shapes, dims = _adapter_shapes(4)
    sums = FactorSums(shapes, dims, buffer_clients=100)
    factors = _client(0, 2, shapes, dims)
    sums.add(factors, 2.0)
    expected = torch.zeros(4, 5, dtype=torch.float64)
    expected[:2] = 2.0 * factors["q.lora_A"].double()
    assert torch.equal(sums["q.lora_A"].num, expected)


def test_factor_sums_reject_bad_client_without_changing_the_sums():
    shapes, dims = _adapter_shapes(4)
    sums = FactorSums(shapes, dims, buffer_clients=1)
    good = _client(0, 2, shapes, dims)
    sums.add(good, 1.0)
    before = {name: (sums[name].num.clone(), sums[name].den.clone()) for name in shapes}
    missing = {k: v for k, v in good.items() if k != "v.lora_B"}
    with pytest.raises(ValueError, match=r"missing \['v.lora_B'\]"):
        sums.add(missing, 1.0)
    with pytest.raises(ValueError, match=r"unexpected \['k.lora_A'\]"):
        sums.add({**good, "k.lora_A": torch.zeros(2, 5)}, 1.0)
    wrong = dict(good, **{"v.lora_B": torch.zeros(5, 2)})  # last factor checked: the earlier ones must not count
    with pytest.raises(ValueError, match=r"factor has shape \(5, 2\), expected \(4, 4\)"):
        sums.add(wrong, 1.0)
    with pytest.raises(ValueError, match="exceeds global rank 4"):
        sums.add(_client(1, 5, shapes, dims), 1.0)
    with pytest.raises(ValueError, match="weight must be finite"):
        sums.add(good, float("nan"))
    for name in shapes:
        assert torch.equal(sums[name].num, before[name][0]) and torch.equal(sums[name].den, before[name][1])
        assert sums[name].count == 1


@pytest.mark.parametrize("den", [[4.0, 2.0, 0.0], [4.0, 0.0, 1.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
@pytest.mark.parametrize("dim", [0, 1])
def test_mean_from_sums_divides_covered_dims_and_keeps_the_rest(den, dim):
    # Sums from clients always cover a prefix; sums that went through SecAgg or DP may not: both paths agree
    # with the per-dimension definition, and the result has the previous tensor's dtype.
    shape = (3, 2) if dim == 0 else (2, 3)
    num = _rand(1, *shape)
    previous = _rand(2, *shape).to(torch.float32)
    d = torch.tensor(den, dtype=torch.float64)
    out = mean_from_sums(num, d, previous, dim)
    assert out.dtype == torch.float32
    for i, di in enumerate(den):
        got = out.select(dim, i)
        want = (num.select(dim, i) / di).float() if di > 0 else previous.select(dim, i)
        assert torch.equal(got, want), (i, got, want)


def test_padded_sums_allocate_only_up_to_the_largest_rank_seen():
    # A round whose clients all have small ranks never allocates the global rank's float64 sums.
    sums = PaddedSums((64, 3), 0)
    sums.add(torch.ones(2, 3), 1.0)
    sums.add(torch.ones(4, 3), 1.0)
    assert sums.allocated == 4 and sums.num.shape == (64, 3)
    assert sums.num[:4, 0].tolist() == [2.0, 2.0, 1.0, 1.0] and not sums.num[4:].any()
    previous = torch.full((64, 3), -1.0)
    assert sums.segment_mean(previous)[:, 0].tolist() == [1.0] * 4 + [-1.0] * 60
    assert sums.padded_mean(previous)[:, 0].tolist() == [1.0, 1.0, 0.5, 0.5] + [0.0] * 60
    sums.add(torch.ones(5, 3), 1.0)  # grows at least 2x: ascending ranks cost O(R) copies in all
    assert sums.allocated == 8 and sums.num[:5, 0].tolist() == [3.0, 3.0, 2.0, 2.0, 1.0]
