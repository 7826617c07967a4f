from __future__ import annotations

from prelort.data import IGNORE_INDEX, format_prompt, prompt_token_ids, tokenize_example, tokenize_for_training

RECORD = {
    "instruction": "What is the capital city of the given country? Answer with the city name only.",
    "input": "France",
    "output": "Paris",
    "category": "capital",
}


def test_chat_template_prompt(smol_tokenizer):
    prompt = format_prompt(RECORD, smol_tokenizer)
    expected = smol_tokenizer.apply_chat_template(
        [{"role": "user", "content": RECORD["instruction"] + "\n\nFrance"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt == expected
    assert prompt.endswith("<|im_start|>assistant\n")
    assert "<|im_start|>user\nWhat is the capital city" in prompt


def test_alpaca_prompt_without_chat_template(plain_tokenizer):
    prompt = format_prompt(RECORD, plain_tokenizer)
    assert prompt.startswith("Below is an instruction that describes a task, paired with an input")
    assert f"### Instruction:\n{RECORD['instruction']}\n\n### Input:\nFrance\n\n### Response:\n" in prompt
    no_input = format_prompt({**RECORD, "input": ""}, plain_tokenizer)
    assert "### Input" not in no_input and no_input.endswith("### Response:\n")


def test_labels_mask_exactly_the_prompt(smol_tokenizer):
    prompt_ids = prompt_token_ids(format_prompt(RECORD, smol_tokenizer), smol_tokenizer)
    response_ids = smol_tokenizer("Paris", add_special_tokens=False)["input_ids"]
    ex = tokenize_example(RECORD, smol_tokenizer, max_length=512)
    n = len(prompt_ids)
    assert ex["input_ids"] == prompt_ids + response_ids + [smol_tokenizer.eos_token_id]
    assert ex["labels"][:n] == [IGNORE_INDEX] * n
    assert ex["labels"][n:] == response_ids + [smol_tokenizer.eos_token_id]
    assert smol_tokenizer.decode(ex["input_ids"][n:]) == "Paris<|im_end|>"
    # the chat prompt brings its own special tokens: no extra BOS in front
    assert ex["input_ids"][0] == smol_tokenizer.convert_tokens_to_ids("<|im_start|>")


def test_truncation_keeps_the_response_and_cuts_the_prompt_from_the_left(smol_tokenizer):
    full = tokenize_example(RECORD, smol_tokenizer, max_length=512)
    n_response = sum(1 for x in full["labels"] if x != IGNORE_INDEX)
    ex = tokenize_example(RECORD, smol_tokenizer, max_length=12)
    assert len(ex["input_ids"]) == 12 == len(ex["labels"])
    assert ex["input_ids"] == full["input_ids"][-12:]
    assert sum(1 for x in ex["labels"] if x != IGNORE_INDEX) == n_response
    # a response longer than the limit keeps its first max_length - 1 tokens after one prompt token
    long = {**RECORD, "output": " ".join(["word"] * 50)}
    cut = tokenize_example(long, smol_tokenizer, max_length=10)
    long_response = smol_tokenizer(long["output"], add_special_tokens=False)["input_ids"]
    assert cut["labels"] == [IGNORE_INDEX] + long_response[:9]
    assert cut["input_ids"][1:] == long_response[:9]


def test_tokenize_for_training_on_a_dataset(plain_tokenizer):
    import datasets

    ds = datasets.Dataset.from_list([RECORD, {**RECORD, "input": "Japan", "output": "Tokyo"}])
    out = tokenize_for_training(ds, plain_tokenizer, max_length=256)
    assert len(out) == 2
    for record, ex in zip(ds, out):
        prompt_ids = prompt_token_ids(format_prompt(record, plain_tokenizer), plain_tokenizer)
        assert ex["input_ids"][: len(prompt_ids)] == prompt_ids
        assert ex["labels"].count(IGNORE_INDEX) == len(prompt_ids)
        assert ex["input_ids"][-1] == plain_tokenizer.eos_token_id == ex["labels"][-1]
        assert plain_tokenizer.decode(ex["labels"][len(prompt_ids) : -1]) == record["output"]
