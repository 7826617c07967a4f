from __future__ import annotations

from collections import Counter

import datasets
import pytest

from prelort.config import PartitionConfig
from prelort.data import DataError, partition


@pytest.fixture(scope="module")
def records():
    # ordered by category on purpose: IID must not hand out contiguous category blocks
    cats = [c for c in "abcdef" for _ in range(40)]
    return datasets.Dataset.from_dict(
        {
            "instruction": [f"q{i}" for i in range(len(cats))],
            "input": [""] * len(cats),
            "output": [str(i) for i in range(len(cats))],
            "category": cats,
        }
    )


def _ids(parts):
    return [sorted(p["instruction"]) for p in parts]


def test_iid_balanced_complete_and_mixed(records):
    parts = partition(records, PartitionConfig(kind="iid"), num_clients=7, seed=0)
    sizes = [len(p) for p in parts]
    assert sum(sizes) == len(records) and max(sizes) - min(sizes) <= 1
    assert sorted(x for p in parts for x in p["instruction"]) == sorted(records["instruction"])
    # shuffled before sharding: each client sees several categories
    assert all(len(set(p["category"])) >= 3 for p in parts)
    assert _ids(parts) == _ids(partition(records, PartitionConfig(kind="iid"), num_clients=7, seed=0))


def test_dirichlet_deterministic_for_a_seed(records):
    cfg = PartitionConfig(kind="dirichlet", alpha=0.3, min_partition_size=5)
    parts = partition(records, cfg, num_clients=4, seed=1)
    assert sum(len(p) for p in parts) == len(records)
    assert sorted(x for p in parts for x in p["instruction"]) == sorted(records["instruction"])
    assert min(len(p) for p in parts) >= 5
    assert _ids(parts) == _ids(partition(records, cfg, num_clients=4, seed=1))
    assert _ids(parts) != _ids(partition(records, cfg, num_clients=4, seed=2))
    # small alpha skews the category mix: some client is dominated by one category
    top_shares = [Counter(p["category"]).most_common(1)[0][1] / len(p) for p in parts]
    assert max(top_shares) > 0.4


def test_pathological_at_most_k_categories(records):
    cfg = PartitionConfig(kind="pathological", classes_per_client=2)
    parts = partition(records, cfg, num_clients=6, seed=0)
    assert all(1 <= len(set(p["category"])) <= 2 for p in parts)
    assert sum(len(p) for p in parts) == len(records)  # 6 clients >= 6 categories: every category used
    assert _ids(parts) == _ids(partition(records, cfg, num_clients=6, seed=0))


def test_errors_name_the_problem(records):
    with pytest.raises(DataError, match="'task' is not a column"):
        partition(records, PartitionConfig(kind="dirichlet", by="task"), num_clients=3, seed=0)
    with pytest.raises(DataError, match="cannot be split over 500 clients"):
        partition(records, PartitionConfig(kind="iid"), num_clients=500, seed=0)
    with pytest.raises(DataError, match="classes_per_client=7 exceeds the 6 distinct"):
        partition(records, PartitionConfig(kind="pathological", classes_per_client=7), num_clients=3, seed=0)
    # 12 records over 10 clients with a tiny alpha: Dirichlet gives up after its 10 resampling tries
    tiny = records.select(range(0, 240, 20))  # 12 records, 2 per category
    with pytest.raises(DataError, match="dirichlet partitioning over 10 clients failed"):
        partition(tiny, PartitionConfig(kind="dirichlet", alpha=0.1, min_partition_size=1), num_clients=10, seed=0)
