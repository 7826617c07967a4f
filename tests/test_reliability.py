"""Reliability (issue 7): hostile and broken clients, dropouts, failed rounds, robust clipping.

Real runs on tiny-llama go through the real engine path: the in-process engine encodes every update to
the wire format (safetensors bytes + JSON metadata), a wrapper corrupts chosen clients' replies in
flight, and the server decodes, validates, logs each rejection with its reason and completes the round
with the remaining clients.
"""

from __future__ import annotations

import io
import json
import logging
import math
import pickle
import struct
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import load_file
from safetensors.torch import save as st_save

from prelort import config as config_mod
from prelort.client import ClientRunner
from prelort.engines.inprocess import InProcessEngine
from prelort.federation import ROUND_REASONS, Federation, RoundFailed
from prelort.methods import ClientUpdate
from prelort.protocol import ClientTask, RawUpdate
from prelort.rank_geometry import adapter_rank
from prelort.runner import Session
from prelort.updates import REASONS, encode_update

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples" / "tiny.yaml"
METHODS = ["prelort", "fedit", "zeropad", "hetlora", "flexlora", "flora"]

# small and fast: one local step on a couple of short examples, evaluation only after the last round
FAST = [
    "train.local_steps=1",
    "train.batch_size=2",
    "data.max_length=32",
    "data.num_test=4",
    "eval.max_examples=2",
    "eval.max_new_tokens=1",
    "eval.truncation_curve=false",
    "eval.base=false",
    "eval.every=100",
    "prelort.nested=sample",
]


def tiny_cfg(*overrides: str) -> config_mod.Config:
    return config_mod.load(TINY, [*FAST, *overrides])


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_records(run_dir: Path) -> list[dict]:
    return [r for r in metrics(run_dir) if r.get("kind") == "train"]


# ----------------------------------------------------------------------------------------------
# corruptions of one reply in flight: (payload bytes, metadata dict, declared rank) -> (payload, metadata)
# ----------------------------------------------------------------------------------------------
def _tensors(payload: bytes) -> dict[str, torch.Tensor]:
    return dict(st_load(payload))  # our own honest payload: trusted here


def _first(tensors: dict[str, torch.Tensor], kind: str) -> str:
    return sorted(k for k in tensors if k.endswith(kind))[0]


def _edit_tensors(fn: Callable[[dict[str, torch.Tensor]], None]):
    def corrupt(payload: bytes, meta: dict, rank: int):
        t = _tensors(payload)
        fn(t)
        return st_save(t), json.dumps(meta)

    return corrupt


def _edit_meta(fn: Callable[[dict], object]):
    def corrupt(payload: bytes, meta: dict, rank: int):
        out = fn(meta)
        return payload, (json.dumps(meta) if out is None else out)

    return corrupt


def _set_value(value: float):
    def edit(t):
        t[_first(t, "lora_A")][0, 0] = value

    return edit


def _pad_rank(t: dict[str, torch.Tensor], new_rank: int, only: str | None = None) -> None:
    """Zero-pad (or cut) the rank dimension of every factor (or only the first ``only`` factor)."""
    names = [_first(t, only)] if only else list(t)
    for name in names:
        x = t[name]
        if name.endswith("lora_A"):
            y = torch.zeros(new_rank, x.shape[1])
            n = min(new_rank, x.shape[0])
            y[:n] = x[:n]
        else:
            y = torch.zeros(x.shape[0], new_rank)
            n = min(new_rank, x.shape[1])
            y[:, :n] = x[:, :n]
        t[name] = y


def _declare_rank(new_rank: int):
    def corrupt(payload: bytes, meta: dict, rank: int):
        t = _tensors(payload)
        _pad_rank(t, new_rank)
        return st_save(t), json.dumps(dict(meta, rank=new_rank))

    return corrupt


def _cast(dtype: torch.dtype):
    def edit(t):
        name = _first(t, "lora_B")
        t[name] = t[name].to(dtype)

    return edit


def _add_module(t):
    a, b = _first(t, "lora_A"), _first(t, "lora_B")
    t["model.layers.99.mlp.up_proj.lora_A"] = t[a].clone()
    t["model.layers.99.mlp.up_proj.lora_B"] = t[b].clone()


def _drop_module(t):
    module = _first(t, "lora_A").rsplit(".", 1)[0]
    del t[f"{module}.lora_A"], t[f"{module}.lora_B"]


def _extra_key(t):
    name = _first(t, "lora_A")
    t[name.rsplit(".", 1)[0] + ".bias"] = torch.zeros(3)


def _scale(factor: float):
    def edit(t):
        for name in t:
            t[name] = t[name] * factor

    return edit


def _replace_payload(make: Callable[[bytes], bytes]):
    def corrupt(payload: bytes, meta: dict, rank: int):
        return make(payload), json.dumps(meta)

    return corrupt


def _huge_tensor(payload: bytes) -> bytes:
    header = json.dumps(
        {"m.lora_A": {"dtype": "F32", "shape": [1 << 30, 1 << 30], "data_offsets": [0, 4 << 60]}}
    ).encode()
    return struct.pack("<Q", len(header)) + header + b"\0" * 16


def _torch_save(payload: bytes) -> bytes:
    buf = io.BytesIO()
    torch.save(_tensors(payload), buf)
    return buf.getvalue()


def _impersonate(meta: dict):
    meta["client"] = (meta["client"] + 1) % 4  # another client of this round claims the update


# kind -> (corruption, the reason code that must be logged)
CORRUPTIONS: dict[str, tuple[Callable, str]] = {
    "nan": (_edit_tensors(_set_value(math.nan)), "non_finite"),
    "+inf": (_edit_tensors(_set_value(math.inf)), "non_finite"),
    "-inf": (_edit_tensors(_set_value(-math.inf)), "non_finite"),
    "float64": (_edit_tensors(_cast(torch.float64)), "wrong_dtype"),
    "float16": (_edit_tensors(_cast(torch.float16)), "wrong_dtype"),
    "shape_vs_declared_rank": (
        lambda p, m, r: (_declare_rank(r + 1)(p, m, r)[0], json.dumps(m)),
        "shape_rank_mismatch",
    ),
    "a_b_different_ranks": (
        lambda p, m, r: _edit_tensors(lambda t: _pad_rank(t, r + 1, only="lora_A"))(p, m, r),
        "ab_rank_mismatch",
    ),
    "rank_zero": (_edit_meta(lambda m: m.update(rank=0)), "bad_rank"),
    "rank_negative": (_edit_meta(lambda m: m.update(rank=-3)), "bad_rank"),
    "rank_above_max": (_declare_rank(16), "rank_above_max"),
    "rank_above_client": (_declare_rank(8), "rank_above_client"),
    "unknown_module": (_edit_tensors(_add_module), "unknown_module"),
    "missing_module": (_edit_tensors(_drop_module), "missing_module"),
    "extra_key": (_edit_tensors(_extra_key), "extra_key"),
    "not_safetensors": (_replace_payload(lambda p: struct.pack("<Q", 16) + b"this is not json"), "not_safetensors"),
    "empty_payload": (_replace_payload(lambda p: b""), "not_safetensors"),
    "truncated": (_replace_payload(lambda p: p[: len(p) // 2]), "truncated"),
    "huge_header": (_replace_payload(lambda p: struct.pack("<Q", 1 << 62) + p[8:]), "header_too_large"),
    "huge_tensor": (_replace_payload(_huge_tensor), "truncated"),
    "pickle": (_replace_payload(lambda p: pickle.dumps({"weights": [1.0, 2.0]}, protocol=4)), "pickle_payload"),
    "torch_save": (_replace_payload(_torch_save), "pickle_payload"),
    "meta_not_json": (_edit_meta(lambda m: '{"rank": 4, "num_examples":'), "bad_metadata"),
    "meta_not_utf8": (_edit_meta(lambda m: b"\xff\xfe{}"), "bad_metadata"),
    "meta_not_object": (_edit_meta(lambda m: "[1, 2, 3]"), "bad_metadata"),
    "meta_missing_field": (_edit_meta(lambda m: m.pop("num_examples") and None), "bad_metadata"),
    "meta_wrong_type": (_edit_meta(lambda m: m.update(rank=str(m["rank"]))), "bad_metadata"),
    "zero_examples": (_edit_meta(lambda m: m.update(num_examples=0)), "bad_num_examples"),
    "negative_examples": (_edit_meta(lambda m: m.update(num_examples=-5)), "bad_num_examples"),
    "norm_too_large": (_edit_tensors(_scale(1e3)), "norm_too_large"),
    "wrong_round": (_edit_meta(lambda m: m.update(round=m["round"] + 1)), "round_mismatch"),
    "wrong_method": (_edit_meta(lambda m: m.update(method="fedit")), "method_mismatch"),
    "impersonation": (_edit_meta(_impersonate), "client_mismatch"),
    "duplicate": (None, "duplicate_client"),  # a second reply from a client whose first one was good
}
KINDS = list(CORRUPTIONS)

# The hostile run: 20 clients (ranks 1, 2, 4, 8 cycled), 2 rounds. Clients 0-3 (one of each rank) stay
# honest; clients 4-19 send the corrupted replies, 16 kinds per round, ranks cycled so every kind meets
# a client of a rank it applies to. The duplicate is an extra reply from honest client 1.
NUM_CLIENTS, HONEST = 20, (0, 1, 2, 3)


def hostile_schedule() -> dict[tuple[int, int], str]:
    schedule: dict[tuple[int, int], str] = {}
    kinds = [k for k in KINDS if k != "duplicate"]
    slots = [(rnd, c) for rnd in (1, 2) for c in range(len(HONEST), NUM_CLIENTS)]
    assert len(kinds) <= len(slots)
    for slot, kind in zip(slots, kinds):
        schedule[slot] = kind
    schedule[(2, 1)] = "duplicate"
    return schedule


class CorruptingEngine:
    """Wraps the in-process engine and corrupts chosen clients' wire-format replies in flight."""

    def __init__(self, inner: InProcessEngine, schedule: dict[tuple[int, int], str]):
        self.inner = inner
        self.schedule = schedule

    def execute(self, tasks: Sequence[ClientTask]) -> list:
        out = []
        for task, res in zip(tasks, self.inner.execute(tasks)):
            assert isinstance(res, RawUpdate), "the in-process engine must reply in the wire format"
            kind = self.schedule.get((task.round, task.client))
            if kind is None:
                out.append(res)
            elif kind == "duplicate":
                out += [res, RawUpdate(res.client, res.payload, res.meta)]
            else:
                payload, meta = CORRUPTIONS[kind][0](res.payload, json.loads(res.meta), task.rank)
                out.append(RawUpdate(task.client, payload, meta))
        return out


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory) -> tuple[Path, dict[tuple[int, int], str]]:
    cfg = tiny_cfg(
        "rounds=2",
        f"clients.num={NUM_CLIENTS}",
        f"clients.per_round={NUM_CLIENTS}",
        "clients.min_per_round=4",
        "data.num_train=80",
        "validation.max_update_norm=100",
        "audit=true",
    )
    run_dir = tmp_path_factory.mktemp("hostile") / "run"
    schedule = hostile_schedule()
    ranks = cfg.clients.all_ranks()
    for (_, client), kind in schedule.items():
        if kind == "rank_above_client":
            assert ranks[client] < 8, "rank_above_client needs a client below the largest rank"
    session = Session(cfg, run_dir, verbose=False)
    session.run(CorruptingEngine(InProcessEngine(session, progress=False), schedule))
    return run_dir, schedule


@pytest.mark.parametrize("kind", KINDS)
def test_every_bad_update_is_rejected_with_its_reason(hostile_run, kind):
    run_dir, schedule = hostile_run
    log_text = (run_dir / "run.log").read_text()
    ((rnd, client),) = [slot for slot, k in schedule.items() if k == kind]
    reason = CORRUPTIONS[kind][1]
    line = f"round {rnd}: rejected update from client {client}: {reason}: "
    assert line in log_text, f"{kind}: no line {line!r} in run.log"
    if kind != "duplicate":
        # never aggregated: the audit trail holds only accepted updates
        assert not (run_dir / f"updates/round-{rnd}/client-{client}.safetensors").exists()


def test_rounds_complete_with_the_honest_clients(hostile_run, check_run):
    run_dir, schedule = hostile_run
    check_run(run_dir)
    text = (run_dir / "run.log").read_text()
    assert "Traceback" not in text  # every bad reply was a clean rejection, nothing raised
    train = train_records(run_dir)
    assert [r["round"] for r in train] == [1, 2]
    bad_per_round = [sum(1 for (rnd, _) in schedule if rnd == r) for r in (1, 2)]
    assert [r["accepted"] for r in train] == [len(HONEST), len(HONEST)]
    assert [r["rejected"] for r in train] == bad_per_round
    assert [r["failed"] for r in train] == [0, 0]
    assert all(math.isfinite(r["train_loss"]) for r in train)
    for rnd in (1, 2):
        kept = sorted(p.name for p in (run_dir / f"updates/round-{rnd}").glob("*.safetensors"))
        assert kept == [f"client-{c}.safetensors" for c in HONEST]
        state = load_file(str(run_dir / f"checkpoints/round-{rnd}/adapter.safetensors"))
        assert all(bool(torch.isfinite(t).all()) for t in state.values())
    evals = [r for r in metrics(run_dir) if r.get("kind") == "tier"]
    assert {(r["round"], r["rank"]) for r in evals} == {(2, t) for t in (1, 2, 4, 8)}
    assert all(math.isfinite(r["perplexity"]) for r in evals)


# ----------------------------------------------------------------------------------------------
# dropouts, failed rounds, retries, resume
# ----------------------------------------------------------------------------------------------
class FaultyClients:
    """Patches ClientRunner.run: raise for the (round, client) pairs listed, for the first ``times`` tries."""

    def __init__(self, monkeypatch, faults: dict[tuple[int, int], int]):
        self.faults = dict(faults)
        self.calls: list[tuple[int, int]] = []
        original = ClientRunner.run

        def run(runner, task: ClientTask):
            self.calls.append((task.round, task.client))
            left = self.faults.get((task.round, task.client), 0)
            if left:
                self.faults[(task.round, task.client)] = left - 1
                raise RuntimeError(f"injected fault: client {task.client} lost power in round {task.round}")
            return original(runner, task)

        monkeypatch.setattr(ClientRunner, "run", run)


FOREVER = 10**9


def test_dropouts_retry_failed_round_and_resume(tmp_path, monkeypatch, check_run):
    """Round 1: three clients fail once -> too few updates -> retried, then complete.
    Round 2: the rank-4 and rank-8 clients fail -> the round completes with ranks 1 and 2 only, and the
    segments only they would cover keep their values. Round 3: three clients fail for good -> the run
    stops with exit code 1 and a message naming the round and min_per_round; the state on disk is round 2;
    after the cause is fixed, --resume finishes the run."""
    from typer.testing import CliRunner

    from prelort.apps.cli import app

    run_dir = tmp_path / "run"
    sets = [*FAST, "rounds=3", "data.num_train=32", "clients.min_per_round=2", "clients.max_round_retries=1"]
    args = ["run", str(TINY), "--out", str(run_dir), "-q", *[a for s in sets for a in ("--set", s)]]
    faults = FaultyClients(
        monkeypatch,
        {
            (1, 0): 1,
            (1, 1): 1,
            (1, 2): 1,
            (2, 2): FOREVER,
            (2, 3): FOREVER,
            (3, 1): FOREVER,
            (3, 2): FOREVER,
            (3, 3): FOREVER,
        },
    )
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 1, res.output
    assert "error: round 3 (attempt 2): 1 accepted update(s)" in res.output
    assert "clients.min_per_round=2" in res.output and "--resume" in res.output
    # round 1 ran twice (same clients: per_round == num), rounds 2 and 3 as scheduled, round 3 twice
    assert faults.calls == [(1, c) for c in range(4)] * 2 + [(2, c) for c in range(4)] + [(3, c) for c in range(4)] * 2

    log_text = (run_dir / "run.log").read_text()
    assert (
        "round 1: 1 accepted update(s), fewer than clients.min_per_round=2; retrying the round with "
        "resampled clients (retry 1 of clients.max_round_retries=1)"
    ) in log_text
    for client in (2, 3):
        assert (
            f"round 2: client {client} failed: ClientFailed: RuntimeError: injected fault: client {client} "
            "lost power in round 2"
        ) in log_text
    train = train_records(run_dir)
    assert [(r["round"], r["accepted"], r["failed"]) for r in train] == [(1, 4, 0), (2, 2, 2)]
    # the state on disk is the last complete round
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["round-0", "round-1", "round-2"]
    assert max(r["round"] for r in metrics(run_dir)) == 2

    # PreLort: rank dimensions 2..7 were covered only by the clients that dropped out in round 2: unchanged
    g1 = load_file(str(run_dir / "checkpoints/round-1/adapter.safetensors"))
    g2 = load_file(str(run_dir / "checkpoints/round-2/adapter.safetensors"))
    for name in g1:
        old, new = (g1[name], g2[name]) if name.endswith("lora_A") else (g1[name].T, g2[name].T)
        assert torch.equal(old[2:], new[2:]), name
    assert any(
        not torch.equal(
            g1[n][:2] if n.endswith("lora_A") else g1[n][:, :2], g2[n][:2] if n.endswith("lora_A") else g2[n][:, :2]
        )
        for n in g1
    )

    faults.faults.clear()  # the cause is fixed
    res = CliRunner().invoke(app, [*args, "--resume"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [f"round-{r}" for r in range(4)]
    train = train_records(run_dir)
    assert [(r["round"], r["accepted"]) for r in train] == [(1, 4), (2, 2), (3, 4)]
    check_run(run_dir)


def test_failed_round_without_retries_stops_at_once(tmp_path, monkeypatch):
    cfg = tiny_cfg("rounds=1", "data.num_train=32", "clients.min_per_round=4")
    faults = FaultyClients(monkeypatch, {(1, 3): FOREVER})
    session = Session(cfg, tmp_path / "run", verbose=False)
    with pytest.raises(RoundFailed) as info:
        session.run(InProcessEngine(session, progress=False))
    e = info.value
    assert (e.round, e.accepted, e.min_per_round, e.attempts, e.completed) == (1, 3, 4, 1, 0)
    assert str(e).startswith(
        "round 1: 3 accepted update(s) from 4 replies (0 rejected, 1 failed clients), "
        "fewer than clients.min_per_round=4"
    )
    assert faults.calls == [(1, c) for c in range(4)]  # default max_round_retries=0: no second attempt
    assert sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir()) == ["round-0"]
    assert "ERROR round 1: 3 accepted" in (tmp_path / "run/run.log").read_text()


def test_a_retry_resamples_clients_with_a_derived_seed(tmp_path):
    cfg = tiny_cfg("clients.num=8", "clients.per_round=3", "clients.ranks=[1,2]")
    fed = Federation(cfg, tmp_path, {"m.q_proj": (4, 3)})
    fed.start()
    first = [fed.sample_clients(r) for r in range(1, 9)]
    retried = [fed.sample_clients(r, attempt=1) for r in range(1, 9)]
    assert first == [fed.sample_clients(r, 0) for r in range(1, 9)]  # deterministic
    assert retried == [fed.sample_clients(r, 1) for r in range(1, 9)]
    assert first != retried and all(len(s) == 3 for s in retried)
    # a client trains with the same seed in every attempt of a round
    seeds0 = {t.client: t.seed for t in fed.begin_round(1, 0)}
    seeds1 = {t.client: t.seed for t in fed.begin_round(1, 1)}
    assert all(seeds0[c] == seeds1[c] for c in seeds0.keys() & seeds1.keys())


# ----------------------------------------------------------------------------------------------
# robust clipping with every method (Federation level, no training)
# ----------------------------------------------------------------------------------------------
MODULES = {"layers.0.q_proj": (6, 5), "layers.0.v_proj": (4, 5)}
CLIP, HOSTILE = 0.5, 3


def _aggregate(
    method: str, tmp: Path, hostile_scale: float, clip: float | None
) -> tuple[dict[str, torch.Tensor], float]:
    """The round-1 global state when every client moves 0.01 along a random direction from what it
    received, except client HOSTILE, which moves ``hostile_scale``; and the norm of HOSTILE's honest
    (0.01) change."""
    # the default bounds (validation.max_update_rms, max_change_entry) would reject the 1e2/1e6 changes outright,
    # and the clip to the round's median would bound them too: off here, so that robust.clip_norm alone is measured
    overrides = [
        f"method={method}",
        "validation.max_update_rms=null",
        "validation.max_change_entry=null",
        "robust.clip_to_median=null",
    ] + ([f"robust.clip_norm={clip}"] if clip else [])
    fed = Federation(tiny_cfg(*overrides), tmp, MODULES)
    fed.start()
    results, honest_change = [], 0.0
    for task in fed.begin_round(1):
        r = adapter_rank(task.broadcast.adapter)
        gen = torch.Generator().manual_seed(100 + task.client)
        step = {k: torch.randn(tuple(v.shape), generator=gen) for k, v in task.broadcast.adapter.items()}
        scale = hostile_scale if task.client == HOSTILE else 0.01
        if task.client == HOSTILE:
            honest_change = 0.01 * math.sqrt(sum(float(d.pow(2).sum()) for d in step.values()))
        tensors = {k: (v + scale * step[k]).contiguous() for k, v in task.broadcast.adapter.items()}
        results.append(ClientUpdate(task.client, r, 10, tensors, task.round, method, {}))
    fed.end_round(1, results)
    return {k: v.double() for k, v in fed.state.tensors.items()}, honest_change


def _distance(x: dict[str, torch.Tensor], y: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float((x[k] - y[k]).pow(2).sum()) for k in x))


@pytest.mark.parametrize("method", METHODS)
def test_clipping_bounds_a_hostile_update_with_every_method(method, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(logging.getLogger("prelort"), "propagate", True)  # a Session turns it off; caplog needs it
    honest, honest_change = _aggregate(method, tmp_path / "honest", 0.01, CLIP)  # the hostile client behaves
    with caplog.at_level(logging.INFO, logger="prelort"):
        big, _ = _aggregate(method, tmp_path / "big", 1e2, CLIP)
    huge, _ = _aggregate(method, tmp_path / "huge", 1e6, CLIP)
    unclipped, _ = _aggregate(method, tmp_path / "unclipped", 1e6, None)
    assert any(
        f"round 1: clipped client {HOSTILE} update change" in m and m.endswith(f"-> {CLIP:.4g}")
        for m in caplog.messages
    ), caplog.messages
    assert all(bool(torch.isfinite(t).all()) for t in huge.values())
    # the clipped influence does not grow with the attacker's scale ...
    influence = _distance(huge, honest)
    assert _distance(big, huge) <= 1e-4 * (1 + influence)
    # ... and stays small, while unclipped the attacker drags the model arbitrarily far
    assert influence < 10 * CLIP
    assert _distance(unclipped, honest) > 1e3 * max(influence, 1e-3)
    if method in ("prelort", "fedit", "zeropad"):
        # (segment-wise) weighted means of the factors with weights <= 1: one client moves the model by at
        # most the difference between its clipped change and the honest change it replaced
        assert influence <= CLIP + honest_change + 1e-6


# ----------------------------------------------------------------------------------------------
# fuzz: whatever bytes a client sends, the round goes on (Federation level, no training)
# ----------------------------------------------------------------------------------------------
def _fuzz_federation(tmp: Path) -> tuple[Federation, list[ClientTask], RawUpdate]:
    fed = Federation(tiny_cfg("clients.min_per_round=1", "clients.per_round=2", "clients.num=2"), tmp, MODULES)
    fed.start()
    tasks = fed.begin_round(1)
    t = tasks[0]
    update = ClientUpdate(t.client, adapter_rank(t.broadcast.adapter), 5, dict(t.broadcast.adapter), 1, "prelort")
    payload, meta = encode_update(update)
    return fed, tasks, RawUpdate(tasks[1].client, payload, json.dumps(dict(meta, client=tasks[1].client)))


def test_fuzzed_replies_are_rejected_and_the_round_goes_on(tmp_path):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    fed, tasks, template = _fuzz_federation(tmp_path)
    good_payload, good_meta = template.payload, template.meta
    honest = tasks[0]

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(data=st.data())
    def check(data):
        how = data.draw(st.sampled_from(["random", "flip", "cut", "meta"]))
        payload, meta = good_payload, good_meta
        if how == "random":
            payload = data.draw(st.binary(max_size=300))
        elif how == "flip":  # mutate bytes of a real update (header and data)
            b = bytearray(payload)
            for _ in range(data.draw(st.integers(1, 8))):
                i = data.draw(st.integers(0, len(b) - 1))
                b[i] = data.draw(st.integers(0, 255))
            payload = bytes(b)
        elif how == "cut":
            payload = payload[: data.draw(st.integers(0, len(payload) - 1))]
        else:
            meta = data.draw(
                st.one_of(
                    st.text(max_size=80),
                    st.binary(max_size=80),
                    st.dictionaries(
                        st.sampled_from(["rank", "num_examples", "method", "round", "client", "extra", "x"]),
                        st.one_of(st.integers(-3, 20), st.text(max_size=5), st.none(), st.floats()),
                    ),
                )
            )
        fed.begin_round(1)
        good = ClientUpdate(
            honest.client, adapter_rank(honest.broadcast.adapter), 5, dict(honest.broadcast.adapter), 1, "prelort"
        )
        outcome = fed.end_round(1, [good, RawUpdate(template.client, payload, meta)])
        assert outcome.accepted[0] == honest.client
        if len(outcome.accepted) == 1:  # the mutated reply was rejected with a known reason
            reason = outcome.rejected[template.client].split(":")[0]
            assert reason in set(REASONS) | set(ROUND_REASONS), outcome.rejected
            # no unexpected exception inside the decoder or the validator (those are caught as a last resort)
            assert reason != "invalid_update" and "could not decode" not in outcome.rejected[template.client]

    check()
