"""The ``facts`` builtin suite: attributes of fictional entities, asked in a phrasing training never shows.

A task that needs capacity: every answer is an arbitrary fact about an invented person, so the model can
only get it right by storing it, and the number of facts (``num_entities x attributes``) is the knob that
decides how much has to be stored. Built offline as a pure function of the seed:

- entity names: two distinct words of the BIP-39 English list (shipped in the ``mnemonic`` package),
  capitalised ("Velvet Harbor"); names are distinct;
- attributes: up to six (:data:`ATTRIBUTES`), each with a fixed vocabulary of twelve one-word values,
  drawn uniformly per entity, so guessing the most common value scores about 1/12;
- phrasings: four questions per attribute. Training holds every fact in the first ``train_phrasings`` of
  them; the held-out split asks every fact once, in the fourth, which no training record uses. A model
  that has not learned the facts scores about chance (zero-shot: ~0, it does not know the answer format);
- ``category`` is the attribute, ``group`` the entity group (entity k is in group ``k mod groups``), so
  ``data.partition.kind: pathological`` with ``by: group`` gives each client the facts of its own
  entities only and the global adapter has to combine knowledge no single client holds.

Records have the columns instruction, input, output, category, group.
"""

from __future__ import annotations

import random

import datasets

from ..config import FactsConfig
from .builtin import shuffled_datasets, words
from .templates import FIELDS, DataError

INSTRUCTION = "Answer the question about the fictional person with one word."
HELD_OUT_PHRASING = 3  # index into each attribute's phrasings; training uses indices below train_phrasings (<= 3)

# attribute -> (values, phrasings with {name}); the last phrasing is held out
ATTRIBUTES: dict[str, tuple[tuple[str, ...], tuple[str, str, str, str]]] = {
    "color": (
        ("red", "blue", "green", "yellow", "purple", "orange", "black", "white", "pink", "brown", "gray", "gold"),
        (
            "What is the favorite color of {name}?",
            "Which color does {name} like best?",
            "{name}'s favorite color is what?",
            "Name the color that {name} prefers.",
        ),
    ),
    "city": (
        ("Paris", "Tokyo", "Cairo", "Lima", "Oslo", "Rome", "Delhi", "Sydney", "Berlin", "Madrid", "Moscow", "Dublin"),
        (
            "In which city does {name} live?",
            "Where does {name} live?",
            "{name} lives in what city?",
            "Name the city that is home to {name}.",
        ),
    ),
    "pet": (
        ("cat", "dog", "horse", "parrot", "rabbit", "goat", "owl", "turtle", "snake", "mouse", "duck", "fox"),
        (
            "What pet does {name} have?",
            "Which animal does {name} keep as a pet?",
            "{name}'s pet is what animal?",
            "Name the animal that {name} owns.",
        ),
    ),
    "job": (
        (
            "baker",
            "pilot",
            "doctor",
            "farmer",
            "teacher",
            "painter",
            "sailor",
            "miner",
            "nurse",
            "judge",
            "chef",
            "writer",
        ),
        (
            "What is the job of {name}?",
            "What does {name} work as?",
            "{name} works as what?",
            "Name the occupation of {name}.",
        ),
    ),
    "instrument": (
        ("piano", "violin", "drum", "flute", "guitar", "harp", "trumpet", "cello", "banjo", "organ", "oboe", "tuba"),
        (
            "Which instrument does {name} play?",
            "What instrument can {name} play?",
            "{name} plays which instrument?",
            "Name the instrument played by {name}.",
        ),
    ),
    "sport": (
        (
            "tennis",
            "golf",
            "chess",
            "soccer",
            "rugby",
            "hockey",
            "boxing",
            "skiing",
            "cricket",
            "rowing",
            "judo",
            "surfing",
        ),
        (
            "Which sport does {name} play?",
            "What sport does {name} practice?",
            "{name} plays which sport?",
            "Name the sport that {name} enjoys.",
        ),
    ),
}
FACT_FIELDS = (*FIELDS, "group")


def entity_names(n: int, rng: random.Random) -> list[str]:
    """``n`` distinct names of two different capitalised BIP-39 words."""
    vocab = words()
    if n > len(vocab) * (len(vocab) - 1) // 4:
        raise DataError(f"data.facts.num_entities={n} is more than the name space holds")
    seen: set[str] = set()
    names: list[str] = []
    while len(names) < n:
        first, last = rng.sample(vocab, 2)
        name = f"{first.capitalize()} {last.capitalize()}"
        if name not in seen:
            seen.add(name)
            names.append(name)
    return names


def build_facts_suite(seed: int, cfg: FactsConfig) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(train, test): ``num_entities x attributes x train_phrasings`` training records and one held-out
    query per fact. Deterministic in ``seed`` (``random.Random(f"{seed}:facts")``)."""
    if not 1 <= cfg.attributes <= len(ATTRIBUTES):
        raise DataError(f"data.facts.attributes must be 1..{len(ATTRIBUTES)}, got {cfg.attributes}")
    if not 1 <= cfg.train_phrasings <= HELD_OUT_PHRASING:
        raise DataError(f"data.facts.train_phrasings must be 1..{HELD_OUT_PHRASING}, got {cfg.train_phrasings}")
    if cfg.groups > cfg.num_entities:
        raise DataError(f"data.facts.groups ({cfg.groups}) exceeds data.facts.num_entities ({cfg.num_entities})")
    rng = random.Random(f"{seed}:facts")
    names = entity_names(cfg.num_entities, rng)
    attributes = list(ATTRIBUTES)[: cfg.attributes]
    train_rows: list[dict[str, str]] = []
    test_rows: list[dict[str, str]] = []
    for k, name in enumerate(names):
        group = f"group-{k % cfg.groups}"
        for attribute in attributes:
            values, phrasings = ATTRIBUTES[attribute]
            value = rng.choice(values)

            def row(phrasing: str) -> dict[str, str]:
                return {
                    "instruction": INSTRUCTION,
                    "input": phrasing.format(name=name),
                    "output": value,
                    "category": attribute,
                    "group": group,
                }

            train_rows.extend(row(phrasings[i]) for i in range(cfg.train_phrasings))
            test_rows.append(row(phrasings[HELD_OUT_PHRASING]))
    return shuffled_datasets(train_rows, test_rows, FACT_FIELDS, f"{seed}:facts-order")
