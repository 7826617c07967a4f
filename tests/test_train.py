"""Local training on tiny-llama: collate, loss, schedule, nested modes, determinism, HetLoRA pruning."""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch

from prelort import adapters
from prelort.adapters import LoraAdapter
from prelort.config import TrainConfig
from prelort.methods.base import NESTED_MODES, FederationSpec, LocalTraining, TrainPlan, lora_init
from prelort.methods.hetlora import SelfPruning
from prelort.train import (
    _step_truncations,
    batch_response_loss,
    collate,
    dim_warmup_factors,
    lr_scheduler,
    rank_lr,
    response_loss,
    train_client,
)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
R = 8


def pattern_examples(n: int, seed: int) -> list[dict]:
    """A learnable task: the category token that opens the prompt fixes the 4-token response."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        c = rng.randrange(4)
        prompt = [1000 + c] + [rng.randrange(2000, 3000) for _ in range(5)]
        response = [4000 + 10 * c + j for j in range(4)]
        out.append({"input_ids": prompt + response, "labels": [-100] * len(prompt) + response})
    return out


EXAMPLES = pattern_examples(16, 0)


def fresh_lora(base, rank: int = R, alpha: float = 16.0, start_rank: int = R, seed: int = 0, dropout: float = 0.0):
    model = adapters.attach_lora(copy.deepcopy(base), TARGETS, rank, alpha, dropout=dropout)
    spec = FederationSpec(modules=LoraAdapter(model).modules, client_ranks=(2, rank), alpha=alpha)
    LoraAdapter(model).load_state(lora_init(spec, start_rank, torch.Generator().manual_seed(seed)), start_rank)
    return model


def batch_loss(model, examples, t: int) -> float:
    b = collate(examples, 0)
    with torch.no_grad(), LoraAdapter(model).truncated(t):
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        return float(response_loss(out, b["labels"]))


def test_collate_pads_right_and_masks_labels():
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [9], "labels": [9]}], pad_id=2)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [9, 2, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [9, -100, -100]]
    with pytest.raises(ValueError, match="example 0: input_ids has 2 tokens but labels has 1"):
        collate([{"input_ids": [1, 2], "labels": [1]}], 0)
    with pytest.raises(ValueError, match="needs 'input_ids' and 'labels'"):
        collate([{"input_ids": [1]}], 0)


def test_response_loss_counts_only_response_tokens():
    torch.manual_seed(0)
    logits = torch.randn(1, 4, 10)
    labels = torch.tensor([[-100, -100, 3, 7]])
    # position i predicts label i+1: positions 1 and 2 predict tokens 3 and 7
    want = (torch.nn.functional.cross_entropy(logits[0, 1:3], torch.tensor([3, 7]))).item()
    assert response_loss(logits, labels).item() == pytest.approx(want, rel=1e-6)
    none = response_loss(logits.requires_grad_(), torch.full((1, 4), -100))
    assert none.item() == 0.0
    none.backward()  # no NaN, no error


def _factor_before_transformers(step: int, total: int, schedule: str, warmup: int) -> float:
    """prelort's hand-written schedule before it came from transformers: the schedule must not have changed."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
@pytest.mark.parametrize("total, warmup", [(1, 0), (10, 0), (10, 3), (4, 4), (3, 5)])
def test_lr_schedule(schedule, total, warmup):
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    scheduler = lr_scheduler(optimizer, schedule, total, warmup)
    lrs = []
    for _ in range(total):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.5 * _factor_before_transformers(s, total, schedule, warmup) for s in range(total)])
    assert min(lrs) > 0  # no step at lr 0 (the library's own first warm-up step)


def test_lr_schedule_by_hand():
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = lr_scheduler(optimizer, "cosine", 10, 3)
    lrs = [optimizer.param_groups[0]["lr"]]
    for _ in range(9):
        optimizer.step()
        scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[9] == pytest.approx(0.5 * (1 + math.cos(math.pi * 6 / 7)))
    with pytest.raises(ValueError, match="schedule"):
        lr_scheduler(optimizer, "linear", 1, 0)


def test_training_lowers_the_loss_and_reports(tiny_model):
    base, _ = tiny_model
    model = fresh_lora(base)
    before = batch_loss(model, EXAMPLES, R)
    cfg = TrainConfig(local_steps=8, batch_size=4, grad_accum=2, lr=5e-2, schedule="cosine", warmup_steps=1)
    res = train_client(model, EXAMPLES, TrainPlan(rank=R, truncations=(R,), mode="off"), cfg, seed=0)
    after = batch_loss(model, EXAMPLES, R)
    assert after < before - 0.3
    assert res.rank == R and res.num_examples == len(EXAMPLES) and len(res.losses) == 8
    assert res.meta["steps"] == 8 and res.meta["loss"] == res.losses[-1]
    assert set(res.tensors) == set(LoraAdapter(model).read_state(R))
    a = res.tensors["model.layers.0.self_attn.q_proj.lora_A"]
    assert a.shape == (R, 64) and a.dtype == torch.float32 and not a.requires_grad
    # base weights never train
    for name, p in model.named_parameters():
        if "lora_" not in name:
            assert torch.equal(
                p, dict(base.named_parameters())[name.replace("base_model.model.", "").replace(".base_layer", "")]
            )
    assert LoraAdapter(model).truncation == R and not model.training


def test_nested_all_makes_the_prefix_useful_where_off_does_not(tiny_model):
    """Mode `all` trains the rank-2 truncation directly; plain LoRA (`off`) only trains rank 8."""
    base, _ = tiny_model
    cfg = TrainConfig(local_steps=16, batch_size=4, lr=5e-2)
    results = {}
    for mode in ("off", "all"):
        model = fresh_lora(base)
        start = batch_loss(model, EXAMPLES, 2)
        res = train_client(model, EXAMPLES, TrainPlan(rank=R, truncations=(2, R), mode=mode), cfg, seed=1)
        results[mode] = batch_loss(model, EXAMPLES, 2)
        assert res.meta["passes_per_truncation"] == ({"2": 0, "8": 16} if mode == "off" else {"2": 16, "8": 16})
    assert results["all"] < start
    assert results["all"] < results["off"] - 0.3


def test_same_seed_gives_a_bit_identical_update(tiny_model):
    """Data order, the sampled truncation and LoRA dropout all follow the seed."""
    base, _ = tiny_model
    cfg = TrainConfig(local_steps=2, batch_size=2, grad_accum=2, lr=1e-2)
    plan = TrainPlan(rank=4, truncations=(1, 2, 4), mode="sandwich")
    runs = [train_client(fresh_lora(base, start_rank=4, dropout=0.1), EXAMPLES, plan, cfg, seed=s) for s in (5, 5, 6)]
    a, b, c = runs
    assert a.losses == b.losses
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    assert any(not torch.equal(a.tensors[k], c.tensors[k]) for k in a.tensors)
    assert a.tensors["model.layers.0.self_attn.v_proj.lora_B"].shape == (32, 4)


def test_lr_rank_scaling_gives_each_rank_its_own_step(tiny_model):
    """sqrt: a rank-r client trains at lr * sqrt(r_ref / r); the update is the one plain training at that lr
    gives, and the reference rank keeps train.lr."""
    assert rank_lr(TrainConfig(lr=0.01), 16) == 0.01
    scaled = TrainConfig(lr=0.01, lr_rank_scaling="sqrt", lr_reference_rank=2)
    assert rank_lr(scaled, 2) == pytest.approx(0.01)
    assert rank_lr(scaled, 8) == pytest.approx(0.005)
    assert rank_lr(scaled, 16) == pytest.approx(0.01 / math.sqrt(8))
    base, _ = tiny_model
    plan = TrainPlan(rank=8, truncations=(8,), mode="off")
    common = dict(local_steps=2, batch_size=2)
    by_scaling = train_client(
        fresh_lora(base),
        EXAMPLES,
        plan,
        TrainConfig(**common, **scaled.model_dump(include={"lr", "lr_rank_scaling", "lr_reference_rank"})),
        seed=3,
    )
    by_hand = train_client(fresh_lora(base), EXAMPLES, plan, TrainConfig(**common, lr=0.005), seed=3)
    unscaled = train_client(fresh_lora(base), EXAMPLES, plan, TrainConfig(**common, lr=0.01), seed=3)
    assert all(torch.allclose(by_scaling.tensors[k], by_hand.tensors[k], atol=1e-7) for k in by_hand.tensors)
    assert any(not torch.allclose(unscaled.tensors[k], by_hand.tensors[k], atol=1e-5) for k in by_hand.tensors)


def test_modes_run_the_promised_passes(tiny_model):
    base, _ = tiny_model
    cfg = TrainConfig(local_steps=3, batch_size=1, lr=1e-3)
    plan = dict(rank=4, truncations=(1, 2, 4))
    counts = {}
    for mode in ("all", "sample", "sandwich", "off"):
        model = fresh_lora(base, start_rank=4)
        counts[mode] = train_client(model, EXAMPLES, TrainPlan(mode=mode, **plan), cfg, seed=0).meta[
            "passes_per_truncation"
        ]
    assert counts["all"] == {"1": 3, "2": 3, "4": 3}
    assert counts["off"] == {"1": 0, "2": 0, "4": 3}
    assert sum(counts["sample"].values()) == 3
    assert counts["sandwich"]["4"] == 3 and counts["sandwich"]["1"] + counts["sandwich"]["2"] == 3


def test_rank_below_global_trains_only_its_prefix(tiny_model):
    base, _ = tiny_model
    model = fresh_lora(base, start_rank=2)
    res = train_client(
        model,
        EXAMPLES,
        TrainPlan(rank=2, truncations=(2,), mode="off"),
        TrainConfig(local_steps=2, batch_size=4, lr=1e-2, weight_decay=0.1),
        seed=0,
    )
    whole = LoraAdapter(model).read_state(R)
    assert res.tensors["model.layers.1.self_attn.o_proj.lora_A"].shape == (2, 64)
    for k, v in whole.items():
        tail = v[2:] if k.endswith("lora_A") else v[:, 2:]
        assert torch.count_nonzero(tail) == 0, k


def test_every_nested_mode_is_named_and_an_unknown_one_is_refused():
    """_step_truncations handles each mode of NESTED_MODES by name; an unknown mode is an error, not sandwich."""
    ts, rank = [1, 2, 4, 8], 8
    expected = {
        "off": lambda st: st == [8],
        "all": lambda st: st == ts,
        "sample": lambda st: len(st) == 1,
        "sample_width": lambda st: len(st) == 1,
        "sandwich": lambda st: st[0] == 8 and len(st) == 2,
        "cycle": lambda st: st == [8],
    }
    assert set(expected) == set(NESTED_MODES)
    for mode in NESTED_MODES:
        step_ts = _step_truncations(mode, ts, rank, random.Random(0), 0)
        assert set(step_ts) <= set(ts) and expected[mode](step_ts), mode
    for mode in ("Sandwich", "", "nested", "cycles"):
        with pytest.raises(ValueError, match=rf"unknown nested mode {mode!r}; expected one of all, sample"):
            _step_truncations(mode, ts, rank, random.Random(0), 0)


def test_cycle_takes_the_clients_rank_first_then_its_truncations_ascending():
    """prelort.nested: cycle (quality study 2, stage B): deterministic, whatever the rng, restarting each round."""
    ts = [2, 4, 8, 16]
    for seed in (0, 1):
        rng = random.Random(seed)
        assert [_step_truncations("cycle", ts, 16, rng, s)[0] for s in range(6)] == [16, 2, 4, 8, 16, 2]
    assert [_step_truncations("cycle", [2, 4], 4, random.Random(0), s)[0] for s in range(5)] == [4, 2, 4, 2, 4]
    assert [_step_truncations("cycle", [2], 2, random.Random(0), s)[0] for s in range(3)] == [2, 2, 2]


def test_cycle_is_a_config_mode_and_a_typo_of_it_is_refused():
    from pathlib import Path

    from prelort import config as config_mod

    tiny = Path(__file__).resolve().parents[1] / "examples" / "tiny.yaml"
    assert config_mod.load(tiny, ["method=prelort", "prelort.nested=cycle"]).prelort.nested == "cycle"
    with pytest.raises(config_mod.ConfigError, match="prelort.nested: Input should be .*'cycle'"):
        config_mod.load(tiny, ["method=prelort", "prelort.nested=cycles"])


def test_cycle_trains_every_dimension_of_a_rank_16_client_in_a_6_step_round(tiny_model):
    """Steps 16, 2, 4, 8, 16, 2: the top segment (8-15) on two steps, the first one included; the lazy-Adam
    guard and the dimension warm-up key off each step's largest truncation, as under sample."""
    base, _ = tiny_model
    plan = TrainPlan(rank=16, truncations=(2, 4, 8, 16), mode="cycle")
    want = [6] * 2 + [4] * 2 + [3] * 4 + [2] * 8
    for warmup in (0, 3):
        cfg = TrainConfig(local_steps=6, batch_size=2, lr=1e-2, dim_warmup_steps=warmup)
        rec = _StepRecorder()
        res = train_client(fresh_lora(base, rank=16, start_rank=16), EXAMPLES, plan, cfg, seed=0, local=rec)
        assert res.meta["dim_steps"] == want, warmup
        assert res.meta["passes_per_truncation"] == {"2": 2, "4": 1, "8": 1, "16": 2}
        snaps = rec.snapshots
        # the first step (t = 16) moves the top segment; steps 1-3 (t = 2, 4, 8) leave it exactly as it was
        assert _step_size(snaps[0], snaps[1], slice(8, 16)) > 0
        assert all(_step_size(snaps[s], snaps[s + 1], slice(8, 16)) == 0 for s in (1, 2, 3))
        assert _step_size(snaps[4], snaps[5], slice(8, 16)) > 0


def test_plan_validation(tiny_model):
    base, _ = tiny_model
    model = fresh_lora(base, start_rank=4)
    cfg = TrainConfig(local_steps=1, batch_size=2)
    with pytest.raises(ValueError, match="loaded at rank 4"):
        train_client(model, EXAMPLES, TrainPlan(rank=8, truncations=(8,)), cfg, seed=0)
    with pytest.raises(ValueError, match=r"truncations \[6\] outside"):
        train_client(model, EXAMPLES, TrainPlan(rank=4, truncations=(2, 6)), cfg, seed=0)
    with pytest.raises(ValueError, match="no training examples"):
        train_client(model, [], TrainPlan(rank=4, truncations=(4,)), cfg, seed=0)


def test_hetlora_pruning_shrinks_when_the_tail_shrinks(tiny_model):
    base, _ = tiny_model
    cfg = TrainConfig(local_steps=4, batch_size=4, lr=1e-2)
    # a strong regulariser shrinks the tail product from its random start
    model = fresh_lora(base)
    with torch.no_grad():  # nonzero B so the tail product starts > 0
        for p in LoraAdapter(model).parameters()[1::2]:
            p.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    res = train_client(
        model, EXAMPLES, TrainPlan(rank=R, truncations=(R,)), cfg, seed=0, local=SelfPruning(start=6, lam=10.0, rank=R)
    )
    assert res.meta["tail_norm_end"] < res.meta["tail_norm_start"]
    assert res.meta["pruned_to"] == 6 and res.rank == 6
    assert res.tensors["model.layers.0.self_attn.q_proj.lora_A"].shape == (6, 64)
    # from B = 0 the tail product starts at 0 and can only grow: no pruning
    model = fresh_lora(base)
    res = train_client(
        model, EXAMPLES, TrainPlan(rank=R, truncations=(R,)), cfg, seed=0, local=SelfPruning(start=6, lam=1e-3, rank=R)
    )
    assert res.meta["tail_norm_start"] == 0.0 and "pruned_to" not in res.meta and res.rank == R


def test_response_positions_only_loss_equals_the_full_logits_loss(tiny_model):
    """batch_response_loss skips the output layer at prompt positions; the loss and gradients must not change."""
    model = fresh_lora(tiny_model[0])
    examples = pattern_examples(6, seed=3)
    batch = collate(examples, pad_id=0)
    fast = batch_response_loss(model, batch)
    (g_fast,) = torch.autograd.grad(fast, [LoraAdapter(model).parameters()[1]])
    full = response_loss(
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"]
    )
    (g_full,) = torch.autograd.grad(full, [LoraAdapter(model).parameters()[1]])
    torch.testing.assert_close(fast, full, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(g_fast, g_full, atol=1e-6, rtol=1e-5)


def test_sample_mode_leaves_dims_outside_the_drawn_truncation_untouched(tiny_model):
    """AdamW's momentum and weight decay would move dims t..R-1 on a step whose objective never saw them;
    a step drawing t leaves them (and their moments) exactly as they were."""
    base, _ = tiny_model
    # a seed whose draws from T = (2, 8) begin 8, 2, 2, 2: only the first step trains dims 2..7
    seed = next(
        s
        for s in range(1000)
        if [(r := random.Random(s)).choice([2, R])] + [r.choice([2, R]) for _ in range(3)] == [R, 2, 2, 2]
    )
    plan = TrainPlan(rank=R, truncations=(2, R), mode="sample")
    cfg = dict(batch_size=4, lr=1e-2, weight_decay=0.1)
    one = train_client(fresh_lora(base), EXAMPLES, plan, TrainConfig(local_steps=1, **cfg), seed=seed)
    four = train_client(fresh_lora(base), EXAMPLES, plan, TrainConfig(local_steps=4, **cfg), seed=seed)
    assert four.meta["passes_per_truncation"] == {"2": 3, "8": 1}
    start = LoraAdapter(fresh_lora(base)).read_state(R)
    for name in one.tensors:
        tail = (slice(2, None), slice(None)) if name.endswith("lora_A") else (slice(None), slice(2, None))
        head = (slice(0, 2), slice(None)) if name.endswith("lora_A") else (slice(None), slice(0, 2))
        assert torch.equal(four.tensors[name][tail], one.tensors[name][tail]), name
        assert not torch.equal(four.tensors[name][head], one.tensors[name][head]), name
    # and the first step did train the tail (B starts at zero)
    assert any(not torch.equal(one.tensors[k][:, 2:], start[k][:, 2:]) for k in one.tensors if k.endswith("lora_B"))


class _StepRecorder(LocalTraining):
    """Copies of the factors before every optimizer step and after the last one."""

    def __init__(self):
        self.snapshots: list[list[tuple[torch.Tensor, torch.Tensor]]] = []

    def _take(self, factors):
        self.snapshots.append([(a.detach().clone(), b.detach().clone()) for a, b in factors])

    def penalty(self, factors):
        self._take(factors)
        return None

    def round_ends(self, factors):
        self._take(factors)


def _step_size(before, after, dims: slice) -> float:
    """Mean absolute change of the B columns of ``dims`` over all modules (B, not A: A's gradient is zero
    where B starts at zero, so only B shows a cold dimension's first step)."""
    moved = [(b1[:, dims] - b0[:, dims]).abs().flatten() for (_, b0), (_, b1) in zip(before, after)]
    return float(torch.cat(moved).mean())


def test_dim_warmup_keeps_a_cold_dimensions_first_step_below_its_steady_step(tiny_model):
    """Issue 25: under nested sample a top dimension first reached after k steps of a round gets, from a fresh
    AdamW, about a full-lr sign step, larger than the steady step of a dimension trained at every step; with
    train.dim_warmup_steps its first steps are scaled down to at most that."""
    assert dim_warmup_factors([0, 1, 2, 3, 4], 3) == [1.0, 0.25, 0.5, 0.75, 1.0]
    base, _ = tiny_model
    plan = TrainPlan(rank=8, truncations=(4, 8), mode="sample")
    steps = 12

    # a seed whose draws reach the top segment (t = 8) first at step k >= 3
    def draws(s: int) -> list[int]:
        rng = random.Random(s)  # the trainer's truncation draws (train_client's ``pick``)
        return [rng.choice([4, 8]) for _ in range(4)]

    seed = next(s for s in range(1000) if draws(s) == [4, 4, 4, 8])
    first_top = 3
    sizes = {}
    for warmup in (0, 3):
        cfg = TrainConfig(local_steps=steps, batch_size=4, lr=1e-2, dim_warmup_steps=warmup)
        rec = _StepRecorder()
        train_client(fresh_lora(base), pattern_examples(64, 1), plan, cfg, seed=seed, local=rec)
        snaps = rec.snapshots
        assert len(snaps) == steps + 1
        assert _step_size(snaps[0], snaps[first_top], slice(4, 8)) == 0  # untouched before it is reached
        cold = _step_size(snaps[first_top], snaps[first_top + 1], slice(4, 8))
        steady = sum(_step_size(snaps[s], snaps[s + 1], slice(0, 4)) for s in range(steps - 4, steps)) / 4
        sizes[warmup] = (cold, steady)
    cold, steady = sizes[0]
    assert cold > steady, sizes
    cold, steady = sizes[3]
    assert cold <= steady, sizes


def test_dim_warmup_trains_a_client_below_the_adapters_allocated_rank(tiny_model):
    """A federation allocates every client's adapter at its largest rank and a client of rank r trains the
    first r dimensions. train.dim_warmup_steps must scale those r and leave the rest where they were (study 2's
    screen lost every client below rank 16 to a shape error here: "size of tensor a (2) must match ... (16)")."""
    base, _ = tiny_model
    model = fresh_lora(base, start_rank=4)  # allocated at R = 8, active rank 4
    plan = TrainPlan(rank=4, truncations=(2, 4), mode="sample")
    start = [(a.detach().clone(), b.detach().clone()) for a, b in LoraAdapter(model).factor_pairs()]
    held = {}
    for warmup in (0, 3):
        cfg = TrainConfig(local_steps=4, batch_size=4, lr=1e-2, dim_warmup_steps=warmup)
        rec = _StepRecorder()
        res = train_client(fresh_lora(base, start_rank=4), pattern_examples(64, 1), plan, cfg, seed=3, local=rec)
        assert len(res.meta["dim_steps"]) == 4
        assert res.meta["dim_steps"][:2] == [4, 4]  # t >= 2 at every step reaches dimensions 0-1
        first, last = rec.snapshots[0], rec.snapshots[-1]
        for (a0, b0), (a1, b1) in zip(start, last):  # nothing outside the client's rank moves
            assert torch.equal(a1[4:], a0[4:]) and torch.equal(b1[:, 4:], b0[:, 4:])
        held[warmup] = _step_size(first, rec.snapshots[1], slice(0, 2))
    # the first step of dimensions 0-1 is scaled by 1 / (3 + 1) under the warm-up
    assert held[3] == pytest.approx(held[0] / 4, rel=0.05), held
