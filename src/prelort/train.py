"""One client's local training: the prefix-nested objective over a PEFT LoRA of the global rank.

With T = plan.truncations and the adapter masked to t (``LoraAdapter.set_truncation``), each optimizer
step minimises (docs/design.md section 2)

    all:       L = (1/|T|) * sum_{t in T} loss_t              (|T| forward/backward passes)
    sample:    L = loss_t,  t ~ Uniform(T)                    (one pass; unbiased for `all` up to scale)
    sample_width: L = loss_t, P(t) = (t - t_prev) / r          (one pass; t_prev the boundary below t: the
               segment of a uniformly drawn dimension, so the top segment is not starved; a variant)
    sandwich:  L = (loss_r + loss_t) / 2,  t ~ Uniform(T \\ {r}), r = plan.rank  (just loss_r if T = {r})
    cycle:     L = loss_t,  t = (r, t_1, t_2, ...)[s mod |T|]  (one pass; step s of the round, t_1 < t_2 < ... the
               truncations below r: deterministic, the top segment first, every segment on a fixed count of steps)
    off:       L = loss_r                                      (plain LoRA at the client's rank)

where loss_t is the mean cross-entropy over response tokens (labels != -100) of the micro-batch with the
adapter truncated to t. The method's part (:meth:`Method.local_training`, a
:class:`~prelort.methods.LocalTraining` built from the plan) may add a penalty to every step's objective,
and decides at the end the rank the update is sent at and the metadata fields it adds.

Only the LoRA factors are optimised (AdamW, fresh each call); the base model stays frozen.

Dimensions outside a step's objective do not move. A step whose truncations all stop at t < plan.rank
gives dimensions t..rank-1 a zero gradient, but AdamW would still move them (its momentum and weight
decay), blindly and by about lr per step: under ``sample`` the top segment would then drift on the
three steps in four that never look at it. So such a step restores those slices of the factors and of
the optimizer's moments afterwards ("lazy" Adam, as in SparseAdam): dimension i changes only on steps
whose objective contains a truncation t > i.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from peft import PeftModel
from torch import Tensor

from .adapters import LoraAdapter
from .config import TrainConfig
from .data.prompts import IGNORE_INDEX
from .methods.base import NESTED_MODES, LocalTraining, TrainPlan

__all__ = ["TrainResult", "collate", "lr_scheduler", "rank_lr", "response_loss", "train_client"]


@dataclass
class TrainResult:
    """A client's round result: its adapter at its final rank and what happened."""

    tensors: dict[str, Tensor]
    rank: int
    num_examples: int
    losses: list[float]
    meta: dict[str, Any] = field(default_factory=dict)


def collate(batch: Sequence[dict], pad_id: int) -> dict[str, Tensor]:
    """Right-pad a list of {"input_ids", "labels"} to the longest; labels are -100 on padding.

    Returns ``input_ids``, ``attention_mask`` (1 on real tokens) and ``labels`` as (n, L) int64 tensors.
    """
    if not batch:
        raise ValueError("cannot collate an empty batch")
    for i, ex in enumerate(batch):
        if "input_ids" not in ex or "labels" not in ex:
            raise ValueError(f"example {i} needs 'input_ids' and 'labels', has {sorted(ex)}")
        if len(ex["input_ids"]) != len(ex["labels"]):
            raise ValueError(
                f"example {i}: input_ids has {len(ex['input_ids'])} tokens but labels has {len(ex['labels'])}"
            )
        if len(ex["input_ids"]) == 0:
            raise ValueError(f"example {i} has no tokens")
    n, width = len(batch), max(len(ex["input_ids"]) for ex in batch)
    input_ids = torch.full((n, width), int(pad_id), dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    for i, ex in enumerate(batch):
        k = len(ex["input_ids"])
        input_ids[i, :k] = torch.as_tensor(ex["input_ids"], dtype=torch.long)
        labels[i, :k] = torch.as_tensor(ex["labels"], dtype=torch.long)
        attention_mask[i, :k] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def response_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean next-token cross-entropy over the positions whose label is not -100.

    loss = sum_{i: y_{i+1} != -100} CE(logits_i, y_{i+1}) / max(1, #such positions); a batch with no
    response token gives 0 (still attached to the graph, so backward is harmless).
    """
    # shift the labels, not the logits: slicing the (n, L, vocab) logits would copy them
    shift_labels = torch.cat([labels[:, 1:], labels.new_full((labels.size(0), 1), IGNORE_INDEX)], dim=1)
    flat = logits.reshape(-1, logits.size(-1))
    total = F.cross_entropy(
        flat if flat.dtype == torch.float32 else flat.float(),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    count = (shift_labels != IGNORE_INDEX).sum()
    return total / count.clamp(min=1)


def batch_response_loss(model, batch: dict[str, Tensor]) -> Tensor:
    """:func:`response_loss` of the model on a collated batch, with the vocabulary-wide output layer
    evaluated only at the positions that predict a response token (``logits_to_keep``): prompt
    positions carry no loss, and on small models the output layer dominates the cost of a step."""
    targets = batch["labels"][:, 1:]  # position p predicts token p + 1
    keep = (targets != IGNORE_INDEX).any(dim=0).nonzero().flatten()
    if keep.numel() == 0:  # no response token: the plain path returns a graph-attached zero
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return response_loss(logits, batch["labels"])
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep).logits
    picked = targets[:, keep]
    total = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), picked.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return total / (picked != IGNORE_INDEX).sum().clamp(min=1)


def rank_lr(cfg: TrainConfig, rank: int) -> float:
    """The base learning rate of a client training rank ``rank``: ``cfg.lr``, or under ``lr_rank_scaling:
    sqrt`` ``cfg.lr * sqrt(cfg.lr_reference_rank / rank)``, so that the size of a step of s B A, which grows
    with the rank at a fixed scale s = alpha / R, stays about the same across ranks (rsLoRA, Kalajdzievski
    2023, argues the sqrt)."""
    if cfg.lr_rank_scaling == "none":
        return cfg.lr
    if cfg.lr_rank_scaling == "sqrt":
        return cfg.lr * math.sqrt(cfg.lr_reference_rank / rank)
    raise ValueError(f"unknown lr_rank_scaling {cfg.lr_rank_scaling!r} (none or sqrt)")


def lr_scheduler(
    optimizer: torch.optim.Optimizer, schedule: str, total: int, warmup: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning-rate schedule of ``total`` local optimizer steps, from transformers: a linear warm-up over
    ``warmup`` steps, then constant or a cosine decay. Step s (0-based) trains at factor

        warm-up (s < warmup): (s + 1) / (warmup + 1);  then constant: 1,  cosine: 0.5 * (1 + cos(pi * (s - warmup) / (total - warmup)))

    That is the library's schedule of ``warmup + 1`` warm-up and ``total + 1`` steps, started one step in
    (``last_epoch=0``): the library's own step 0 trains at lr 0, a step a client's few local steps per round
    cannot spare.
    """
    from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])  # what a scheduler starting at last_epoch >= 0 scales
    if schedule == "constant":
        return get_constant_schedule_with_warmup(optimizer, warmup + 1, last_epoch=0)
    if schedule == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, warmup + 1, total + 1, last_epoch=0)
    raise ValueError(f"unknown lr schedule {schedule!r} (constant or cosine)")


def _check_plan(adapter: LoraAdapter, plan: TrainPlan) -> list[int]:
    if plan.mode not in NESTED_MODES:
        raise ValueError(f"unknown nested mode {plan.mode!r}; expected one of {', '.join(NESTED_MODES)}")
    loaded = adapter.active_rank
    if plan.rank != loaded:
        raise ValueError(
            f"plan.rank is {plan.rank} but the model's adapter is loaded at rank {loaded}; "
            "load the starting adapter at plan.rank first (LoraAdapter.load_state / apply_broadcast)"
        )
    ts = sorted({int(t) for t in plan.truncations} | {plan.rank})
    bad = [t for t in ts if not 1 <= t <= plan.rank]
    if bad:
        raise ValueError(f"truncations {bad} outside [1, {plan.rank}] (plan.rank)")
    return ts


def _inactive_slices(pairs: list[tuple[Tensor, Tensor]], t: int):
    """The (parameter, index) pairs of dimensions >= t: rows of A (r x d_in), columns of B (d_out x r)."""
    rows, cols = (slice(t, None), slice(None)), (slice(None), slice(t, None))
    for a, b in pairs:
        yield a, rows
        yield b, cols


def _snapshot_inactive(optimizer: torch.optim.Optimizer, pairs: list[tuple[Tensor, Tensor]], t: int) -> list:
    """Copies of the dimensions >= t of every factor and of its AdamW moments (None: no state yet)."""
    saved = []
    for p, idx in _inactive_slices(pairs, t):
        state = optimizer.state.get(p) or {}
        moments = {k: v[idx].clone() for k, v in state.items() if torch.is_tensor(v) and v.shape == p.shape}
        saved.append((p, idx, p.detach()[idx].clone(), moments if state else None))
    return saved


def _restore_inactive(optimizer: torch.optim.Optimizer, saved: list) -> None:
    with torch.no_grad():
        for p, idx, value, moments in saved:
            p[idx] = value
            for k, v in optimizer.state[p].items():
                if torch.is_tensor(v) and v.shape == p.shape:
                    v[idx] = 0 if moments is None else moments[k]


def _step_truncations(mode: str, ts: list[int], rank: int, rng: random.Random, step: int) -> list[int]:
    """The truncations optimizer step ``step`` (0-based, within the round) takes its loss at under nested ``mode``
    (module doc); ``ts`` sorted, ending at ``rank``. Every mode of :data:`NESTED_MODES` is named here; any other
    is refused."""
    if mode == "off":
        return [rank]
    if mode == "all":
        return list(ts)
    if mode == "sample":
        return [rng.choice(ts)]
    if mode == "sample_width":
        # P(t) = (t - previous boundary) / rank: the segment of a uniformly drawn dimension
        widths = [t - prev for prev, t in zip([0, *ts[:-1]], ts)]
        return rng.choices(ts, weights=widths)
    if mode == "sandwich":
        rest = [t for t in ts if t != rank]
        return [rank, rng.choice(rest)] if rest else [rank]
    if mode == "cycle":
        # the client's rank first (the top segment is not left to a late cold step), then ascending
        order = [rank, *(t for t in ts if t != rank)]
        return [order[step % len(order)]]
    raise ValueError(f"unknown nested mode {mode!r}; expected one of {', '.join(NESTED_MODES)}")


class _Cycler:
    """Endless seeded shuffles of range(n): each pass is a fresh permutation."""

    def __init__(self, n: int, generator: torch.Generator):
        self.n, self.g, self.order, self.pos = n, generator, [], 0

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.pos >= len(self.order):
                self.order, self.pos = torch.randperm(self.n, generator=self.g).tolist(), 0
            m = min(k - len(out), len(self.order) - self.pos)
            out.extend(self.order[self.pos : self.pos + m])
            self.pos += m
        return out


def dim_warmup_factors(dim_steps: Sequence[int], warmup: int) -> list[float]:
    """Per rank dimension, the fraction of AdamW's step it takes: j / (warmup + 1) at its j-th step of the
    round (``dim_steps``: the steps that reached it, this one included) while j <= warmup, else 1."""
    return [j / (warmup + 1) if 0 < j <= warmup else 1.0 for j in dim_steps]


def _scale_step(pairs: list[tuple[Tensor, Tensor]], before: list[Tensor], factors: list[float]) -> None:
    """Each factor moved by ``factors[i]`` of this step's change along rank dimension i (rows of A, columns of
    B); the moments keep the whole step, as under a learning-rate warm-up. The factors cover the client's rank;
    the adapter may hold more dimensions (a client below the federation's largest rank trains the prefix of
    an adapter allocated at that rank), and those are left as the step left them."""
    with torch.no_grad():
        held = before[0].shape[0]
        f = torch.tensor(factors[:held] + [1.0] * (held - len(factors)), dtype=before[0].dtype, device=before[0].device)
        for (a, b), a0, b0 in zip(pairs, before[0::2], before[1::2]):
            a.copy_(a0 + f[:, None] * (a - a0))
            b.copy_(b0 + f[None, :] * (b - b0))


def _guarded_adamw_step(
    optimizer: torch.optim.Optimizer,
    pairs: list[tuple[Tensor, Tensor]],
    top: int,
    rank: int,
    all_dims_in_objective: bool,
    dim_steps: list[int],
    dim_warmup: int = 0,
) -> None:
    """``optimizer.step()`` with the lazy-Adam guard (module doc): when the step's largest truncation ``top``
    is below ``rank`` and nothing else reaches the tail (the method's penalty may: ``all_dims_in_objective``),
    dimensions >= top and their AdamW moments are restored afterwards. Counts in ``dim_steps`` each dimension
    the step changed; ``dim_warmup`` > 0 scales a dimension's first steps of the round
    (:func:`dim_warmup_factors`)."""
    frozen = _snapshot_inactive(optimizer, pairs, top) if top < rank and not all_dims_in_objective else None
    for i in range(top if frozen is not None else rank):
        dim_steps[i] += 1
    factors = dim_warmup_factors(dim_steps, dim_warmup) if dim_warmup else None
    before = [p.detach().clone() for pair in pairs for p in pair] if factors and min(factors) < 1 else None
    optimizer.step()
    if frozen is not None:
        _restore_inactive(optimizer, frozen)
    if before is not None:
        _scale_step(pairs, before, factors)


@dataclass
class _LocalOptimizer:
    """One client's optimizer, created afresh by each :func:`train_client` call: AdamW over the LoRA factors
    (``params``; ``pairs``: the (A, B) of each adapted module) and its learning-rate schedule."""

    params: list[Tensor]
    pairs: list[tuple[Tensor, Tensor]]
    adamw: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler

    @classmethod
    def of(cls, adapter: LoraAdapter, cfg: TrainConfig, lr: float) -> _LocalOptimizer:
        params = adapter.parameters()
        pairs = adapter.factor_pairs()
        for p in params:
            p.requires_grad_(True)
        adamw = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
        scheduler = lr_scheduler(adamw, cfg.schedule, cfg.local_steps, cfg.warmup_steps)
        return cls(params, pairs, adamw, scheduler)


def _train_step(
    adapter: LoraAdapter,
    next_batch: Callable[[], dict[str, Tensor]],
    step_ts: list[int],
    plan: TrainPlan,
    cfg: TrainConfig,
    optim: _LocalOptimizer,
    local: LocalTraining,
    counts: dict[int, int],
    dim_steps: list[int],
) -> float:
    """One optimizer step of the nested objective: ``cfg.grad_accum`` micro-batches, each with one
    forward/backward per truncation in ``step_ts`` (weights summing to 1), then the method's penalty, gradient
    clipping and the guarded AdamW step. Returns the step's loss (the weighted mean over those passes)."""
    weight = 1.0 / (len(step_ts) * cfg.grad_accum)
    step_loss = 0.0
    for _ in range(cfg.grad_accum):
        batch = next_batch()
        for t in step_ts:
            counts[t] += 1
            adapter.set_truncation(t)
            loss = batch_response_loss(adapter.model, batch)
            (loss * weight).backward()
            step_loss += float(loss.detach()) * weight
    adapter.set_truncation(plan.rank)
    penalty = local.penalty(optim.pairs)
    if penalty is not None:
        penalty.backward()
    if cfg.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(optim.params, cfg.max_grad_norm)
    _guarded_adamw_step(
        optim.adamw, optim.pairs, max(step_ts), plan.rank, local.penalty_moves_all_dims, dim_steps, cfg.dim_warmup_steps
    )
    optim.scheduler.step()
    optim.adamw.zero_grad(set_to_none=True)
    return step_loss


def train_client(
    model: PeftModel,
    examples: Sequence[dict],
    plan: TrainPlan,
    cfg: TrainConfig,
    seed: int,
    progress: bool = False,
    local: LocalTraining | None = None,
) -> TrainResult:
    """Run ``cfg.local_steps`` AdamW steps of the nested objective on ``examples``; see the module doc.
    ``local``: the method's part (:meth:`Method.local_training` of ``plan``; None: nothing added).

    The caller has loaded the starting adapter at ``plan.rank``. Deterministic for a given seed (data
    order, sampled truncations and dropout all derive from it). Leaves the model at truncation
    plan.rank and in the train/eval mode it had.
    """
    if len(examples) == 0:
        raise ValueError("client has no training examples")
    adapter = LoraAdapter(model)
    ts = _check_plan(adapter, plan)
    device = next(iter(adapter.parameters())).device
    pad_id = model.config.pad_token_id
    if pad_id is None:
        pad_id = model.config.eos_token_id if isinstance(model.config.eos_token_id, int) else 0

    optim = _LocalOptimizer.of(adapter, cfg, rank_lr(cfg, plan.rank))
    data_gen = torch.Generator().manual_seed(seed)
    cycler = _Cycler(len(examples), data_gen)
    pick = random.Random(seed)
    local = local if local is not None else LocalTraining()

    def next_batch() -> dict[str, Tensor]:
        batch = collate([examples[i] for i in cycler.take(cfg.batch_size)], pad_id)
        return {k: v.to(device) for k, v in batch.items()}

    losses: list[float] = []
    counts = {t: 0 for t in ts}
    dim_steps = [0] * plan.rank  # optimizer steps that changed dimension i (see the module doc)
    was_training = model.training
    started = time.perf_counter()
    fork_devices = [device] if device.type == "cuda" else []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.local_steps, desc=f"train r={plan.rank} {plan.mode}", leave=False)
    try:
        with torch.random.fork_rng(devices=fork_devices):
            torch.manual_seed(seed)  # LoRA dropout draws from the global RNG
            model.train()
            local.round_starts(optim.pairs)
            for step in range(cfg.local_steps):
                step_ts = _step_truncations(plan.mode, ts, plan.rank, pick, step)
                step_loss = _train_step(adapter, next_batch, step_ts, plan, cfg, optim, local, counts, dim_steps)
                if not math.isfinite(step_loss):
                    raise FloatingPointError(f"training loss became {step_loss} at step {step} (lower train.lr?)")
                losses.append(step_loss)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{step_loss:.4f}")
            local.round_ends(optim.pairs)
    finally:
        if bar is not None:
            bar.close()
        adapter.set_truncation(plan.rank)
        model.train(was_training)

    meta: dict[str, Any] = {
        "loss": losses[-1],
        "mean_loss": sum(losses) / len(losses),
        "steps": cfg.local_steps,
        "mode": plan.mode,
        "truncations": ts,
        "passes_per_truncation": {str(t): c for t, c in counts.items()},
        # forward/backward passes of a micro-batch, and per rank dimension the steps that reached it
        "passes": sum(counts.values()),
        "dim_steps": dim_steps,
        "seconds": time.perf_counter() - started,
    }
    final_rank = local.finish(plan.rank, meta)
    if type(final_rank) is not int or not 1 <= final_rank <= plan.rank:
        raise ValueError(f"the method's local training sends rank {final_rank!r}, not in [1, {plan.rank}]")
    return TrainResult(
        tensors=adapter.read_state(final_rank),
        rank=final_rank,
        num_examples=len(examples),
        losses=losses,
        meta=meta,
    )
