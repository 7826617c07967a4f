"""bench/poisoning.py's attacks and distance, without a model (the benchmark itself runs federations)."""

from __future__ import annotations

import math

import torch
from bench_scripts import load_bench

from prelort.config import ValidationConfig

poisoning = load_bench("poisoning")
Q = "m.q_proj"


def _update(rank: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        f"{Q}.lora_A": 0.1 * torch.randn(rank, 8, generator=g),
        f"{Q}.lora_B": 0.01 * torch.randn(6, rank, generator=g),
    }


def _rms(tensors: dict[str, torch.Tensor]) -> float:
    total = sum(float(t.double().pow(2).sum()) for t in tensors.values())
    return math.sqrt(total / sum(t.numel() for t in tensors.values()))


def test_the_attacks_are_what_the_issue_describes():
    honest, meta = _update(), {"num_examples": 40}
    received = {k: v - 0.001 for k, v in honest.items()}
    spiked, _ = poisoning.spike(honest, meta, received)
    assert max(float(t.abs().max()) for t in spiked.values()) == spiked[f"{Q}.lora_A"][0, 0]
    assert _rms(spiked) < 10.0 < _rms(spiked) * 1.02  # the whole max_update_rms budget, just under it
    flipped, _ = poisoning.sign_flip(honest, meta, received)
    assert (
        math.isclose(_rms(flipped), 9.9, rel_tol=1e-5)
        and float((flipped[f"{Q}.lora_A"] * honest[f"{Q}.lora_A"]).sum()) < 0
    )
    heavy, heavy_meta = poisoning.max_weight(honest, meta, received)
    assert heavy_meta["num_examples"] == 10**9 and torch.equal(heavy[f"{Q}.lora_B"], -honest[f"{Q}.lora_B"])
    under, under_meta = poisoning.under_bound(honest, meta, received)
    change = {k: under[k] - received[k] for k in under}
    assert max(float(t.abs().max()) for t in change.values()) <= 0.99 * ValidationConfig().max_change_entry
    assert torch.allclose(change[f"{Q}.lora_A"], torch.full_like(change[f"{Q}.lora_A"], -3.9 * 0.001))
    assert under_meta["num_examples"] == 156


def test_distance_is_relative_to_the_honest_products():
    state = _update()
    deltas = poisoning.full_rank_deltas(state, 2.0)
    assert torch.allclose(deltas[Q], 2.0 * state[f"{Q}.lora_B"].double() @ state[f"{Q}.lora_A"].double())
    assert poisoning.relative_distance(deltas, deltas) == 0.0
    doubled = {k: 2 * v for k, v in deltas.items()}
    assert math.isclose(poisoning.relative_distance(doubled, deltas), 1.0)
    dense = poisoning.full_rank_deltas({f"{Q}.delta": torch.ones(2, 2)}, 2.0)
    assert torch.equal(dense[Q], torch.ones(2, 2, dtype=torch.float64))
