"""Per-round, per-rank-dimension diagnostics: clients report the optimizer steps that reached each dimension
and their forward/backward passes; the server sums the accepted ones into metrics.jsonl's train records."""

from __future__ import annotations

import copy
import json
import logging
import random
from pathlib import Path

import pytest
import torch

from prelort import adapters
from prelort import config as config_mod
from prelort.adapters import LoraAdapter
from prelort.config import TrainConfig
from prelort.federation import round_diagnostics
from prelort.methods.base import FederationSpec, TrainPlan, lora_init
from prelort.runner import run
from prelort.train import train_client

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
R = 8


def examples(n: int = 16) -> list[dict]:
    rng = random.Random(0)
    out = []
    for _ in range(n):
        prompt = [1000 + rng.randrange(4)] + [rng.randrange(2000, 3000) for _ in range(5)]
        response = [4000 + j for j in range(3)]
        out.append({"input_ids": prompt + response, "labels": [-100] * len(prompt) + response})
    return out


def fresh_lora(base, rank: int = R):
    model = adapters.attach_lora(copy.deepcopy(base), TARGETS, R, 16.0)
    spec = FederationSpec(modules=LoraAdapter(model).modules, client_ranks=(2, R), alpha=16.0)
    LoraAdapter(model).load_state(lora_init(spec, rank, torch.Generator().manual_seed(0)), rank)
    return model


@pytest.mark.parametrize("mode, passes", [("all", 3 * 5), ("sandwich", 2 * 5), ("off", 5)])
def test_modes_that_include_the_own_rank_reach_every_dimension_every_step(tiny_model, mode, passes):
    base, _ = tiny_model
    res = train_client(
        fresh_lora(base),
        examples(),
        TrainPlan(rank=R, truncations=(2, 4, R), mode=mode),
        TrainConfig(local_steps=5, batch_size=4, lr=1e-3),
        seed=0,
    )
    assert res.meta["dim_steps"] == [5] * R
    assert res.meta["passes"] == passes


def test_sample_mode_counts_match_the_draws_and_the_dimensions_that_moved(tiny_model):
    base, _ = tiny_model
    plan = TrainPlan(rank=R, truncations=(2, 4, R), mode="sample")

    # a seed whose 4 draws from T never reach dims 4..7: their dim_steps are 0 and they must not move
    def draws(s: int) -> list[int]:
        rng = random.Random(s)
        return [rng.choice([2, 4, R]) for _ in range(4)]

    seed = next(s for s in range(1000) if draws(s)[0] == 2 and max(draws(s)) == 4)
    res = train_client(fresh_lora(base), examples(), plan, TrainConfig(local_steps=4, batch_size=4, lr=1e-2), seed=seed)
    counts = {int(t): c for t, c in res.meta["passes_per_truncation"].items()}
    assert res.meta["passes"] == 4
    assert res.meta["dim_steps"] == [sum(c for t, c in counts.items() if t > i) for i in range(R)]
    assert res.meta["dim_steps"][:2] == [4, 4] and res.meta["dim_steps"][4:] == [0] * 4
    assert 1 <= res.meta["dim_steps"][2] <= 3
    start = LoraAdapter(fresh_lora(base)).read_state(R)
    for name, value in res.tensors.items():
        if name.endswith("lora_B"):
            moved = [not torch.equal(value[:, i], start[name][:, i]) for i in range(R)]
            assert moved == [n > 0 for n in res.meta["dim_steps"]], name


def test_round_diagnostics_sums_the_accepted_clients_and_ignores_bad_reports(caplog):
    clients = [
        (0, 2, {"dim_steps": [6, 6], "passes": 6, "steps": 6}),
        (1, 4, {"dim_steps": [6, 6, 2, 2], "passes": 6, "steps": 6}),
        (2, 8, {"dim_steps": [6, 6, 4, 4, 1, 1, 1, 1], "passes": 6, "steps": 6}),
        # HetLoRA pruned 4 -> 2: its report covers the 4 trained dims, only the 2 kept ones count
        (3, 2, {"dim_steps": [6, 6, 6, 6], "passes": 12, "steps": 6}),
        # more steps than the round allows: not counted in the step sums, still a contributing client
        (4, 4, {"dim_steps": [7, 0, 0, 0], "passes": 6, "steps": 6}),
        (5, 2, {"dim_steps": [True, 1], "passes": 1, "steps": 1}),
        (6, 2, {"loss": 1.0}),  # reported nothing (e.g. a foreign client)
    ]
    with caplog.at_level(logging.WARNING, logger="prelort"):
        diag = round_diagnostics(clients, max_rank=8, local_steps=6, grad_accum=1)
    assert diag == {
        "dim_clients": [7, 7, 3, 3, 1, 1, 1, 1],
        "dim_steps": [24, 24, 6, 6, 1, 1, 1, 1],
        "passes": 30,
        "optimizer_steps": 24,
        "diagnostics_reported": 4,
    }
    assert "client 4: ignoring its step counts" in caplog.text and "client 5: ignoring" in caplog.text
    assert "client 6" not in caplog.text


def test_train_records_carry_the_round_diagnostics(tmp_path):
    cfg = config_mod.load(
        ROOT / "examples" / "tiny.yaml",
        [
            "rounds=2",
            "train.local_steps=3",
            "data.num_train=48",
            "data.num_test=8",
            "eval.max_examples=4",
            "eval.max_new_tokens=2",
            "eval.truncation_curve=false",
            "eval.base=false",
            "prelort.nested=all",
            "clients.num=8",
            "clients.per_round=4",
            "clients.sampling=stratified",
            "clients.ranks=[1,2,4,8]",
        ],
    )
    run(cfg, tmp_path / "run", verbose=False)
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["kind"] == "train"]
    assert [r["round"] for r in train] == [1, 2]
    for r in train:
        # stratified: one client of each rank 1, 2, 4, 8; `all` reaches every dimension of a client every step
        assert r["dim_clients"] == [4, 3, 2, 2, 1, 1, 1, 1]
        assert r["dim_steps"] == [3 * c for c in r["dim_clients"]]
        # T_k = segment boundaries <= r_k: 1, 2, 3, 4 truncations for ranks 1, 2, 4, 8
        assert r["passes"] == 3 * (1 + 2 + 3 + 4) and r["optimizer_steps"] == 12
        assert r["diagnostics_reported"] == 4


def test_sample_width_draws_truncations_in_proportion_to_segment_width(tiny_model):
    from prelort.train import _step_truncations

    rng = random.Random(0)
    draws = [_step_truncations("sample_width", [2, 4, 8, 16], 16, rng, step)[0] for step in range(8000)]
    share = {t: draws.count(t) / len(draws) for t in (2, 4, 8, 16)}
    assert share == pytest.approx({2: 2 / 16, 4: 2 / 16, 8: 4 / 16, 16: 8 / 16}, abs=0.02)
    # one pass per step; dims 8..15 (reached by t = 16 only) on about half the steps
    base, _ = tiny_model
    res = train_client(
        fresh_lora(base),
        examples(),
        TrainPlan(rank=R, truncations=(2, 4, R), mode="sample_width"),
        TrainConfig(local_steps=24, batch_size=1, lr=1e-3),
        seed=3,
    )
    assert res.meta["passes"] == 24 and res.meta["dim_steps"][:2] == [24, 24]
    assert 5 <= res.meta["dim_steps"][4] <= 19  # P(t = 8) = 4/8 here: binomial(24, 1/2)
    cfg = config_mod.from_dict({}, ["method=prelort", "prelort.nested=sample_width"])
    assert cfg.prelort.nested == "sample_width"
