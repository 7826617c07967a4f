"""Client-level DP on the aggregation sums (prelort.privacy) and the secure-aggregation config check."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from prelort.config import ConfigError, PrivacyConfig, from_dict
from prelort.methods import ClientUpdate, FederationSpec, build, key
from prelort.privacy import (
    PrivacyError,
    check_secure_aggregation,
    clip_update,
    dp_aggregate,
    update_change_norm,
)

MODULES = {"layers.0.q": (6, 5), "layers.0.v": (3, 5)}


def _spec(ranks=(1, 2, 4)) -> FederationSpec:
    return FederationSpec(modules=dict(MODULES), client_ranks=tuple(ranks), alpha=8.0)


def _round(method_name: str, ranks=(1, 2, 4), scale: float = 0.1, seed: int = 0, num_examples=(10, 30, 60)):
    """(method, state, updates, references): every client starts from its broadcast and moves randomly."""
    spec = _spec(ranks)
    method = build(method_name, spec)
    g = torch.Generator().manual_seed(seed)
    state = method.init_state(g)
    for name in state.tensors:  # a nonzero B so references differ from zero
        state.tensors[name] = torch.randn(state.tensors[name].shape, generator=g)
    updates, refs = [], {}
    for client, n in enumerate(num_examples):
        rank = method.client_rank(client, state)
        ref = method.broadcast(state, rank, g).adapter
        refs[client] = ref
        tensors = {k: v + scale * torch.randn(v.shape, generator=g) for k, v in ref.items()}
        updates.append(ClientUpdate(client, tensors[key("layers.0.q", "lora_A")].shape[0], n, tensors, 1, method_name))
    return method, state, updates, refs


@pytest.mark.parametrize("method_name", ["prelort", "fedit", "zeropad", "hetlora"])
def test_no_noise_huge_clip_equals_plain_aggregate_with_uniform_weights(method_name):
    method, state, updates, refs = _round(method_name)
    cfg = PrivacyConfig(dp=True, clip_norm=1e6, noise_multiplier=0.0)
    new, info = dp_aggregate(method, state, updates, refs, cfg, torch.Generator().manual_seed(1))
    uniform = [dataclasses.replace(u, num_examples=1) for u in updates]
    if method_name == "hetlora":  # under DP HetLoRA's norm weights become uniform: zero-padding with p_k = 1
        plain = build("zeropad", method.spec).aggregate(state, uniform)
    else:
        plain = method.aggregate(state, uniform)
    for name, t in plain.tensors.items():
        torch.testing.assert_close(new.tensors[name], t, rtol=0, atol=1e-6)
    assert info["clients_clipped"] == 0 and info["clients"] == 3 and info["noise_std"] == {"lora_A": 0.0, "lora_B": 0.0}


def test_clipping_bounds_each_clients_change():
    _, _, updates, refs = _round("prelort", scale=5.0)
    for u in updates:
        before = update_change_norm(u, refs[u.client])
        clipped, norm, was = clip_update(u, refs[u.client], 0.5)
        assert was and norm == pytest.approx(before) and before > 0.5
        assert update_change_norm(clipped, refs[u.client]) == pytest.approx(0.5, rel=1e-5)
        # the direction of the change is kept: clipped change = (0.5 / norm) * change
        for k, x in u.tensors.items():
            torch.testing.assert_close(clipped.tensors[k] - refs[u.client][k], (x - refs[u.client][k]) * 0.5 / norm)
    small, norm, was = clip_update(updates[0], refs[0], 1e9)
    assert not was and small is updates[0]


def test_one_client_moves_the_aggregate_by_at_most_the_clip_over_its_divisor():
    """Replacing one client's update with an arbitrarily large one changes the noiseless aggregate of each
    dimension by at most 2 C / D_i (segment mean over D_i clients): the clip bounds its influence."""
    method, state, updates, refs = _round("prelort", ranks=(4, 4, 4), scale=0.01)
    cfg = PrivacyConfig(dp=True, clip_norm=0.3, noise_multiplier=0.0)
    gen = torch.Generator().manual_seed(0)
    base, _ = dp_aggregate(method, state, updates, refs, cfg, gen)
    hostile = dataclasses.replace(updates[0], tensors={k: v + 1e4 for k, v in updates[0].tensors.items()})
    moved, info = dp_aggregate(method, state, [hostile, *updates[1:]], refs, cfg, gen)
    assert info["clients_clipped"] == 1
    diff = math.sqrt(sum(float((moved.tensors[k] - base.tensors[k]).double().pow(2).sum()) for k in base.tensors))
    assert diff <= 2 * 0.3 / 3 + 1e-6
    assert diff > 0.3 / 3 / 2  # and the hostile client did move it (its clipped change is large)


def test_noise_has_the_stated_std():
    """Zero changes, z = 1.5, C = 0.4: new - previous = xi / D_i with xi ~ N(0, (z C)^2) per entry."""
    spec = FederationSpec(modules={"m": (64, 48)}, client_ranks=(8, 8, 8, 8), alpha=8.0)
    method = build("prelort", spec)
    state = method.init_state(torch.Generator().manual_seed(0))
    refs = {k: method.broadcast(state, 8).adapter for k in range(4)}
    updates = [ClientUpdate(k, 8, 5, {n: t.clone() for n, t in refs[k].items()}, 1, "prelort") for k in range(4)]
    cfg = PrivacyConfig(dp=True, clip_norm=0.4, noise_multiplier=1.5)
    new, info = dp_aggregate(method, state, updates, refs, cfg, torch.Generator().manual_seed(3))
    xi = torch.cat([((new.tensors[n] - state.tensors[n]).double() * 4).flatten() for n in state.tensors])
    n = xi.numel()  # 8*48 + 64*8 = 896 entries
    expected = 1.5 * 0.4
    assert abs(float(xi.mean())) < 4 * expected / math.sqrt(n)
    # sample std of n Gaussians: relative standard error ~ 1 / sqrt(2 n) = 2.4%; allow 4 of them
    assert float(xi.std()) == pytest.approx(expected, rel=4 / math.sqrt(2 * n))
    assert info["noise_std"] == {"lora_A": pytest.approx(0.6), "lora_B": pytest.approx(0.6)}
    assert info["noise_std_state"]["lora_A"] == pytest.approx(0.6 / 4)


def test_segment_rule_adds_no_noise_to_uncovered_dimensions_and_divides_by_coverage():
    method, state, updates, refs = _round("prelort", ranks=(1, 2, 4), scale=0.0)
    cfg = PrivacyConfig(dp=True, clip_norm=1.0, noise_multiplier=2.0)
    new, _ = dp_aggregate(method, state, updates[:2], refs, cfg, torch.Generator().manual_seed(0))  # ranks 1, 2
    a = key("layers.0.q", "lora_A")
    torch.testing.assert_close(new.tensors[a][2:], state.tensors[a][2:], rtol=0, atol=0)  # nobody covers 2..3
    assert not torch.equal(new.tensors[a][:2], state.tensors[a][:2])


def test_deterministic_for_a_generator_seed_and_noise_changes_with_it():
    method, state, updates, refs = _round("zeropad")
    cfg = PrivacyConfig(dp=True, clip_norm=0.2, noise_multiplier=1.0)
    one, _ = dp_aggregate(method, state, updates, refs, cfg, torch.Generator().manual_seed(7))
    two, _ = dp_aggregate(method, state, updates, refs, cfg, torch.Generator().manual_seed(7))
    other, _ = dp_aggregate(method, state, updates, refs, cfg, torch.Generator().manual_seed(8))
    for name in state.tensors:
        assert torch.equal(one.tensors[name], two.tensors[name])
    assert any(not torch.equal(one.tensors[n], other.tensors[n]) for n in state.tensors)


def test_hetlora_pruning_survives_dp():
    method, state, updates, refs = _round("hetlora", ranks=(4, 4, 4))
    updates[1] = dataclasses.replace(updates[1], meta={"pruned_to": 2})
    cfg = PrivacyConfig(dp=True, clip_norm=1e6, noise_multiplier=0.0)
    new, _ = dp_aggregate(method, state, updates, refs, cfg, torch.Generator().manual_seed(0))
    assert new.meta["client_ranks"]["1"] == 2
    a = key("layers.0.q", "lora_A")
    expected_row3 = sum(u.tensors[a][3] for u in (updates[0], updates[2])) / 3  # client 1's tail counts as zero
    torch.testing.assert_close(new.tensors[a][3], expected_row3, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method_name", ["flexlora", "flora"])
def test_dense_methods_are_refused_with_the_reason(method_name):
    spec = _spec()
    method = build(method_name, spec)
    state = method.init_state(torch.Generator().manual_seed(0))
    with pytest.raises(PrivacyError, match=rf"privacy.dp: method '{method_name}' does not aggregate plain sums"):
        dp_aggregate(method, state, [], {}, PrivacyConfig(dp=True), torch.Generator())


def test_missing_reference_is_a_clear_error():
    method, state, updates, refs = _round("prelort")
    del refs[1]
    with pytest.raises(PrivacyError, match="no reference .broadcast adapter. for client 1"):
        dp_aggregate(method, state, updates, refs, PrivacyConfig(dp=True), torch.Generator())


def test_check_secure_aggregation():
    ok = {"engine": "flower-sim", "privacy": {"secure_aggregation": True}, "clients": {"num": 4, "per_round": 3}}
    for name in ("prelort", "fedit", "zeropad"):
        check_secure_aggregation(from_dict({**ok, "method": name}))
    # HetLoRA's norm weights need a public bound: ||B A||_F <= max_update_norm**2 / 2
    check_secure_aggregation(from_dict({**ok, "method": "hetlora", "validation": {"max_update_norm": 10.0}}))
    with pytest.raises(ConfigError, match="method hetlora needs validation.max_update_norm"):
        check_secure_aggregation(from_dict({**ok, "method": "hetlora"}))
    with pytest.raises(ConfigError, match="privacy.secure_aggregation and audit: true cannot be combined"):
        check_secure_aggregation(from_dict({**ok, "audit": True}))
    # DP with secure aggregation runs (clients clip, the server noises the sums); under DP HetLoRA's weights are 1,
    # so it needs no bound on them
    check_secure_aggregation(from_dict({**ok, "privacy": {"secure_aggregation": True, "dp": True}}))
    check_secure_aggregation(
        from_dict({**ok, "method": "hetlora", "privacy": {"secure_aggregation": True, "dp": True}})
    )
    for name in ("flexlora", "flora"):
        with pytest.raises(
            ConfigError,
            match=rf"method '{name}' cannot run under secure aggregation.*"
            "methods that can: fedit, hetlora, prelort, zeropad",
        ):
            check_secure_aggregation(from_dict({**ok, "method": name}))
    with pytest.raises(ConfigError, match="needs engine flower-sim or flower"):
        check_secure_aggregation(from_dict({**ok, "engine": "inprocess"}))
    with pytest.raises(ConfigError, match="at least 3 clients per round"):
        check_secure_aggregation(from_dict({**ok, "clients": {"num": 4, "per_round": 2}}))
    check_secure_aggregation(from_dict({"method": "flora"}))  # off: nothing to check
