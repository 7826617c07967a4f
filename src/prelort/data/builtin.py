"""The built-in offline multi-task suite: short single-answer tasks, one category per task.

Every task has exactly one correct short answer, so exact match, ROUGE-L and perplexity all mean
something, and a consistent format (a fixed instruction per category, the varying part in ``input``),
so a small model learns the format with LoRA in a few dozen steps. Content:

- country facts from the ``worlddatax`` package's JSON data (195 countries): capital, continent, ISO 4217
  currency code;
- words from the BIP-39 English word list shipped as plain text in the ``mnemonic`` package (2048 common
  words of 3-8 letters): letter count, which of two words comes first alphabetically;
- computed answers: two-number arithmetic, next term of an arithmetic sequence, larger of two numbers.

The suite is a pure function of the seed: each category has its own ``random.Random`` seeded with
``f"{seed}:{category}"`` (string seeds are hashed with SHA-512, so this does not depend on
PYTHONHASHSEED). Within a category items are distinct by (instruction, input), and the held-out split
takes its items first, so no (instruction, input) pair is in both splits.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from typing import Any

import datasets

from .templates import FIELDS, DataError

Item = tuple[str, str]  # (input, output)

INSTRUCTIONS: dict[str, str] = {
    "capital": "What is the capital city of the given country? Answer with the city name only.",
    "continent": "On which continent is the given country? Answer with one of: Africa, Americas, Asia, Europe, "
    "Oceania.",
    "currency": "What is the ISO 4217 currency code of the given country? Answer with the three-letter code only.",
    "arithmetic": "Compute the result. Answer with the number only.",
    "next_number": "What is the next number in the sequence? Answer with the number only.",
    "larger_number": "Which of the two numbers is larger? Answer with that number only.",
    "letter_count": "How many letters does the given word have? Answer with the number only.",
    "alphabetical_first": "Which of the two words comes first in alphabetical order? Answer with that word only.",
}
CATEGORIES = tuple(INSTRUCTIONS)


def _package_file(package: str, relative: str) -> Path:
    """A data file inside an installed distribution, located without importing the package's code."""
    try:
        path = Path(str(distribution(package).locate_file(relative)))
    except PackageNotFoundError:
        raise DataError(
            f"the builtin suite needs the package {package!r} (pip install {package}); it is a prelort dependency"
        ) from None
    if not path.is_file():
        raise DataError(f"package {package!r} has no data file {relative}")
    return path


@lru_cache(maxsize=1)
def countries() -> tuple[dict[str, Any], ...]:
    """Countries with a single capital, a continent and a currency code (worlddatax's countries.json)."""
    raw = json.loads(_package_file("worlddatax", "worlddatax/data/countries.json").read_text(encoding="utf-8"))
    kept = []
    for c in raw:
        name, capital = (c.get("name") or "").strip(), (c.get("capital") or "").strip()
        parts = [p.strip() for p in capital.split(",")]
        # "Pretoria, Bloemfontein, Cape Town" has no single answer; "Washington, D.C." is one name
        if len(parts) > 1 and not (len(parts) == 2 and parts[1].endswith(".")):
            continue
        if name and capital and c.get("continent") and c.get("currency_code"):
            kept.append(c)
    return tuple(kept)


@lru_cache(maxsize=1)
def words() -> tuple[str, ...]:
    """The BIP-39 English word list (2048 lower-case words)."""
    text = _package_file("mnemonic", "mnemonic/wordlist/english.txt").read_text(encoding="utf-8")
    return tuple(w for w in (line.strip() for line in text.splitlines()) if w.isalpha())


# ---------------------------------------------------------------- item pools
# A finite pool returns every item (shuffled); a sampler draws one random item (rejection keeps them distinct).


def _country_pool(field: str) -> Callable[[random.Random], list[Item]]:
    def pool(rng: random.Random) -> list[Item]:
        items = [(c["name"], str(c[field]).strip()) for c in countries()]
        rng.shuffle(items)
        return items

    return pool


def _arithmetic(rng: random.Random) -> Item:
    op = rng.choice("+-*")
    if op == "*":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        return f"{a} * {b}", str(a * b)
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    if op == "-":
        a, b = max(a, b), min(a, b)  # non-negative results
        return f"{a} - {b}", str(a - b)
    return f"{a} + {b}", str(a + b)


def _next_number(rng: random.Random) -> Item:
    start, step = rng.randint(0, 60), rng.randint(1, 12)
    if rng.random() < 0.3 and start >= 4 * step:  # descending sequences too, staying non-negative
        step = -step
    terms = [start + i * step for i in range(4)]
    return ", ".join(map(str, terms)), str(start + 4 * step)


def _larger_number(rng: random.Random) -> Item:
    a, b = rng.sample(range(0, 1000), 2)
    return f"{a} and {b}", str(max(a, b))


def _letter_count(rng: random.Random) -> list[Item]:
    items = [(w, str(len(w))) for w in words()]
    rng.shuffle(items)
    return items


def _alphabetical_first(rng: random.Random) -> Item:
    a, b = rng.sample(words(), 2)
    return f"{a}, {b}", min(a, b)


_POOLS: dict[str, Callable[[random.Random], list[Item]]] = {
    "capital": _country_pool("capital"),
    "continent": _country_pool("continent"),
    "currency": _country_pool("currency_code"),
    "letter_count": _letter_count,
}
_SAMPLERS: dict[str, tuple[Callable[[random.Random], Item], int]] = {
    # sampler, number of distinct inputs it can produce (an upper bound on what a category can give)
    "arithmetic": (_arithmetic, 100 * 100),
    "next_number": (_next_number, 61 * 12),
    "larger_number": (_larger_number, 1000 * 999),
    "alphabetical_first": (_alphabetical_first, 2048 * 2047),
}


def _capacity(category: str) -> int:
    if category in _POOLS:
        return len(_POOLS[category](random.Random(0)))
    # rejection sampling slows down near the bound: use at most half of it
    return _SAMPLERS[category][1] // 2


def _items(category: str, n: int, rng: random.Random) -> list[Item]:
    """``n`` items of one category with distinct inputs."""
    if category in _POOLS:
        return _POOLS[category](rng)[:n]
    sampler = _SAMPLERS[category][0]
    seen: set[str] = set()
    items: list[Item] = []
    while len(items) < n:
        item = sampler(rng)
        if item[0] not in seen:
            seen.add(item[0])
            items.append(item)
    return items


def allocate(total: int, capacities: list[int]) -> list[int]:
    """Split ``total`` as evenly as possible over bins with the given capacities (water filling).

    Bins that cannot take their even share are filled to capacity and the rest is spread over the others;
    leftover units go to the first bins. Raises DataError when the capacities add up to less than total.
    """
    if total > sum(capacities):
        raise DataError(f"cannot place {total} examples: the categories hold at most {sum(capacities)}")
    counts = [0] * len(capacities)
    open_bins = list(range(len(capacities)))
    remaining = total
    while remaining > 0 and open_bins:
        share, extra = divmod(remaining, len(open_bins))
        full = [i for i in open_bins if capacities[i] - counts[i] <= share]
        if full:  # fill the small bins, then share again among the others
            for i in full:
                remaining -= capacities[i] - counts[i]
                counts[i] = capacities[i]
            open_bins = [i for i in open_bins if i not in full]
            continue
        for j, i in enumerate(open_bins):
            counts[i] += share + (1 if j < extra else 0)
        remaining = 0
    return counts


def build_builtin_suite(seed: int, num_train: int, num_test: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    """The (train, test) splits of the suite, with columns instruction, input, output, category.

    Categories are balanced as far as their sizes allow (the country categories hold about 190 items each;
    the rest is spread over the computed categories). Deterministic in ``seed``; the splits are disjoint
    in (instruction, input).
    """
    if num_train < 1 or num_test < 1:
        raise DataError(f"num_train and num_test must be positive, got {num_train} and {num_test}")
    capacities = [_capacity(c) for c in CATEGORIES]
    total = num_train + num_test
    if total > sum(capacities):
        raise DataError(
            f"the builtin suite holds at most {sum(capacities)} distinct examples; "
            f"asked for {num_train} train + {num_test} test"
        )
    test_counts = allocate(num_test, capacities)
    train_counts = allocate(num_train, [cap - t for cap, t in zip(capacities, test_counts)])
    train_rows: list[dict[str, str]] = []
    test_rows: list[dict[str, str]] = []
    for category, n_test, n_train in zip(CATEGORIES, test_counts, train_counts):
        rng = random.Random(f"{seed}:{category}")
        items = _items(category, n_test + n_train, rng)
        rows = [
            {"instruction": INSTRUCTIONS[category], "input": inp, "output": out, "category": category}
            for inp, out in items
        ]
        test_rows.extend(rows[:n_test])
        train_rows.extend(rows[n_test:])
    return shuffled_datasets(train_rows, test_rows, FIELDS, f"{seed}:order")


def shuffled_datasets(
    train_rows: list[dict[str, str]], test_rows: list[dict[str, str]], fields: Sequence[str], order_seed: str
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(train, test) string datasets of ``fields``, each split shuffled in place by ``random.Random(order_seed)``
    (train first, then test), so a suite's example order is a pure function of its seed."""
    order = random.Random(order_seed)
    order.shuffle(train_rows)
    order.shuffle(test_rows)
    features = datasets.Features({name: datasets.Value("string") for name in fields})

    def to_dataset(rows: list[dict[str, str]]) -> datasets.Dataset:
        return datasets.Dataset.from_dict({name: [r[name] for r in rows] for name in fields}, features=features)

    return to_dataset(train_rows), to_dataset(test_rows)
