"""HetLoRA: weights proportional to ||B_k A_k||_F, and rank self-pruning bookkeeping."""

from __future__ import annotations

import json
import math

import pytest
import torch

from prelort.methods import LocalTraining, TrainPlan, key
from prelort.methods.hetlora import HetLoRA, SelfPruning, lora_product_norm


def _product_norm(spec, update, rank=None):
    r = update.rank if rank is None else rank
    sq = 0.0
    for module in spec.modules:
        a = update.tensors[key(module, "lora_A")][:r].double()
        b = update.tensors[key(module, "lora_B")][:, :r].double()
        sq += torch.linalg.matrix_norm(b @ a).item() ** 2
    return math.sqrt(sq)


def _padded(spec, tensors, name, rank, R):
    module, kind = name.rsplit(".", 1)
    t = tensors[name].double()
    if kind == "lora_A":
        t = t[:rank]
        return torch.cat([t, torch.zeros(R - rank, t.shape[1], dtype=t.dtype)])
    t = t[:, :rank]
    return torch.cat([t, torch.zeros(t.shape[0], R - rank, dtype=t.dtype)], dim=1)


def test_product_norm_is_frobenius_over_all_modules(make_spec, make_update):
    spec = make_spec()
    u = make_update(spec, 0, 3)
    factors = [(m, u.tensors[key(m, "lora_A")], u.tensors[key(m, "lora_B")]) for m in spec.modules]
    assert lora_product_norm(factors) == pytest.approx(_product_norm(spec, u), rel=1e-10)


def test_weights_are_proportional_to_product_norms_not_data_size(make_spec, make_update):
    spec = make_spec(ranks=(1, 2, 4))
    method = HetLoRA(spec)
    state = method.init_state(torch.Generator().manual_seed(0))
    ups = [make_update(spec, k, r, num_examples=n) for k, (r, n) in enumerate(((1, 1000), (2, 1), (4, 1)))]
    ups[2].tensors = {n: 3 * t for n, t in ups[2].tensors.items()}  # a much larger update
    norms = [_product_norm(spec, u) for u in ups]
    w = [n / sum(norms) for n in norms]
    new = method.aggregate(state, ups)
    for name in new.tensors:
        expected = sum(wk * _padded(spec, u.tensors, name, u.rank, 4) for wk, u in zip(w, ups))
        torch.testing.assert_close(new.tensors[name], expected.float(), rtol=1e-5, atol=1e-6)
    # data size plays no part
    for u in ups:
        u.num_examples = 5
    same = method.aggregate(state, ups)
    for name in new.tensors:
        assert torch.equal(same.tensors[name], new.tensors[name])


def test_all_zero_products_keep_state(make_spec, make_update):
    spec = make_spec(ranks=(2, 4))
    method = HetLoRA(spec)
    state = method.init_state(torch.Generator().manual_seed(0))
    u = make_update(spec, 0, 2)
    u.tensors = {n: (torch.zeros_like(t) if n.endswith("lora_B") else t) for n, t in u.tensors.items()}
    new = method.aggregate(state, [u])
    for name in state.tensors:
        assert torch.equal(new.tensors[name], state.tensors[name])


def test_prune_plan(make_spec):
    spec = make_spec(ranks=(1, 2, 8), options={"hetlora_prune": True, "hetlora_gamma": 0.5, "hetlora_lam": 0.01})
    method = HetLoRA(spec)
    assert method.plan(8).extra == {"prune_start": 4, "prune_lam": 0.01}
    assert method.plan(2).extra == {"prune_start": 1, "prune_lam": 0.01}
    assert method.plan(1).extra == {}  # ceil(0.5) = 1: no tail to prune
    assert method.plan(8).mode == "off" and method.plan(8).truncations == (8,)
    pruning_07 = HetLoRA(make_spec(ranks=(1, 8), options={"hetlora_prune": True, "hetlora_gamma": 0.7}))
    assert pruning_07.plan(8).extra["prune_start"] == 6
    assert HetLoRA(spec=make_spec(ranks=(1, 8))).plan(8).extra == {}  # pruning off by default
    with pytest.raises(ValueError, match="hetlora_gamma"):
        HetLoRA(make_spec(options={"hetlora_prune": True, "hetlora_gamma": 0}))


def test_pruned_client_keeps_its_new_rank(make_spec, make_update):
    spec = make_spec(ranks=(2, 4, 4), options={"hetlora_prune": True, "hetlora_gamma": 0.5, "hetlora_lam": 0.1})
    method = HetLoRA(spec)
    state = method.init_state(torch.Generator().manual_seed(0))
    assert [method.client_rank(k, state) for k in range(3)] == [2, 4, 4]
    pruned = make_update(spec, 1, 4, meta={"pruned_to": 2})
    other = make_update(spec, 2, 4)
    new = method.aggregate(state, [pruned, other])
    json.dumps(new.meta)
    assert [method.client_rank(k, new) for k in range(3)] == [2, 2, 4]
    assert [method.client_rank(k, state) for k in range(3)] == [2, 4, 4]  # input state untouched
    assert method.broadcast(new, method.client_rank(1, new)).adapter[key("layers.0.q_proj", "lora_A")].shape == (2, 4)
    # the pruned update counts at rank 2: its tail never enters the average
    norms = [_product_norm(spec, pruned, 2), _product_norm(spec, other)]
    for name in new.tensors:
        expected = (
            norms[0] * _padded(spec, pruned.tensors, name, 2, 4) + norms[1] * _padded(spec, other.tensors, name, 4, 4)
        ) / sum(norms)
        torch.testing.assert_close(new.tensors[name], expected.float(), rtol=1e-5, atol=1e-6)
    # and a later round remembers it
    later = method.aggregate(new, [make_update(spec, 0, 2)])
    assert method.client_rank(1, later) == 2


def test_bad_pruned_to_is_rejected(make_spec, make_update):
    spec = make_spec(ranks=(2, 4))
    method = HetLoRA(spec)
    state = method.init_state(torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"client 1: pruned_to 5 outside \[1, 4\]"):
        method.aggregate(state, [make_update(spec, 1, 4, meta={"pruned_to": 5})])


def test_local_training_follows_the_plan(make_spec):
    """The client side: the plan's extra becomes HetLoRA's SelfPruning; a plain plan adds nothing."""
    spec = make_spec(ranks=(1, 8), options={"hetlora_prune": True, "hetlora_gamma": 0.5, "hetlora_lam": 0.01})
    method = HetLoRA(spec)
    local = method.local_training(method.plan(8))
    assert isinstance(local, SelfPruning) and (local.start, local.lam, local.rank) == (4, 0.01, 8)
    assert local.penalty_moves_all_dims
    assert type(method.local_training(method.plan(1))) is LocalTraining
    for extra, match in [
        ({"prune_start": 8, "prune_lam": 0.1}, r"prune.start 8 must lie in \(0, 8\)"),
        ({"prune_start": 4, "prune_lam": -1.0}, "prune.lam"),
        ({"prune_start": 4}, "prune_start and prune_lam"),
    ]:
        with pytest.raises(ValueError, match=match):
            method.local_training(TrainPlan(rank=8, truncations=(8,), extra=extra))


def test_self_pruning_decides_the_rank_and_its_metadata():
    a, b = torch.ones(4, 3), torch.ones(5, 4)
    pruning = SelfPruning(start=2, lam=0.5, rank=4)
    pruning.round_starts([(a, b)])
    assert pruning.tail_start == pytest.approx(math.sqrt(10) * math.sqrt(6))
    assert torch.allclose(pruning.penalty([(a, b)]), torch.tensor(0.5 * math.sqrt(10) * math.sqrt(6)))
    pruning.round_ends([(a * 0.5, b)])
    meta = {}
    assert pruning.finish(4, meta) == 2 and meta["pruned_to"] == 2
    assert list(meta) == ["tail_norm_start", "tail_norm_end", "pruned_to"]
    grown = SelfPruning(start=2, lam=0.0, rank=4)
    grown.round_starts([(a * 0.5, b)])
    grown.round_ends([(a, b)])
    meta = {}
    assert grown.finish(4, meta) == 4 and "pruned_to" not in meta and grown.penalty([(a, b)]) is None
    assert not grown.penalty_moves_all_dims


def test_clear_metadata_is_checked_and_counted(make_spec):
    method = HetLoRA(make_spec(ranks=(2, 4)))
    assert method.clear_meta_fields == ("pruned_to",)
    assert method.check_clear_meta({"loss": 1.0, "pruned_to": 2}, 4) == {}
    assert method.check_clear_meta({"pruned_to": 5}, 4) == {"pruned_to": "pruned_to 5 (outside [1, 4])"}
    assert method.check_clear_meta({"pruned_to": True}, 4) == {"pruned_to": "pruned_to True (outside [1, 4])"}
    assert method.counted_rank({"pruned_to": 2}, 4) == 2 and method.counted_rank({}, 4) == 4
