"""What every method must do: registry entry, plan/broadcast/tier shapes at every rank, pure aggregate."""

from __future__ import annotations

import json

import pytest
import torch

from prelort.methods import Broadcast, GlobalState, LocalTraining, Method, TrainPlan, available, build, get, key

# The methods prelort ships; every test below that means "every method" runs over the registry instead.
SHIPPED = {"prelort", "fedit", "zeropad", "hetlora", "flexlora", "flora"}
REGISTERED = sorted(available())
DENSE = {"flexlora", "flora"}
SUM_RULES = {
    "prelort": "segment",
    "fedit": "segment",
    "zeropad": "padded",
    "hetlora": "padded",
    "flexlora": None,
    "flora": None,
}


def test_registry_lists_the_shipped_methods():
    assert set(available()) == SHIPPED
    with pytest.raises(
        KeyError, match="unknown method 'fedavg'; known: fedit, flexlora, flora, hetlora, prelort, zeropad"
    ):
        get("fedavg")


@pytest.mark.parametrize("name", REGISTERED)
def test_class_attributes(name):
    cls = get(name)
    assert issubclass(cls, Method) and cls.name == name
    assert cls.summary and "\n" not in cls.summary
    assert "arXiv" in cls.reference or name == "prelort"
    assert cls.dense_state == (name in DENSE)
    assert cls.sum_rule == SUM_RULES[name]
    assert cls.sum_aggregatable == (cls.sum_rule is not None)  # one flag, derived from the rule
    assert cls.weight_depends_on_update == (name == "hetlora")


def test_sum_aggregatable_cannot_be_declared_apart_from_a_sum_rule():
    """The flag the config check, DP and the SecAgg+ finish all ask follows from sum_rule: a method that sets
    the flag without a rule (it would pass the config check and fail at the end of its first round) is
    refused when its class is defined."""
    with pytest.raises(TypeError, match="sum_aggregatable follows from sum_rule"):
        type("Claims", (get("flora"),), {"sum_aggregatable": True})
    with pytest.raises(TypeError, match="sum_rule must be one of segment, padded or None"):
        type("Odd", (get("flora"),), {"sum_rule": "median"})


def _snapshot(state: GlobalState) -> GlobalState:
    return GlobalState(
        tensors={k: v.clone() for k, v in state.tensors.items()}, meta=json.loads(json.dumps(state.meta))
    )


def _assert_same(a: GlobalState, b: GlobalState) -> None:
    assert a.tensors.keys() == b.tensors.keys()
    for name in a.tensors:
        assert torch.equal(a.tensors[name], b.tensors[name]), name
    assert a.meta == b.meta


def _check_broadcast(method: Method, bc: Broadcast, expected_rank: int) -> None:
    spec = method.spec
    assert set(bc.adapter) == {key(m, k) for m in spec.modules for k in ("lora_A", "lora_B")}
    for module, (d_out, d_in) in spec.modules.items():
        a, b = bc.adapter[key(module, "lora_A")], bc.adapter[key(module, "lora_B")]
        assert a.shape == (expected_rank, d_in) and b.shape == (d_out, expected_rank)
        assert a.dtype == torch.float32 and b.dtype == torch.float32
        assert torch.isfinite(a).all() and torch.isfinite(b).all()
    if method.name == "flora":
        assert bc.base_delta is not None
        assert {n: t.shape for n, t in bc.base_delta.items()} == {
            key(m, "delta"): torch.Size(shape) for m, shape in spec.modules.items()
        }
    else:
        assert bc.base_delta is None


@pytest.mark.parametrize("name", REGISTERED)
def test_state_plan_broadcast_and_tier_shapes_at_every_rank(name, make_spec, make_update):
    spec = make_spec(ranks=(1, 2, 4, 4, 3))
    method = build(name, spec)
    state = method.init_state(torch.Generator().manual_seed(0))
    json.dumps(state.meta)  # state.json must be able to hold it
    for module, (d_out, d_in) in spec.modules.items():
        if method.dense_state:
            assert state.tensors[key(module, "delta")].shape == (d_out, d_in)
        else:
            R = spec.min_rank if name == "fedit" else spec.max_rank
            assert state.tensors[key(module, "lora_A")].shape == (R, d_in)
            assert state.tensors[key(module, "lora_B")].shape == (d_out, R)
    assert all(t.dtype == torch.float32 for t in state.tensors.values())

    # one round with every client, so broadcasts are checked on a trained state too
    updates = []
    for client in range(len(spec.client_ranks)):
        r = method.client_rank(client, state)
        updates.append(make_update(spec, client, r, num_examples=5 + client))
    trained = method.aggregate(state, updates)
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in trained.tensors.values())

    for st in (state, trained):
        for r in range(1, spec.max_rank + 1):
            plan = method.plan(r)
            expected = min(r, spec.min_rank) if name == "fedit" else r
            assert plan.rank == expected
            assert plan.truncations[-1] == expected and list(plan.truncations) == sorted(set(plan.truncations))
            _check_broadcast(method, method.broadcast(st, r, generator=torch.Generator().manual_seed(r)), expected)
            tier = method.tier(st, r)
            _check_broadcast(method, tier, expected)
            exported = method.export_adapter(st, r)  # a PEFT adapter: LoRA factors of rank <= r
            assert set(exported) == set(tier.adapter)
            if tier.base_delta is None:  # what a rank-r client receives (FLoRA: tests/methods/test_flora_method.py)
                assert all(torch.equal(exported[n], tier.adapter[n]) for n in exported)


@pytest.mark.parametrize("name", REGISTERED)
def test_every_plan_has_a_client_side(name, make_spec):
    """The client builds the method's part of local training from any plan the server sends, and the plan
    travels as JSON; a plain method adds nothing, checks no clear metadata and counts an update at its rank."""
    spec = make_spec(ranks=(1, 2, 4, 4, 3), options={"hetlora_prune": True})
    method = build(name, spec)
    for r in range(1, spec.max_rank + 1):
        plan = method.plan(r)
        json.dumps(plan.extra)
        assert isinstance(method.local_training(plan), LocalTraining)
    if type(method).local_training is Method.local_training:
        assert all(not method.plan(r).extra for r in range(1, spec.max_rank + 1))
        with pytest.raises(ValueError, match="takes no plan extra"):
            method.local_training(TrainPlan(rank=1, truncations=(1,), extra={"x": 1}))
    if not method.clear_meta_fields:
        assert method.check_clear_meta({"loss": 1.0, "pruned_to": 0}, 2) == {}
        assert method.counted_rank({"pruned_to": 1}, 2) == 2


@pytest.mark.parametrize("name", REGISTERED)
def test_aggregate_does_not_mutate_and_empty_round_changes_nothing(name, make_spec, make_update):
    spec = make_spec(ranks=(1, 2, 4))
    method = build(name, spec)
    state = method.init_state(torch.Generator().manual_seed(3))
    # a non-trivial state first (dense states start at zero)
    state = method.aggregate(state, [make_update(spec, k, method.client_rank(k, state), seed=1) for k in range(3)])
    before = _snapshot(state)

    after = method.aggregate(state, [make_update(spec, k, method.client_rank(k, state), seed=2) for k in range(3)])
    _assert_same(state, before)
    assert any(not torch.equal(after.tensors[n], before.tensors[n]) for n in before.tensors)

    unchanged = method.aggregate(state, [])
    _assert_same(unchanged, before)
    assert all(unchanged.tensors[n] is not state.tensors[n] for n in state.tensors)  # a copy, not the same tensors


@pytest.mark.parametrize("name", REGISTERED)
def test_broadcast_hands_out_copies(name, make_spec, make_update):
    spec = make_spec(ranks=(2, 4))
    method = build(name, spec)
    state = method.init_state(torch.Generator().manual_seed(0))
    state = method.aggregate(state, [make_update(spec, k, method.client_rank(k, state)) for k in range(2)])
    before = _snapshot(state)
    bc = method.broadcast(state, 2, generator=torch.Generator().manual_seed(1))
    for t in bc.adapter.values():
        t.add_(1.0)  # a client training in place
    for t in (bc.base_delta or {}).values():
        t.add_(1.0)
    _assert_same(state, before)


@pytest.mark.parametrize("name", REGISTERED)
def test_bad_ranks_and_bad_updates_get_clear_errors(name, make_spec, make_update):
    spec = make_spec(ranks=(1, 2, 4))
    method = build(name, spec)
    state = method.init_state(torch.Generator().manual_seed(0))
    for bad in (0, 5):
        with pytest.raises(ValueError, match=r"rank .* outside \[1, 4\]"):
            method.broadcast(state, bad)
        with pytest.raises(ValueError, match=r"rank .* outside \[1, 4\]"):
            method.plan(bad)
    r = method.client_rank(1, state)
    missing = make_update(spec, 1, r)
    del missing.tensors[key("layers.0.o_proj", "lora_B")]
    with pytest.raises(ValueError, match=r"client 1: update has no tensor 'layers.0.o_proj.lora_B'"):
        method.aggregate(state, [missing])
    wrong = make_update(spec, 1, r)
    wrong.tensors[key("layers.0.q_proj", "lora_A")] = torch.zeros(r, 7)
    with pytest.raises(ValueError, match=r"layers.0.q_proj.lora_A has shape"):
        method.aggregate(state, [wrong])
    negative = make_update(spec, 1, r, num_examples=-3)
    if name != "hetlora":  # HetLoRA ignores data size
        with pytest.raises(ValueError, match="num_examples"):
            method.aggregate(state, [negative])
