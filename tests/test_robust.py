"""prelort.robust: the robust statistics over a round's clients (issue 26), as pure functions on tensors."""

from __future__ import annotations

import math

import pytest
import torch

from prelort.robust import (
    cap_at_median,
    coordinatewise,
    lower_median,
    median_clip_scales,
    scale_segments,
    segment_change_norms,
    segment_medians,
    trim_count,
)

BOUNDS = [(0, 1), (1, 2), (2, 4)]


def _change(rank: int, value: float) -> dict[str, torch.Tensor]:
    return {"m.lora_A": torch.full((rank, 3), value), "m.lora_B": torch.full((2, rank), value)}


def test_lower_median_takes_the_smaller_middle_value():
    assert lower_median([5.0, 1.0, 3.0]) == 3.0
    assert lower_median([1.0, 1000.0]) == 1.0  # with two clients, the smaller one sets the bound
    with pytest.raises(ValueError):
        lower_median([])


def test_segment_norms_cover_only_the_dimensions_a_client_has():
    norms = segment_change_norms(_change(2, 1.0), BOUNDS)
    assert norms[0] == pytest.approx(math.sqrt(5)) and norms[1] == pytest.approx(math.sqrt(5))
    assert norms[2] is None  # a rank-2 client does not cover [2, 4)
    assert segment_change_norms(_change(3, 1.0), BOUNDS)[2] == pytest.approx(math.sqrt(5))  # a partial cover


def test_a_scaled_change_is_clipped_to_k_times_the_median_and_honest_ones_are_not():
    honest = [segment_change_norms(_change(4, 0.01 * (1 + i / 10)), BOUNDS) for i in range(3)]
    hostile = segment_change_norms(_change(4, 10.0), BOUNDS)
    norms = [*honest, hostile]
    medians = segment_medians(norms)
    scales = median_clip_scales(norms, medians, 4.0)
    assert all(s == 1.0 for row in scales[:3] for s in row)
    clipped = scale_segments(_change(4, 10.0), scales[3], BOUNDS)
    after = segment_change_norms(clipped, BOUNDS)
    assert after == pytest.approx([4.0 * m for m in medians])
    # a client that covers fewer segments gets scale 1 where it has nothing
    assert median_clip_scales([[1.0, None, None], [100.0, 2.0, 3.0]], [1.0, 2.0, 3.0], 2.0)[0] == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError):
        median_clip_scales(norms, medians, 0.5)


def test_a_client_that_did_not_change_a_segment_does_not_set_its_bound():
    """Two clients cover the top segment; one never reached it this round (PreLort's nested: sample): the other,
    honest, is not clipped to 0 (the bench's honest prelort run was, before)."""
    norms = [[0.5, 0.0], [0.6, 0.3]]
    medians = segment_medians(norms)
    assert medians == [0.5, 0.3]
    assert median_clip_scales(norms, medians, 4.0) == [[1.0, 1.0], [1.0, 1.0]]
    assert segment_medians([[0.0], [None]]) == [None]


def test_cap_at_median_bounds_a_claimed_weight():
    assert cap_at_median([100, 120, 90, 10**9], 4.0) == [100, 120, 90, 400]
    assert cap_at_median([364, 121, 129, 449], 4.0) == [364, 121, 129, 449]  # a real non-IID round is untouched
    assert cap_at_median([], 4.0) == []


def test_trim_count_keeps_at_least_the_middle():
    assert [trim_count(n, 0.2) for n in (1, 2, 3, 4, 8, 10)] == [0, 0, 1, 1, 2, 2]
    assert trim_count(8, 0.1) == 1
    with pytest.raises(ValueError):
        trim_count(4, 0.5)


def test_coordinatewise_statistics_ignore_one_outlier():
    stack = torch.tensor([[1.0, 2.0], [1.2, 2.2], [0.8, 1.8], [1e6, -1e6]])
    assert torch.allclose(coordinatewise(stack, "mean"), stack.mean(0))
    assert torch.allclose(coordinatewise(stack, "median"), torch.tensor([1.1, 1.9]))
    assert torch.allclose(coordinatewise(stack, "trimmed_mean", 0.2), torch.tensor([1.1, 1.9]))
    assert torch.equal(coordinatewise(stack[:1], "median"), stack[0])
    with pytest.raises(ValueError, match="unknown aggregator"):
        coordinatewise(stack, "mode")  # type: ignore[arg-type]


def test_a_change_bound_below_an_honest_rounds_reach_is_warned_about():
    from prelort.config import from_dict
    from prelort.runner import change_bound_warning

    assert change_bound_warning(from_dict({"train": {"lr": 1e-3, "local_steps": 10}})) is None
    assert change_bound_warning(from_dict({"train": {"lr": 0.1}, "validation": {"max_change_entry": None}})) is None
    text = change_bound_warning(from_dict({"train": {"lr": 0.02, "local_steps": 10}}))
    assert text.startswith("validation.max_change_entry (0.5) is below what an honest client can move")
    assert "= 0.64" in text
    # under lr_rank_scaling the smallest rank's lr is the largest
    scaled = {"lr": 0.01, "local_steps": 10, "lr_rank_scaling": "sqrt", "lr_reference_rank": 4}
    assert "lr 0.02 x 10" in change_bound_warning(from_dict({"train": scaled, "clients": {"ranks": [1, 4]}}))
