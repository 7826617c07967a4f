"""PreLort: nested plans, prefix broadcast, streamed segment-wise aggregation."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prelort.methods import ClientUpdate, FederationSpec, build, key, lora_init
from prelort.methods.prelort import PreLort


def test_plan_truncations_per_mode(make_spec):
    spec = make_spec(ranks=(1, 2, 4, 8))
    method = PreLort(spec)
    assert method.plan(4).truncations == (1, 2, 4) and method.plan(4).mode == "all"
    assert method.plan(8).truncations == (1, 2, 4, 8)
    assert method.plan(1).truncations == (1,)
    assert method.plan(3).truncations == (1, 2, 3)  # a pruned/odd rank still trains itself
    for mode in ("sample", "sandwich", "cycle"):
        plan = PreLort(make_spec(ranks=(1, 2, 4, 8), options={"nested": mode})).plan(8)
        assert plan.mode == mode and plan.truncations == (1, 2, 4, 8)
    off = PreLort(make_spec(ranks=(1, 2, 4, 8), options={"nested": "off"})).plan(4)
    assert off.truncations == (4,) and off.mode == "off" and off.rank == 4
    assert method.plan(4).extra == {}


def test_unknown_nested_mode_is_rejected(make_spec):
    with pytest.raises(
        ValueError, match="options.nested must be one of all, sample, sandwich, off, sample_width, cycle, got 'every'"
    ):
        PreLort(make_spec(options={"nested": "every"}))


def test_init_is_peft_default_at_R_and_broadcast_is_the_prefix(make_spec):
    spec = make_spec(ranks=(1, 2, 4))
    method = PreLort(spec)
    state = method.init_state(torch.Generator().manual_seed(5))
    expected = lora_init(spec, 4, torch.Generator().manual_seed(5))
    for name, t in expected.items():
        assert torch.equal(state.tensors[name], t)
    bc = method.broadcast(state, 2)
    for module in spec.modules:
        assert torch.equal(bc.adapter[key(module, "lora_A")], state.tensors[key(module, "lora_A")][:2])
        assert torch.equal(bc.adapter[key(module, "lora_B")], state.tensors[key(module, "lora_B")][:, :2])


def _naive(spec, state, updates):
    """Per-dimension reference: dimension i = num_examples-weighted mean over clients with r_k > i."""
    out = {}
    for name, prev in state.tensors.items():
        module, kind = name.rsplit(".", 1)
        dim = 0 if kind == "lora_A" else 1
        new = prev.clone().double()
        for i in range(prev.shape[dim]):
            num, den = 0.0, 0.0
            for u in updates:
                if u.rank > i:
                    num = num + u.num_examples * u.tensors[name].select(dim, i).double()
                    den += u.num_examples
            if den > 0:
                new.select(dim, i).copy_(num / den)
        out[name] = new.float()
    return out


@settings(max_examples=25, deadline=None)
@given(
    clients=st.lists(st.tuples(st.sampled_from([1, 2, 3, 5]), st.integers(0, 50)), min_size=1, max_size=5),
    seed=st.integers(0, 1000),
)
def test_aggregate_is_segmentwise_mean(clients, seed):
    spec = FederationSpec(modules={"m.q": (3, 4), "m.v": (2, 3)}, client_ranks=(1, 2, 3, 5), alpha=2.0)
    method = PreLort(spec)
    state = method.init_state(torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1)
    updates = []
    for k, (r, n) in enumerate(clients):
        tensors = {}
        for module, (d_out, d_in) in spec.modules.items():
            tensors[key(module, "lora_A")] = torch.randn(r, d_in, generator=g)
            tensors[key(module, "lora_B")] = torch.randn(d_out, r, generator=g)
        updates.append(ClientUpdate(client=k, rank=r, num_examples=n, tensors=tensors))
    new = method.aggregate(state, updates)
    for name, expected in _naive(spec, state, updates).items():
        torch.testing.assert_close(new.tensors[name], expected, rtol=1e-6, atol=1e-6)


def test_uncovered_dimensions_keep_previous_and_covered_ones_are_not_diluted(make_spec, make_update):
    spec = make_spec(ranks=(1, 2, 4, 4))
    method = PreLort(spec)
    state = method.init_state(torch.Generator().manual_seed(0))
    u_small = make_update(spec, 0, 1, num_examples=30)
    u_mid = make_update(spec, 1, 2, num_examples=10)
    new = method.aggregate(state, [u_small, u_mid])
    for module in spec.modules:
        ka, kb = key(module, "lora_A"), key(module, "lora_B")
        # dims 2..3: nobody had them this round
        assert torch.equal(new.tensors[ka][2:], state.tensors[ka][2:])
        assert torch.equal(new.tensors[kb][:, 2:], state.tensors[kb][:, 2:])
        # dim 1: only the rank-2 client -> its own value (zero-padding would scale it by 10/40)
        torch.testing.assert_close(new.tensors[ka][1], u_mid.tensors[ka][1])
        # dim 0: (30 a_small + 10 a_mid) / 40
        torch.testing.assert_close(new.tensors[ka][0], (30 * u_small.tensors[ka][0] + 10 * u_mid.tensors[ka][0]) / 40)


def test_aggregate_streams_updates_without_holding_them(make_spec, make_update):
    """Server memory is flat in the number of clients: a folded-in update can be freed at once."""
    spec = make_spec(ranks=(1, 2, 4, 4))
    method = PreLort(spec)
    state = method.init_state(torch.Generator().manual_seed(0))
    refs: list[weakref.ref] = []
    alive_when_next_was_made: list[int] = []

    def stream():
        for k in range(6):
            gc.collect()
            alive_when_next_was_made.append(sum(r() is not None for r in refs))
            u = make_update(spec, k, (1, 2, 4)[k % 3], num_examples=k + 1)
            refs.append(weakref.ref(u))
            yield u
            del u

    new = method.aggregate(state, stream())
    # at most the update just folded in (still bound to the loop variable) - never a growing list
    assert max(alive_when_next_was_made) <= 1
    # and the streamed result is the same as from a list
    again = method.aggregate(state, [make_update(spec, k, (1, 2, 4)[k % 3], num_examples=k + 1) for k in range(6)])
    for name in new.tensors:
        assert torch.equal(new.tensors[name], again.tensors[name])


def test_equal_ranks_reduce_to_fedavg(make_spec, make_update):
    spec = make_spec(ranks=(2, 2, 2))
    method = build("prelort", spec)
    state = method.init_state(torch.Generator().manual_seed(0))
    ups = [make_update(spec, k, 2, num_examples=n) for k, n in enumerate((1, 2, 5))]
    new = method.aggregate(state, ups)
    for name in new.tensors:
        fedavg = sum(u.num_examples * u.tensors[name].double() for u in ups) / 8
        torch.testing.assert_close(new.tensors[name], fedavg.float())
    assert method.plan(2).truncations == (2,)
