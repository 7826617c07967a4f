from __future__ import annotations

from collections import Counter

import pytest

from prelort.config import Config, FactsConfig, PartitionConfig
from prelort.data import DataError, build_builtin_suite, load_records, partition
from prelort.data.facts import ATTRIBUTES, HELD_OUT_PHRASING, INSTRUCTION, build_facts_suite

CFG = FactsConfig(num_entities=40, attributes=3, train_phrasings=3, groups=4)


@pytest.fixture(scope="module")
def suite():
    return build_facts_suite(7, CFG)


def _name_of(question: str, attribute: str, phrasing: int) -> str:
    """The entity name in ``question``, asked in the given phrasing of ``attribute`` (None if not that one)."""
    before, _, after = ATTRIBUTES[attribute][1][phrasing].partition("{name}")
    if question.startswith(before) and question.endswith(after):
        return question[len(before) : len(question) - len(after)]
    return None


def test_sizes_columns_and_categories(suite):
    train, test = suite
    assert train.column_names == ["instruction", "input", "output", "category", "group"]
    assert (len(train), len(test)) == (40 * 3 * 3, 40 * 3)  # every fact in 3 training phrasings, asked once
    assert set(train["category"]) == set(test["category"]) == set(list(ATTRIBUTES)[:3])
    assert set(Counter(test["category"]).values()) == {40}
    assert set(train["instruction"]) == {INSTRUCTION}
    for row in [*train, *test]:
        assert row["output"] in ATTRIBUTES[row["category"]][0]
        assert len(row["output"].split()) == 1  # short answers


def test_deterministic_for_a_seed_and_different_across_seeds(suite):
    again = build_facts_suite(7, CFG)
    assert again[0].to_dict() == suite[0].to_dict() and again[1].to_dict() == suite[1].to_dict()
    other = build_facts_suite(8, CFG)
    assert other[1]["input"] != suite[1]["input"]


def test_held_out_phrasing_never_in_training_and_facts_consistent(suite):
    train, test = suite
    train_inputs = set(train["input"])
    facts: dict[tuple[str, str], str] = {}
    for row in train:
        matched = [p for p in range(HELD_OUT_PHRASING) if _name_of(row["input"], row["category"], p)]
        assert matched, row  # a training phrasing ...
        assert _name_of(row["input"], row["category"], HELD_OUT_PHRASING) is None  # ... never the held-out one
        name = _name_of(row["input"], row["category"], matched[0])
        assert facts.setdefault((name, row["category"]), row["output"]) == row["output"]  # one value per fact
    assert len(facts) == 40 * 3
    for row in test:
        assert row["input"] not in train_inputs
        name = _name_of(row["input"], row["category"], HELD_OUT_PHRASING)
        assert name is not None
        assert facts[(name, row["category"])] == row["output"]  # the same fact, asked in a new phrasing


def test_answers_are_spread_over_the_vocabulary(suite):
    _, test = suite
    # no value dominates: a model that learns only the answer format cannot score much above chance
    for attribute in set(test["category"]):
        counts = Counter(r["output"] for r in test if r["category"] == attribute)
        assert max(counts.values()) <= 0.3 * sum(counts.values())


def test_groups_split_over_clients_with_the_pathological_partitioner(suite):
    train, _ = suite
    assert set(train["group"]) == {f"group-{k}" for k in range(4)}
    cfg = PartitionConfig(kind="pathological", by="group", classes_per_client=1)
    parts = partition(train, cfg, 4, seed=0)
    groups = [set(p["group"]) for p in parts]
    assert all(len(g) == 1 for g in groups)
    assert set().union(*groups) == set(train["group"])  # every group held by exactly one client
    for p in parts:  # and a client holds all facts of its entities (3 attributes x 3 phrasings x 10 entities)
        assert len(p) == 10 * 3 * 3


def test_config_selects_the_suite_and_the_default_is_unchanged():
    facts = Config.model_validate({"data": {"suite": "facts", "facts": {"num_entities": 12, "groups": 2}}})
    train, test = load_records(facts.data, 0)
    assert (len(train), len(test)) == (12 * 3 * 3, 12 * 3) and "group" in train.column_names
    default = Config().data
    assert default.suite == "multitask"
    train, test = load_records(default, 0)
    ref = build_builtin_suite(0, default.num_train, default.num_test)
    assert train.to_dict() == ref[0].to_dict() and test.to_dict() == ref[1].to_dict()


def test_bad_sizes_are_refused():
    with pytest.raises(DataError, match="groups"):
        build_facts_suite(0, FactsConfig(num_entities=3, groups=4))
    with pytest.raises(ValueError, match="train_phrasings"):
        FactsConfig(train_phrasings=4)
