"""Evaluation (docs/design.md section 4): every registered metric (:mod:`prelort.metrics`: exact match,
ROUGE-L F1, perplexity) on held-out responses, rank tiers.

- exact match, each example's ``correct`` verdict: ``normalize_answer(prediction) == normalize_answer(reference)``
  (SQuAD-style: lower case, accents folded, punctuation and the articles a/an/the removed, whitespace collapsed);
- the metrics are computed from the per-example results by :func:`prelort.metrics.compute` (accuracy: the
  share correct; ROUGE-L F1: :func:`rouge_l` averaged; perplexity: exp( sum of response-token NLL / number
  of response tokens ), pooled over the whole set).

Two modes (``eval.mode``, docs/evaluation.md): ``generate`` decodes greedily and scores the text;
``teacher_forced`` scores exact match from one forward pass over prompt + reference: an example is correct
when the argmax at every reference answer position, and then at the end-of-answer (EOS) position, is the
reference token - exactly when greedy decoding reproduces the reference tokens and stops. It has no
prediction text, so its ROUGE-L is None. ``auto`` picks teacher_forced when every evaluated reference has
at most :data:`SHORT_ANSWER_TOKENS` tokens. Either way the same forward pass gives perplexity and every
example's log-likelihood, and :func:`evaluate_examples` returns one verdict per example.
"""

from __future__ import annotations

import hashlib
import math
import re
import string
import unicodedata
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .config import EvalConfig
from .data.prompts import IGNORE_INDEX, format_prompt, prompt_token_ids, tokenize_for_training
from .metrics import EvalResults
from .metrics import compute as compute_metrics
from .metrics.rouge_l import rouge_l  # noqa: F401  (kept importable from here, beside exact_match)

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)
SUBSET_SEED = 0  # the evaluation subset is the same every round and tier
SHORT_ANSWER_TOKENS = 8  # eval.mode auto: teacher-forced when every reference has at most this many tokens


def normalize_answer(text: str) -> str:
    """Lower case, fold accents (Brasília -> brasilia), drop punctuation and a/an/the, collapse spaces."""
    text = unicodedata.normalize("NFKD", str(text).lower())
    text = "".join(ch for ch in text if not unicodedata.combining(ch))
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 if the normalised strings are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


@contextmanager
def _eval_mode(model: Any) -> Iterator[None]:
    """model.eval() inside, the caller's train/eval mode restored after."""
    was_training = bool(getattr(model, "training", False))
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    """The tokenizer's EOS plus any the model's generation config declares (chat models may have several)."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif isinstance(gen_eos, (list, tuple)):
        ids.update(int(i) for i in gen_eos)
    return ids


def _pad_id(tokenizer: Any) -> int:
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    raise ValueError("the tokenizer has neither a pad nor an EOS token")


@torch.inference_mode()
def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int,
    progress: tqdm | None = None,
) -> list[str]:
    """Greedy continuations of ``prompts`` (texts from ``format_prompt``), batched with left padding.

    Only the new tokens are decoded, cut at the first EOS, special tokens skipped, stripped.
    """
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size and max_new_tokens must be positive, got {batch_size}, {max_new_tokens}")
    device = _device(model)
    pad_id = _pad_id(tokenizer)
    eos_ids = _eos_ids(model, tokenizer)
    outputs: list[str] = []
    with _eval_mode(model):
        for start in range(0, len(prompts), batch_size):
            encoded = [prompt_token_ids(p, tokenizer) for p in prompts[start : start + batch_size]]
            width = max(len(ids) for ids in encoded)
            # left padding: every prompt ends at the last column, so new tokens line up
            input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in encoded], device=device)
            attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded], device=device)
            out = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                pad_token_id=pad_id,
                eos_token_id=sorted(eos_ids) or None,
            )
            for row in out[:, width:].tolist():
                cut = next((i for i, tok in enumerate(row) if tok in eos_ids), len(row))
                outputs.append(tokenizer.decode(row[:cut], skip_special_tokens=True).strip())
            if progress is not None:
                progress.update(len(encoded))
    return outputs


def _logits_at(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Logits (batch, len(keep), vocab) at the positions ``keep`` of every row."""
    try:
        return model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep).logits
    except TypeError:  # a model without logits_to_keep: compute all, then select
        return model(input_ids=input_ids, attention_mask=attention_mask).logits[:, keep, :]


@torch.inference_mode()
def perplexity(model: Any, examples: Sequence[Mapping[str, list[int]]], batch_size: int, pad_id: int) -> float:
    """exp(total NLL of the labelled tokens / their number) over ``examples`` from ``tokenize_for_training``.

    Label -100 marks tokens without loss (the prompt); the label at position i is the target predicted from
    positions < i (the usual causal shift).
    """
    if not examples:
        raise ValueError("perplexity of an empty set of examples")
    device = _device(model)
    total_nll = 0.0
    total_tokens = 0
    with _eval_mode(model):
        for start in range(0, len(examples), batch_size):
            input_ids, labels, attention_mask = _batch_tensors(examples[start : start + batch_size], pad_id)
            targets = labels[:, 1:]  # position p predicts token p + 1
            # only the positions that predict a response token go through the (vocabulary-wide) output layer
            keep = (targets != IGNORE_INDEX).any(dim=0).nonzero().flatten()
            if keep.numel() == 0:
                continue
            logits = _logits_at(model, input_ids.to(device), attention_mask.to(device), keep.to(device))
            nll = F.cross_entropy(
                logits.float().reshape(-1, logits.size(-1)),
                targets[:, keep].reshape(-1).to(device),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
            total_nll += float(nll)
            total_tokens += int((targets != IGNORE_INDEX).sum())
    if total_tokens == 0:
        raise ValueError("no response token to score (every label is -100)")
    return math.exp(total_nll / total_tokens)


def select_examples(records: Any, max_examples: int) -> list[dict[str, Any]]:
    """At most ``max_examples`` records: all of them, or a fixed seeded subset (kept in dataset order)."""
    n = len(records)
    if n <= max_examples:
        indices = list(range(n))
    else:
        indices = sorted(np.random.default_rng(SUBSET_SEED).choice(n, size=max_examples, replace=False).tolist())
    return [dict(records[i]) for i in indices]


def example_id(record: Mapping[str, Any]) -> str:
    """A stable id of an evaluated record: its ``id`` field if it has one, else a hash of its text fields
    (the same example gets the same id in every run, method and round)."""
    if record.get("id") not in (None, ""):
        return str(record["id"])
    text = "\x1f".join(str(record.get(k) or "") for k in ("instruction", "input", "output"))
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def _batch_tensors(batch: Sequence[Mapping[str, list[int]]], pad_id: int) -> tuple[torch.Tensor, ...]:
    """Right-padded input_ids, labels (IGNORE_INDEX on padding) and attention mask of a batch."""
    width = max(len(ex["input_ids"]) for ex in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, ex in enumerate(batch):
        n = len(ex["input_ids"])
        input_ids[i, :n] = torch.tensor(ex["input_ids"])
        labels[i, :n] = torch.tensor(ex["labels"])
        attention_mask[i, :n] = 1
    return input_ids, labels, attention_mask


@torch.inference_mode()
def score_examples(
    model: Any,
    examples: Sequence[Mapping[str, list[int]]],
    batch_size: int,
    pad_id: int,
    eos_ids: set[int] | None = None,
    progress: tqdm | None = None,
) -> list[dict[str, Any]]:
    """One teacher-forced forward pass per batch; per example ``{"correct", "loglik", "n_tokens"}``.

    ``examples`` come from ``tokenize_for_training`` (response tokens + EOS labelled, the rest -100).
    ``loglik``: sum of the log-probabilities of the labelled tokens; ``correct``: 1 when the argmax at every
    labelled position is the label, where at the last labelled position (the EOS) any id of ``eos_ids``
    counts (generation stops at any of them), else 0. ``progress`` is advanced by the examples scored.
    """
    device = _device(model)
    out: list[dict[str, Any]] = []
    with _eval_mode(model):
        for start in range(0, len(examples), batch_size):
            batch = examples[start : start + batch_size]
            input_ids, labels, attention_mask = _batch_tensors(batch, pad_id)
            targets = labels[:, 1:]  # position p predicts token p + 1
            # only positions that predict a response token go through the (vocabulary-wide) output layer
            keep = (targets != IGNORE_INDEX).any(dim=0).nonzero().flatten()
            if keep.numel() == 0:
                out.extend({"correct": 0, "loglik": 0.0, "n_tokens": 0} for _ in batch)
                continue
            logits = _logits_at(model, input_ids.to(device), attention_mask.to(device), keep.to(device)).float()
            kept = targets[:, keep].to(device)
            mask = kept != IGNORE_INDEX
            logprobs = torch.log_softmax(logits, dim=-1)
            token_lp = logprobs.gather(-1, kept.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
            argmax = logits.argmax(dim=-1)
            hit = (argmax == kept) | ~mask
            if eos_ids:
                last = mask.long().cumsum(dim=1).argmax(dim=1)  # the last labelled column of each row
                rows = torch.arange(len(batch), device=device)
                eos = torch.tensor(sorted(eos_ids), device=device)
                stops = torch.isin(argmax[rows, last], eos) & torch.isin(kept[rows, last], eos)
                hit[rows, last] = hit[rows, last] | stops
            for i in range(len(batch)):
                n = int(mask[i].sum())
                out.append(
                    {"correct": int(n > 0 and bool(hit[i].all())), "loglik": float(token_lp[i].sum()), "n_tokens": n}
                )
            if progress is not None:
                progress.update(len(batch))
    return out


def resolve_mode(cfg: EvalConfig, examples: Sequence[Mapping[str, list[int]]]) -> str:
    """teacher_forced or generate: ``cfg.mode``, with auto resolved by the reference lengths (EOS not counted)."""
    if cfg.mode != "auto":
        return cfg.mode
    longest = max(sum(1 for t in ex["labels"] if t != IGNORE_INDEX) - 1 for ex in examples)
    return "teacher_forced" if longest <= SHORT_ANSWER_TOKENS else "generate"


def evaluate_examples(
    model: Any,
    tokenizer: Any,
    records: Any,
    cfg: EvalConfig,
    max_length: int,
    *,
    progress: bool = False,
    desc: str = "eval",
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``(metrics, examples)`` of ``model`` on (a fixed subset of) ``records``.

    metrics: every registered metric (:func:`prelort.metrics.names`: "accuracy", "rougeL" (None under
    teacher_forced), "perplexity", ...), then "n", "mode", "category_accuracy" ({category: accuracy});
    examples: one dict per evaluated record in subset order, {"id", "category", "correct", "loglik", "n_tokens", "prediction" (None under teacher_forced)}.
    The model is put in eval mode for the evaluation (its train/eval mode is restored after); any
    truncation mask the caller set stays as it is. ``progress``: a tqdm bar over the examples.
    """
    chosen = select_examples(records, cfg.max_examples)
    if not chosen:
        raise ValueError("no record to evaluate")
    tokenized = tokenize_for_training(chosen, tokenizer, max_length)
    mode = resolve_mode(cfg, tokenized)
    bar = tqdm(
        total=len(chosen) * (2 if mode == "generate" else 1), desc=desc, unit="ex", leave=False, disable=not progress
    )
    try:
        scores = score_examples(
            model, tokenized, cfg.batch_size, _pad_id(tokenizer), _eos_ids(model, tokenizer), progress=bar
        )
        predictions: list[str | None] = [None] * len(chosen)
        if mode == "generate":
            prompts = [format_prompt(r, tokenizer) for r in chosen]
            predictions = list(generate(model, tokenizer, prompts, cfg.max_new_tokens, cfg.batch_size, progress=bar))
            for score, p, r in zip(scores, predictions, chosen):
                score["correct"] = int(exact_match(p or "", str(r["output"])))
    finally:
        bar.close()
    if sum(s["n_tokens"] for s in scores) == 0:
        raise ValueError("no response token to score (every label is -100)")
    examples = [
        {
            "id": example_id(r),
            "category": str(r.get("category") or ""),
            "correct": s["correct"],
            "loglik": s["loglik"],
            "n_tokens": s["n_tokens"],
            "prediction": p,
        }
        for r, s, p in zip(chosen, scores, predictions)
    ]
    by_category: dict[str, list[int]] = {}
    for ex in examples:
        by_category.setdefault(ex["category"], []).append(ex["correct"])
    metrics = {
        **compute_metrics(EvalResults(mode=mode, records=chosen, examples=examples)),
        "n": len(examples),
        "mode": mode,
        "category_accuracy": {c: sum(v) / len(v) for c, v in sorted(by_category.items())},
    }
    return metrics, examples


def evaluate_model(model: Any, tokenizer: Any, records: Any, cfg: EvalConfig, max_length: int) -> dict[str, Any]:
    """The metrics of :func:`evaluate_examples` (every registered metric, "n", "mode", "category_accuracy")
    without the per-example verdicts."""
    return evaluate_examples(model, tokenizer, records, cfg, max_length)[0]


def truncation_tiers(max_rank: int) -> list[int]:
    """1, 2, 4, ... below ``max_rank``, then ``max_rank`` itself."""
    if max_rank < 1:
        raise ValueError(f"max rank must be positive, got {max_rank}")
    tiers = []
    t = 1
    while t < max_rank:
        tiers.append(t)
        t *= 2
    tiers.append(max_rank)
    return tiers
