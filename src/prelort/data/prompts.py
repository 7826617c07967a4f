"""Prompts and training tokenization; the same prompt is used for training and for evaluation.

A tokenizer with a chat template gets the user turn through ``apply_chat_template(...,
add_generation_prompt=True)``; one without gets an Alpaca-style text prompt. The prompt's token ids come
from :func:`prompt_token_ids` in both training and generation, so the model is evaluated on exactly the
prompt tokens it was trained on.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

IGNORE_INDEX = -100  # label of tokens that carry no loss (torch cross_entropy's default ignore_index)

_ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
_ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def user_message(record: Mapping[str, Any]) -> str:
    """The user turn: the instruction, then the input (if any) after a blank line."""
    instruction = str(record.get("instruction") or "").strip()
    inp = str(record.get("input") or "").strip()
    return f"{instruction}\n\n{inp}" if inp else instruction


def format_prompt(record: Mapping[str, Any], tokenizer: Any) -> str:
    """The prompt text for ``record`` (everything before the response)."""
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": user_message(record)}], add_generation_prompt=True, tokenize=False
        )
    instruction = str(record.get("instruction") or "").strip()
    inp = str(record.get("input") or "").strip()
    if inp:
        return _ALPACA_WITH_INPUT.format(instruction=instruction, input=inp)
    return _ALPACA_NO_INPUT.format(instruction=instruction)


def prompt_token_ids(prompt: str, tokenizer: Any) -> list[int]:
    """Token ids of a prompt from :func:`format_prompt`.

    A chat-templated prompt already holds its special tokens (BOS etc.), so none are added; a plain
    prompt gets the tokenizer's usual special tokens.
    """
    return list(tokenizer(prompt, add_special_tokens=not has_chat_template(tokenizer))["input_ids"])


def eos_id(tokenizer: Any) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; responses must end with one")
    return int(tokenizer.eos_token_id)


def tokenize_example(record: Mapping[str, Any], tokenizer: Any, max_length: int) -> dict[str, list[int]]:
    """One training example: prompt tokens (label -100) then response tokens + EOS (labels = ids).

    Longer than ``max_length``: the response keeps up to ``max_length - 1`` tokens (cut on the right) and
    the prompt is cut from the left to fill the rest, so at least one prompt token precedes the response
    (the first token of a sequence is never a prediction target).
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    prompt_ids = prompt_token_ids(format_prompt(record, tokenizer), tokenizer)
    response_ids = list(tokenizer(str(record["output"]), add_special_tokens=False)["input_ids"]) + [eos_id(tokenizer)]
    response_ids = response_ids[: max_length - 1]
    room = max_length - len(response_ids)
    prompt_ids = prompt_ids[-room:] if len(prompt_ids) > room else prompt_ids
    return {
        "input_ids": prompt_ids + response_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + response_ids,
    }


def tokenize_for_training(
    records: Iterable[Mapping[str, Any]], tokenizer: Any, max_length: int
) -> list[dict[str, list[int]]]:
    """:func:`tokenize_example` for every record (a ``datasets.Dataset`` iterates as dicts)."""
    return [tokenize_example(record, tokenizer, max_length) for record in records]
