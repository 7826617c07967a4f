"""clients.sampling: uniform (any per_round of the clients) or stratified (every rank tier in proportion)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from prelort import config as config_mod
from prelort.federation import Federation, derived_seed, stratified_sample


def federation(tmp_path, **clients) -> Federation:
    cfg = config_mod.from_dict({"clients": clients, "seed": 7})
    return Federation(cfg, tmp_path, {})


def tiers_of(fed: Federation, chosen: list[int]) -> Counter:
    return Counter(fed.cfg.clients.rank_of(c) for c in chosen)


def test_stratified_draws_one_client_per_tier_every_round(tmp_path):
    fed = federation(tmp_path, num=8, per_round=4, ranks=[2, 4, 8, 16], sampling="stratified")
    seen = Counter()
    for round_ in range(1, 41):
        chosen = fed.sample_clients(round_)
        assert len(chosen) == 4 and chosen == sorted(set(chosen))
        assert tiers_of(fed, chosen) == Counter({2: 1, 4: 1, 8: 1, 16: 1}), (round_, chosen)
        seen.update(chosen)
    # both clients of every tier get drawn (each with probability 1/2 per round)
    assert sorted(seen) == list(range(8)) and min(seen.values()) >= 10


def test_uniform_sampling_can_skip_a_tier_and_is_unchanged(tmp_path):
    fed = federation(tmp_path, num=8, per_round=4, ranks=[2, 4, 8, 16])
    assert fed.cfg.clients.sampling == "uniform"
    draws = [fed.sample_clients(r) for r in range(1, 41)]
    # the draw of previous versions: rng.sample of range(num), seeded by (seed, round, -1)
    assert draws[0] == sorted(random.Random(derived_seed(7, 1, -1)).sample(range(8), 4))
    assert any(len(tiers_of(fed, d)) < 4 for d in draws)


def test_stratified_is_proportional_with_unequal_tiers(tmp_path):
    # ranks cycled over 6 clients: tier 1 has 3 clients, tier 2 has 2, tier 4 has 1; per_round 3 gives quotas
    # 1.5 / 1 / 0.5: tier 2 always gets 1, and the left-over client goes to tier 1 or tier 4 (equal remainders)
    fed = federation(tmp_path, num=6, per_round=3, ranks=[1, 1, 1, 2, 2, 4], sampling="stratified")
    patterns = Counter()
    for round_ in range(1, 61):
        t = tiers_of(fed, fed.sample_clients(round_))
        assert t[2] == 1 and sum(t.values()) == 3
        patterns[(t[1], t[4])] += 1
    assert set(patterns) == {(2, 0), (1, 1)}


def test_stratified_with_fewer_clients_than_tiers_draws_distinct_tiers(tmp_path):
    fed = federation(tmp_path, num=8, per_round=2, ranks=[2, 4, 8, 16], sampling="stratified")
    for round_ in range(1, 21):
        assert sorted(tiers_of(fed, fed.sample_clients(round_)).values()) == [1, 1]


def test_stratified_is_seeded_by_seed_round_and_attempt(tmp_path):
    a = federation(tmp_path, num=8, per_round=4, ranks=[2, 4, 8, 16], sampling="stratified")
    b = federation(tmp_path, num=8, per_round=4, ranks=[2, 4, 8, 16], sampling="stratified")  # a resumed run
    assert [a.sample_clients(r) for r in range(1, 21)] == [b.sample_clients(r) for r in range(1, 21)]
    assert [a.sample_clients(r) for r in range(1, 21)] != [a.sample_clients(r, attempt=1) for r in range(1, 21)]
    other = config_mod.from_dict(
        {"clients": {"num": 8, "per_round": 4, "ranks": [2, 4, 8, 16], "sampling": "stratified"}, "seed": 8}
    )
    c = Federation(other, tmp_path, {})
    assert [a.sample_clients(r) for r in range(1, 21)] != [c.sample_clients(r) for r in range(1, 21)]


def test_stratified_sample_everyone_and_bad_sizes():
    assert stratified_sample([2, 4, 2, 4], 4, random.Random(0)) == [0, 1, 2, 3]
    assert stratified_sample([2, 4], 0, random.Random(0)) == []
    with pytest.raises(ValueError, match="cannot sample 3 of 2 clients"):
        stratified_sample([2, 4], 3, random.Random(0))


def test_unknown_sampling_is_rejected_with_its_path():
    with pytest.raises(config_mod.ConfigError, match=r"clients\.sampling: Input should be 'uniform' or 'stratified'"):
        config_mod.from_dict({}, ["clients.sampling=balanced"])
