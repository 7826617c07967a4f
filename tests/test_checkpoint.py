"""Atomic checkpoints: round trips, crash safety, corruption errors, RNG state."""

from __future__ import annotations

import json
import os
import random

import pytest
import torch

import prelort.checkpoint as ckpt
from prelort.checkpoint import (
    CheckpointError,
    latest_round,
    load_checkpoint,
    random_state,
    recover,
    rng_state,
    save_checkpoint,
    set_random_state,
    set_rng_state,
    spec_from_checkpoint,
)
from prelort.methods.base import FederationSpec, GlobalState

MODULES = {"model.layers.0.self_attn.q_proj": (6, 5), "model.layers.1.self_attn.v_proj": (4, 5)}


def make_state(seed: int = 0, rank: int = 4) -> GlobalState:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for m, (d_out, d_in) in MODULES.items():
        tensors[f"{m}.lora_A"] = torch.randn(rank, d_in, generator=g)
        tensors[f"{m}.lora_B"] = torch.randn(d_out, rank, generator=g)
    return GlobalState(tensors=tensors, meta={"pruned": [4, 2, 1], "note": f"seed {seed}"})


def make_info(**extra) -> dict:
    g = torch.Generator().manual_seed(7)
    return {
        "method": "hetlora",
        "modules": {m: list(s) for m, s in MODULES.items()},
        "client_ranks": [1, 2, 4],
        "alpha": 16.0,
        "rng": rng_state(g),
        "options": {"prune": True, "gamma": 0.9},
    } | extra


def assert_same_state(a: GlobalState, b: GlobalState) -> None:
    assert set(a.tensors) == set(b.tensors)
    for name, t in a.tensors.items():
        assert b.tensors[name].dtype == t.dtype and b.tensors[name].shape == t.shape
        assert torch.equal(b.tensors[name].view(torch.int32), t.view(torch.int32)), name  # bit-exact
    assert a.meta == b.meta


def test_round_trip_is_bit_exact(tmp_path):
    state, info = make_state(), make_info()
    path = save_checkpoint(tmp_path, 0, state, info)
    assert path == tmp_path / "checkpoints" / "round-0"
    assert sorted(p.name for p in path.iterdir()) == ["adapter.safetensors", "checksums.json", "state.json"]
    doc = json.loads((path / "state.json").read_text())
    assert doc["round"] == 0 and doc["method"] == "hetlora" and doc["method_meta"] == state.meta
    round_, loaded, loaded_info = load_checkpoint(tmp_path)
    assert round_ == 0 and loaded_info == info
    assert_same_state(state, loaded)


def test_dense_state_and_shared_views_round_trip(tmp_path):
    full = torch.randn(10, 5)
    state = GlobalState(tensors={"m.lora_A": full[:4], "m.lora_B": full[4:].t(), "m.delta": torch.randn(6, 5)})
    save_checkpoint(tmp_path, 3, state, make_info())
    _, loaded, _ = load_checkpoint(tmp_path, 3)
    assert torch.equal(loaded.tensors["m.lora_A"], full[:4]) and torch.equal(loaded.tensors["m.lora_B"], full[4:].t())
    assert torch.equal(loaded.tensors["m.delta"], state.tensors["m.delta"])


def test_latest_round_and_explicit_rounds(tmp_path):
    assert latest_round(tmp_path) is None
    for r in (0, 1, 2, 10):
        save_checkpoint(tmp_path, r, make_state(seed=r), make_info())
    assert latest_round(tmp_path) == 10  # numeric, not lexicographic order
    assert load_checkpoint(tmp_path)[0] == 10
    round_, state, _ = load_checkpoint(tmp_path, 1)
    assert round_ == 1
    assert_same_state(make_state(seed=1), state)
    with pytest.raises(CheckpointError, match="round 5"):
        load_checkpoint(tmp_path, 5)


def test_spec_from_checkpoint(tmp_path):
    save_checkpoint(tmp_path, 0, make_state(), make_info())
    spec, method = spec_from_checkpoint(tmp_path)
    assert method == "hetlora"
    assert spec == FederationSpec(
        modules=MODULES, client_ranks=(1, 2, 4), alpha=16.0, options={"prune": True, "gamma": 0.9}
    )
    assert spec.max_rank == 4 and spec.scale == 4.0


def test_replacing_a_round_is_atomic_and_leaves_nothing_behind(tmp_path):
    save_checkpoint(tmp_path, 1, make_state(seed=1), make_info())
    save_checkpoint(tmp_path, 1, make_state(seed=2), make_info(alpha=8.0))
    _, state, info = load_checkpoint(tmp_path, 1)
    assert_same_state(make_state(seed=2), state)
    assert info["alpha"] == 8.0
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["round-1"]


def test_exception_during_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 0, make_state(seed=0), make_info())
    save_checkpoint(tmp_path, 1, make_state(seed=1), make_info())

    def crash(tensors, filename):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 2, make_state(seed=2), make_info())
    with pytest.raises(OSError, match="disk full"):  # replacing an existing round fails the same way
        save_checkpoint(tmp_path, 1, make_state(seed=3), make_info())
    assert latest_round(tmp_path) == 1
    assert_same_state(make_state(seed=1), load_checkpoint(tmp_path)[1])
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["round-0", "round-1"]


def test_crash_between_the_renames_of_a_replacement_restores_the_old_round(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 1, make_state(seed=1), make_info())
    real_replace, calls = os.replace, []

    def flaky_replace(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # round-1 moved aside, the new one not yet in place
            raise OSError("power cut")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", flaky_replace)
    with pytest.raises(OSError, match="power cut"):
        save_checkpoint(tmp_path, 1, make_state(seed=2), make_info())
    monkeypatch.undo()
    assert latest_round(tmp_path) == 1
    assert_same_state(make_state(seed=1), load_checkpoint(tmp_path, 1)[1])
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["round-1"]


def test_killed_writer_leftovers_are_ignored_by_readers_and_cleaned_by_the_writer(tmp_path):
    save_checkpoint(tmp_path, 0, make_state(seed=0), make_info())
    save_checkpoint(tmp_path, 1, make_state(seed=1), make_info())
    root = tmp_path / "checkpoints"
    # a process killed mid-write of round 2: a half-written temporary directory
    partial = root / ".round-2.tmp-abc123"
    partial.mkdir()
    (partial / "adapter.safetensors").write_bytes(b"\x10\x00\x00")
    # a process killed between the two renames replacing round 1: round-1 aside, no round-1
    os.replace(root / "round-1", root / ".round-1.old-xyz")
    assert latest_round(tmp_path) == 0  # readers see the last complete round ...
    assert_same_state(make_state(seed=0), load_checkpoint(tmp_path)[1])
    assert partial.exists()  # ... and never delete (a writer may be mid-save)
    recover(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == ["round-0", "round-1"]
    assert_same_state(make_state(seed=1), load_checkpoint(tmp_path)[1])
    partial.mkdir()
    save_checkpoint(tmp_path, 2, make_state(seed=2), make_info())  # the writer cleans up first
    assert sorted(p.name for p in root.iterdir()) == ["round-0", "round-1", "round-2"]


def test_bad_arguments_write_nothing(tmp_path):
    with pytest.raises(ValueError, match="round"):
        save_checkpoint(tmp_path, 0, make_state(), make_info(round=4))
    with pytest.raises(ValueError, match="method_meta"):
        save_checkpoint(tmp_path, 0, make_state(), make_info(method_meta={}))
    with pytest.raises(TypeError):
        save_checkpoint(tmp_path, 0, make_state(), make_info(rng=torch.Generator()))
    with pytest.raises(ValueError, match="non-negative"):
        save_checkpoint(tmp_path, -1, make_state(), make_info())
    assert latest_round(tmp_path) is None
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize(
    "damage, fragment",
    [
        (lambda d: (d / "state.json").write_text("{not json"), "state.json is not valid JSON"),
        (lambda d: (d / "state.json").write_text("[1, 2]"), "state.json: expected a JSON object"),
        (lambda d: (d / "state.json").write_text('{"round": 7, "method": "x"}'), "says round 7"),
        (lambda d: (d / "state.json").unlink(), "state.json is missing"),
        (lambda d: (d / "adapter.safetensors").unlink(), "adapter.safetensors is missing"),
        (
            lambda d: (d / "adapter.safetensors").write_bytes(b"garbage!garbage!"),
            "adapter.safetensors is not a readable",
        ),
    ],
)
@pytest.mark.parametrize("checksums", [True, False])
def test_corrupt_checkpoint_names_the_file(tmp_path, damage, fragment, checksums):
    save_checkpoint(tmp_path, 0, make_state(), make_info())
    if not checksums:  # a checkpoint of an earlier version: its files are parsed and checked as they are
        (tmp_path / "checkpoints" / "round-0" / "checksums.json").unlink()
    elif "missing" not in fragment:
        fragment = r"(state\.json|adapter\.safetensors) does not match its checksum"
    damage(tmp_path / "checkpoints" / "round-0")
    with pytest.raises(CheckpointError, match=fragment) as info:
        load_checkpoint(tmp_path, 0)
    assert str(tmp_path / "checkpoints" / "round-0") in str(info.value)
    # the latest: none is left to fall back to (an unreadable legacy adapter is damaged too)
    with pytest.raises(CheckpointError, match="no intact checkpoint"):
        load_checkpoint(tmp_path)


def test_a_truncated_latest_adapter_without_checksums_falls_back_to_the_previous_round(tmp_path, caplog):
    """A checkpoint without checksums.json (an earlier version's, or its checksums lost) whose adapter is cut
    short is skipped as a checksum mismatch is: with the same warning, for the last intact round."""
    for r in range(3):
        save_checkpoint(tmp_path, r, make_state(seed=r), make_info())
    damaged = tmp_path / "checkpoints" / "round-2"
    (damaged / "checksums.json").unlink()
    adapter = damaged / "adapter.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:-100])
    with caplog.at_level("WARNING", logger="prelort"):
        assert ckpt.latest_intact_round(tmp_path) == 1
    assert [r.getMessage() for r in caplog.records] == [
        f"checkpoint of round 2 is damaged (checkpoint file {adapter} is not a readable safetensors file: Error "
        "while deserializing header: incomplete metadata, file not fully covered); falling back to the previous round"
    ]
    round_, state, _ = load_checkpoint(tmp_path)
    assert round_ == 1
    assert_same_state(state, make_state(seed=1))
    # an intact checkpoint without checksums.json still loads (checkpoints of earlier versions)
    (tmp_path / "checkpoints" / "round-1" / "checksums.json").unlink()
    assert ckpt.latest_intact_round(tmp_path) == 1


def test_spec_from_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        spec_from_checkpoint(tmp_path)
    save_checkpoint(tmp_path, 0, make_state(), {"method": "prelort", "alpha": 1.0})
    with pytest.raises(CheckpointError, match=r"state.json lacks \['modules', 'client_ranks'\]"):
        spec_from_checkpoint(tmp_path)
    save_checkpoint(tmp_path, 0, make_state(), make_info(modules={"m": [3]}))
    with pytest.raises(CheckpointError, match="malformed"):
        spec_from_checkpoint(tmp_path)


def test_torch_rng_state_round_trips_through_json():
    g = torch.Generator().manual_seed(123)
    torch.rand(5, generator=g)
    saved = json.loads(json.dumps({"rng": rng_state(g)}))["rng"]
    expected = torch.rand(7, generator=g)
    other = set_rng_state(torch.Generator().manual_seed(999), saved)
    assert torch.equal(torch.rand(7, generator=other), expected)
    with pytest.raises(CheckpointError, match="base64"):
        set_rng_state(torch.Generator(), "not base64 !!")
    with pytest.raises(CheckpointError, match="does not fit"):
        set_rng_state(torch.Generator(), "AAAA")


def test_python_rng_state_round_trips_through_json():
    r = random.Random(5)
    r.random()
    r.gauss(0, 1)  # leaves a cached gauss_next
    saved = json.loads(json.dumps(random_state(r)))
    expected = [r.gauss(0, 1), r.random(), r.sample(range(100), 5)]
    other = set_random_state(random.Random(0), saved)
    assert [other.gauss(0, 1), other.random(), other.sample(range(100), 5)] == expected
    with pytest.raises(CheckpointError, match="malformed"):
        set_random_state(random.Random(), [1, 2])
