from __future__ import annotations

import json
from collections import Counter
from importlib.metadata import distribution

import pytest

from prelort.data import CATEGORIES, DataError, build_builtin_suite
from prelort.data.builtin import allocate, countries, words


@pytest.fixture(scope="module")
def suite():
    return build_builtin_suite(seed=3, num_train=800, num_test=160)


def _pairs(ds):
    return [(r["instruction"], r["input"]) for r in ds]


def test_sizes_columns_and_categories(suite):
    train, test = suite
    assert (len(train), len(test)) == (800, 160)
    assert train.column_names == ["instruction", "input", "output", "category"]
    assert len(CATEGORIES) >= 6
    assert set(train["category"]) == set(CATEGORIES) == set(test["category"])
    # balanced: 800 / 8 = 100 per category (country categories hold ~190, so nothing is capped here)
    assert set(Counter(train["category"]).values()) == {100}
    assert set(Counter(test["category"]).values()) == {20}
    assert all(r["output"] and r["instruction"] and r["input"] for r in train)


def test_deterministic_for_a_seed_and_different_across_seeds(suite):
    again = build_builtin_suite(seed=3, num_train=800, num_test=160)
    assert again[0].to_dict() == suite[0].to_dict()
    assert again[1].to_dict() == suite[1].to_dict()
    other = build_builtin_suite(seed=4, num_train=800, num_test=160)
    assert other[0].to_dict() != suite[0].to_dict()
    assert set(_pairs(other[1])) != set(_pairs(suite[1]))


def test_splits_are_disjoint_and_have_no_duplicates(suite):
    train, test = suite
    train_pairs, test_pairs = _pairs(train), _pairs(test)
    assert len(set(train_pairs)) == len(train_pairs)
    assert len(set(test_pairs)) == len(test_pairs)
    assert not set(train_pairs) & set(test_pairs)


def test_computed_answers_are_correct(suite):
    rows = [r for ds in suite for r in ds]
    checked = Counter()
    for r in rows:
        inp, out = r["input"], r["output"]
        if r["category"] == "arithmetic":
            a, op, b = inp.split()
            expected = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
            assert out == str(expected), r
        elif r["category"] == "next_number":
            terms = [int(x) for x in inp.split(", ")]
            step = terms[1] - terms[0]
            assert all(terms[i + 1] - terms[i] == step for i in range(len(terms) - 1)), r
            assert out == str(terms[-1] + step), r
        elif r["category"] == "larger_number":
            a, b = (int(x) for x in inp.split(" and "))
            assert a != b and out == str(max(a, b)), r
        elif r["category"] == "letter_count":
            assert inp.isalpha() and out == str(len(inp)), r
        elif r["category"] == "alphabetical_first":
            a, b = inp.split(", ")
            assert a != b and out == sorted([a, b])[0], r
        else:
            continue
        checked[r["category"]] += 1
    assert len(checked) == 5 and min(checked.values()) >= 100


def test_country_answers_match_the_worlddatax_data(suite):
    raw = json.loads(
        open(distribution("worlddatax").locate_file("worlddatax/data/countries.json"), encoding="utf-8").read()
    )
    by_name = {c["name"]: c for c in raw}
    field = {"capital": "capital", "continent": "continent", "currency": "currency_code"}
    n = 0
    for ds in suite:
        for r in ds:
            if r["category"] in field:
                assert r["output"] == by_name[r["input"]][field[r["category"]]], r
                n += 1
    assert n == 3 * 120
    # a fact the data must get right, and the multi-capital entry must be skipped
    assert by_name["France"]["capital"] == "Paris"
    assert "South Africa" not in {c["name"] for c in countries()}
    assert len(countries()) > 180


def test_word_list_is_the_bip39_english_list():
    w = words()
    assert len(w) == 2048 and w[0] == "abandon" and w[-1] == "zoo"


def test_large_request_fills_from_computed_categories():
    train, test = build_builtin_suite(seed=0, num_train=2000, num_test=300)
    counts = Counter(train["category"]) + Counter(test["category"])
    n_countries = len(countries())
    # country categories are capped at their size, the rest is spread over the computed ones
    assert counts["capital"] == counts["continent"] == counts["currency"] == n_countries
    assert sum(counts.values()) == 2300
    assert not set(_pairs(train)) & set(_pairs(test))


def test_impossible_size_is_a_clear_error():
    with pytest.raises(DataError, match="at most"):
        build_builtin_suite(seed=0, num_train=10_000_000, num_test=10)
    with pytest.raises(DataError, match="positive"):
        build_builtin_suite(seed=0, num_train=0, num_test=10)


def test_allocate_water_fills():
    assert allocate(10, [100, 100]) == [5, 5]
    assert allocate(11, [100, 100, 100]) == [4, 4, 3]
    assert allocate(30, [2, 100, 100]) == [2, 14, 14]
    assert allocate(7, [3, 3, 1]) == [3, 3, 1]
    with pytest.raises(DataError):
        allocate(8, [3, 3, 1])
