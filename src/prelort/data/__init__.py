"""Data: sources, templates, prompts and tokenization, partitioning, and the builtin offline suite."""

from __future__ import annotations

from .builtin import CATEGORIES, INSTRUCTIONS, build_builtin_suite
from .partition import make_partitioner, partition
from .prompts import (
    IGNORE_INDEX,
    format_prompt,
    has_chat_template,
    prompt_token_ids,
    tokenize_example,
    tokenize_for_training,
)
from .sources import load_records
from .templates import FIELDS, TEMPLATES, DataError, apply_template, detect_template

__all__ = [
    "CATEGORIES",
    "FIELDS",
    "IGNORE_INDEX",
    "INSTRUCTIONS",
    "TEMPLATES",
    "DataError",
    "apply_template",
    "build_builtin_suite",
    "detect_template",
    "format_prompt",
    "has_chat_template",
    "load_records",
    "make_partitioner",
    "partition",
    "prompt_token_ids",
    "tokenize_example",
    "tokenize_for_training",
]
