"""Robust aggregation per segment (robust.aggregator, issue 26 item 3) through the method interface: every method
with a sum rule has ``aggregate_robust`` (toolkit.coordinatewise_factors), any other refuses it."""

from __future__ import annotations

import pytest
import torch

from prelort.methods import ClientUpdate, FederationSpec, available, build, key

MODULES = {"q": (6, 5), "v": (4, 5)}
RANKS = (2, 4, 4, 4, 4)
SPEC = FederationSpec(modules=MODULES, client_ranks=RANKS, alpha=8.0)


def _updates(method, state, hostile: float | None = None) -> list[ClientUpdate]:
    """Every client's prefix plus a small random change; client 4 (rank 4) sends ``hostile`` in every entry."""
    out = []
    for client in range(len(RANKS)):
        rank = method.client_rank(client, state)
        gen = torch.Generator().manual_seed(client)
        ref = method.broadcast(state, rank, gen).adapter
        tensors = {n: (t + 0.01 * torch.randn(t.shape, generator=gen)).contiguous() for n, t in ref.items()}
        if hostile is not None and client == 4:
            tensors = {n: torch.full_like(t, hostile) for n, t in tensors.items()}
        out.append(ClientUpdate(client, rank, 10, tensors, 1, method.name, {}))
    return out


def _honest_range(method, state, honest, name) -> tuple[torch.Tensor, torch.Tensor]:
    """Per entry of global tensor ``name``, the smallest and largest value the honest clients give it under the
    method's rule: zero-padded to R (padded rule), or over the clients that cover it (segment rule; an entry no
    client covers keeps its value)."""
    prev = state.tensors[name]
    dim = 0 if name.endswith("lora_A") else 1
    low, high = torch.full_like(prev, float("inf")), torch.full_like(prev, -float("inf"))
    for u in honest:
        x = u.tensors[name]
        padded = torch.zeros_like(prev) if method.sum_rule == "padded" else prev.clone()
        covered = torch.zeros_like(prev, dtype=torch.bool)
        padded.narrow(dim, 0, x.shape[dim]).copy_(x)
        covered.narrow(dim, 0, x.shape[dim]).fill_(True)
        if method.sum_rule == "padded":
            covered.fill_(True)
        low = torch.where(covered, torch.minimum(low, padded), low)
        high = torch.where(covered, torch.maximum(high, padded), high)
    untouched = torch.isinf(low)
    return torch.where(untouched, prev, low), torch.where(untouched, prev, high)


SUM_RULE_METHODS = sorted(n for n, c in available().items() if c.sum_aggregatable)


@pytest.mark.parametrize("name", SUM_RULE_METHODS)
def test_the_median_ignores_one_hostile_client_where_the_mean_follows_it(name):
    method = build(name, SPEC)
    state = method.init_state(torch.Generator().manual_seed(0))
    honest = _updates(method, state)
    attacked = _updates(method, state, hostile=1e3)
    for aggregator in ("median", "trimmed_mean"):
        robust = method.aggregate_robust(state, attacked, aggregator, 0.2)
        for n, t in robust.tensors.items():
            low, high = _honest_range(method, state, honest[:4], n)
            assert bool(((t >= low - 1e-6) & (t <= high + 1e-6)).all()), (aggregator, n)  # the 1e3 never enters
    mean = method.aggregate(state, attacked)
    assert max(float(t.abs().max()) for t in mean.tensors.values()) > 10.0


def test_the_segment_rule_takes_each_segment_over_the_clients_that_cover_it():
    """Dimensions 0-1 are covered by all five clients, 2-3 by four (client 0 has rank 2); a dimension no
    client covers keeps its value."""
    method = build("prelort", SPEC)
    state = method.init_state(torch.Generator().manual_seed(0))
    updates = _updates(method, state)
    out = method.aggregate_robust(state, updates, "median", 0.2)
    a = key("q", "lora_A")
    expected_low = torch.stack([u.tensors[a][:2] for u in updates]).median(dim=0).values
    expected_high = torch.stack([u.tensors[a][2:4] for u in updates[1:]]).quantile(0.5, dim=0)
    assert torch.allclose(out.tensors[a][:2], expected_low)
    assert torch.allclose(out.tensors[a][2:4], expected_high)
    only_low = method.aggregate_robust(state, updates[:1], "median", 0.2)
    assert torch.equal(only_low.tensors[a][2:], state.tensors[a][2:])


@pytest.mark.parametrize("name", sorted(n for n, c in available().items() if not c.sum_aggregatable))
def test_a_method_without_a_sum_rule_refuses_a_robust_aggregator(name):
    method = build(name, SPEC)
    state = method.init_state(torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="no sum rule"):
        method.aggregate_robust(state, [], "median", 0.2)
