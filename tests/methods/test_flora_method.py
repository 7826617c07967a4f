"""FLoRA: stacking equals the weighted sum of products; merged deltas accumulate; fresh LoRA every round."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prelort.methods import key, lora_init
from prelort.methods.flora import FLoRA, stack_factors


@settings(max_examples=30, deadline=None)
@given(
    clients=st.lists(st.tuples(st.integers(1, 4), st.integers(1, 50)), min_size=1, max_size=5),
    seed=st.integers(0, 1000),
)
def test_stacked_product_is_weighted_sum_of_products(clients, seed):
    g = torch.Generator().manual_seed(seed)
    factors = [(torch.randn(r, 6, generator=g), torch.randn(5, r, generator=g)) for r, _ in clients]
    weights = [float(n) for _, n in clients]
    a_stack, b_stack = stack_factors(factors, weights)
    total_rank = sum(r for r, _ in clients)
    assert a_stack.shape == (total_rank, 6) and b_stack.shape == (5, total_rank)
    p = [w / sum(weights) for w in weights]
    expected = sum(pk * (b.double() @ a.double()) for pk, (a, b) in zip(p, factors))
    torch.testing.assert_close(b_stack @ a_stack, expected, rtol=0, atol=1e-6)
    # same client order: the first block of rows/columns is client 0's
    r0 = clients[0][0]
    torch.testing.assert_close(a_stack[:r0], p[0] * factors[0][0].double())
    torch.testing.assert_close(b_stack[:, :r0], factors[0][1].double())


def test_stack_rejects_bad_input():
    a, b = torch.zeros(1, 2), torch.zeros(2, 1)
    with pytest.raises(ValueError, match="no factors"):
        stack_factors([], [])
    with pytest.raises(ValueError, match="1 factor pairs but 2 weights"):
        stack_factors([(a, b)], [1.0, 2.0])
    with pytest.raises(ValueError, match="sum to zero"):
        stack_factors([(a, b)], [0.0])


def test_aggregate_merges_and_accumulates_across_rounds(make_spec, make_update):
    spec = make_spec(ranks=(1, 2, 4), alpha=3.0)
    method = FLoRA(spec)
    s = spec.scale
    state = method.init_state(torch.Generator().manual_seed(0))
    assert all(not t.any() for t in state.tensors.values())
    round1 = [make_update(spec, k, r, num_examples=n, seed=1) for k, (r, n) in enumerate(((1, 2), (2, 6), (4, 2)))]
    round2 = [make_update(spec, k, r, num_examples=n, seed=2) for k, (r, n) in enumerate(((1, 1), (4, 3)))]
    st1 = method.aggregate(state, round1)
    st2 = method.aggregate(st1, round2)

    def contribution(ups, module):
        total = sum(u.num_examples for u in ups)
        return sum(
            u.num_examples
            / total
            * s
            * (u.tensors[key(module, "lora_B")].double() @ u.tensors[key(module, "lora_A")].double())
            for u in ups
        )

    for module in spec.modules:
        name = key(module, "delta")
        torch.testing.assert_close(st1.tensors[name].double(), contribution(round1, module), rtol=0, atol=1e-6)
        torch.testing.assert_close(
            st2.tensors[name].double(), contribution(round1, module) + contribution(round2, module), rtol=0, atol=1e-6
        )


def test_broadcast_is_fresh_lora_plus_merged_delta_for_every_rank(make_spec, make_update):
    spec = make_spec(ranks=(1, 2, 4))
    method = FLoRA(spec)
    state = method.aggregate(method.init_state(torch.Generator().manual_seed(0)), [make_update(spec, 2, 4)])
    for r in (1, 2, 4):
        bc = method.broadcast(state, r, generator=torch.Generator().manual_seed(r))
        expected = lora_init(spec, r, torch.Generator().manual_seed(r))
        for name, t in expected.items():
            assert torch.equal(bc.adapter[name], t)
        for module, (_d_out, d_in) in spec.modules.items():
            assert not bc.adapter[key(module, "lora_B")].any()  # B = 0: the fresh LoRA starts as a no-op
            assert bc.adapter[key(module, "lora_A")].abs().max() <= 1 / math.sqrt(d_in)
        for name, delta in state.tensors.items():
            assert torch.equal(bc.base_delta[name], delta)
        # every tier evaluates the same merged model
        tier = method.tier(state, r)
        assert all(torch.equal(tier.base_delta[n], state.tensors[n]) for n in state.tensors)
        assert all(not t.any() for n, t in tier.adapter.items() if n.endswith("lora_B"))


def test_zero_weight_round_changes_nothing(make_spec, make_update):
    spec = make_spec(ranks=(2, 4))
    method = FLoRA(spec)
    state = method.aggregate(method.init_state(torch.Generator().manual_seed(0)), [make_update(spec, 0, 2)])
    new = method.aggregate(state, [make_update(spec, 1, 4, num_examples=0)])
    for name in state.tensors:
        assert torch.equal(new.tensors[name], state.tensors[name])


def test_export_is_the_best_rank_t_approximation_of_the_merged_delta(make_spec, make_update):
    """A PEFT adapter holds no base-weight delta: FLoRA's rank-t export (its export_adapter) is the rank-t SVD
    truncation of the merged delta, s B A = U_t S_t V_t^T (Eckart-Young), while a LoRA-state method exports what
    a rank-t client receives."""
    spec = make_spec(ranks=(1, 2, 4))
    method = FLoRA(spec)
    state = method.aggregate(
        method.init_state(torch.Generator().manual_seed(0)),
        [make_update(spec, k, r) for k, r in enumerate(spec.client_ranks)],
    )
    for t in (1, 2, 4):
        exported = method.export_adapter(state, t)
        for module, (d_out, d_in) in spec.modules.items():
            a, b = exported[key(module, "lora_A")], exported[key(module, "lora_B")]
            assert a.shape == (t, d_in) and b.shape == (d_out, t)
            u, s, vh = torch.linalg.svd(state.tensors[key(module, "delta")].double(), full_matrices=False)
            best = (u[:, :t] * s[:t]) @ vh[:t]
            torch.testing.assert_close(spec.scale * (b.double() @ a.double()), best, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"rank 5 outside \[1, 4\]"):
        method.export_adapter(state, 5)
