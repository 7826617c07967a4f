"""Templates: map raw dataset records onto the four fields instruction / input / output / category.

Built in:
- ``alpaca``: instruction, input (optional), output; category from a ``category`` column if any.
- ``dolly``: instruction, context (optional), response, category (optional) - databricks-dolly-15k.
- ``natural-instructions``: definition, inputs, targets, task_name (optional) - the flattened
  Super-NaturalInstructions layout (e.g. Muennighoff/natural-instructions); ``targets`` may be a list
  (the first target is the answer) and ``definition`` a list of strings (joined).
- ``builtin``: the four fields as they are (the offline suite's layout).
``auto`` picks the template from the column names. Records whose output is empty are dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import datasets

FIELDS = ("instruction", "input", "output", "category")
TEMPLATES = ("alpaca", "dolly", "natural-instructions", "builtin")


class DataError(ValueError):
    """A data source, template or partitioning cannot be used; the message says why."""


# (required columns, optional columns) per template
_COLUMNS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "alpaca": (("instruction", "output"), ("input", "category")),
    "dolly": (("instruction", "response"), ("context", "category")),
    "natural-instructions": (("definition", "inputs", "targets"), ("task_name",)),
    "builtin": (FIELDS, ()),
}


def _text(value: Any) -> str:
    """A field value as a stripped string: None -> "", a list -> its first item (targets) or joined."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        items = [_text(v) for v in value]
        items = [v for v in items if v]
        return items[0] if items else ""
    return str(value).strip()


def _joined(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "\n".join(_text(v) for v in value if _text(v))
    return _text(value)


def _alpaca(row: dict[str, Any]) -> dict[str, str]:
    return {
        "instruction": _text(row["instruction"]),
        "input": _text(row.get("input")),
        "output": _text(row["output"]),
        "category": _text(row.get("category")) or "general",
    }


def _dolly(row: dict[str, Any]) -> dict[str, str]:
    return {
        "instruction": _text(row["instruction"]),
        "input": _text(row.get("context")),
        "output": _text(row["response"]),
        "category": _text(row.get("category")) or "general",
    }


def _natural_instructions(row: dict[str, Any]) -> dict[str, str]:
    return {
        "instruction": _joined(row["definition"]),
        "input": _text(row["inputs"]),
        "output": _text(row["targets"]),
        "category": _text(row.get("task_name")) or "natural-instructions",
    }


def _builtin(row: dict[str, Any]) -> dict[str, str]:
    return {name: _text(row[name]) for name in FIELDS}


_MAPPERS: dict[str, Callable[[dict[str, Any]], dict[str, str]]] = {
    "alpaca": _alpaca,
    "dolly": _dolly,
    "natural-instructions": _natural_instructions,
    "builtin": _builtin,
}


def _expected() -> str:
    return "; ".join(f"{name} ({', '.join(req)})" for name, (req, _) in _COLUMNS.items())


def detect_template(columns: list[str]) -> str:
    """The template whose required columns the dataset has (most specific first)."""
    present = set(columns)
    for name in ("builtin", "dolly", "natural-instructions", "alpaca"):
        if set(_COLUMNS[name][0]) <= present:
            return name
    raise DataError(
        f"cannot detect a template from the columns {sorted(present)}; expected the columns of one of: "
        f"{_expected()}. Name the template with data.template or rename the columns."
    )


def apply_template(dataset: datasets.Dataset, template: str = "auto") -> datasets.Dataset:
    """Map ``dataset`` to the columns instruction, input, output, category (all strings).

    Records with an empty output are dropped; a dataset left empty is an error.
    """
    if template == "auto":
        template = detect_template(dataset.column_names)
    if template not in _MAPPERS:
        raise DataError(f"unknown template {template!r}; choose auto or one of {', '.join(TEMPLATES)}")
    required = _COLUMNS[template][0]
    missing = [c for c in required if c not in dataset.column_names]
    if missing:
        raise DataError(
            f"template {template!r} needs the column(s) {', '.join(missing)}; "
            f"the dataset has {', '.join(dataset.column_names) or 'no columns'}"
        )
    mapper = _MAPPERS[template]
    mapped = dataset.map(mapper, remove_columns=dataset.column_names, desc=f"template {template}")
    # features: all four fields are strings even if the dataset was empty
    mapped = mapped.cast(datasets.Features({name: datasets.Value("string") for name in FIELDS}))
    mapped = mapped.filter(lambda row: bool(row["output"]), desc="drop empty outputs")
    if len(mapped) == 0:
        raise DataError(f"no record with a non-empty output after applying template {template!r}")
    return mapped
