"""Client-update wire format, decoding of untrusted bytes, validation, and `prelort verify-update`."""

from __future__ import annotations

import io
import json
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as st_save
from typer.testing import CliRunner

from prelort import updates as updates_mod
from prelort.apps.cli import app
from prelort.checkpoint import save_checkpoint
from prelort.config import Config
from prelort.methods.base import ClientUpdate, FederationSpec, GlobalState
from prelort.methods.hetlora import HetLoRA
from prelort.protocol import RawUpdate, decode_raw
from prelort.updates import (
    MAX_HEADER_BYTES,
    REASONS,
    UpdateRejected,
    decode_update,
    encode_update,
    load_update,
    max_payload_bytes,
    save_update,
    update_norm,
    validate_update,
)

Q, V = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"
SPEC = FederationSpec(modules={Q: (6, 5), V: (4, 5)}, client_ranks=(1, 2, 4, 2), alpha=8.0)


def make_update(
    client: int = 2,
    rank: int = 4,
    *,
    seed: int = 0,
    round_: int = 3,
    method: str = "prelort",
    num_examples: int = 10,
    modules: dict[str, tuple[int, int]] | None = None,
) -> ClientUpdate:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for m, (d_out, d_in) in (modules or SPEC.modules).items():
        tensors[f"{m}.lora_A"] = torch.randn(rank, d_in, generator=g)
        tensors[f"{m}.lora_B"] = torch.randn(d_out, rank, generator=g)
    return ClientUpdate(
        client=client,
        rank=rank,
        num_examples=num_examples,
        tensors=tensors,
        round=round_,
        method=method,
        meta={"pruned_from": 4},
    )


def check(update: ClientUpdate, **kwargs) -> None:
    args = {"method": "prelort", "round_": 3, "seen_clients": None, "max_norm": None} | kwargs
    validate_update(update, SPEC, **args)


def rejected(fn, *args, **kwargs) -> UpdateRejected:
    with pytest.raises(UpdateRejected) as info:
        fn(*args, **kwargs)
    return info.value


# ----------------------------------------------------------------------------------------------
# round trips
# ----------------------------------------------------------------------------------------------
def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def test_encode_decode_round_trip_is_bit_exact():
    u = make_update()
    u.tensors[f"{Q}.lora_A"][0, 0] = -0.0  # sign of zero survives
    data, meta = encode_update(u)
    assert meta == {
        "rank": 4,
        "num_examples": 10,
        "method": "prelort",
        "round": 3,
        "client": 2,
        "extra": {"pruned_from": 4},
    }
    for form in (meta, json.dumps(meta), json.dumps(meta).encode()):
        v = decode_update(data, form)
        assert (v.client, v.rank, v.num_examples, v.round, v.method, v.meta) == (
            2,
            4,
            10,
            3,
            "prelort",
            {"pruned_from": 4},
        )
        assert set(v.tensors) == set(u.tensors)
        for name, t in u.tensors.items():
            assert v.tensors[name].dtype == torch.float32 and v.tensors[name].shape == t.shape
            assert torch.equal(_bits(v.tensors[name]), _bits(t))
    check(decode_update(data, meta))


def test_encode_casts_to_contiguous_float32_and_accepts_shared_views():
    full = torch.randn(8, 5, dtype=torch.float64)
    u = make_update()
    u.tensors[f"{Q}.lora_A"] = full[:4]  # a view sharing storage with ...
    u.tensors[f"{V}.lora_A"] = full[4:]  # ... this one
    u.tensors[f"{Q}.lora_B"] = torch.randn(4, 6).t()  # non-contiguous
    v = decode_update(*encode_update(u))
    assert all(t.dtype == torch.float32 and t.is_contiguous() for t in v.tensors.values())
    assert torch.equal(v.tensors[f"{Q}.lora_A"], full[:4].float())
    assert torch.equal(v.tensors[f"{Q}.lora_B"], u.tensors[f"{Q}.lora_B"])


def test_save_load_round_trip_writes_both_files(tmp_path):
    u = make_update(client=3, rank=2)
    path = save_update(tmp_path / "updates" / "round-3" / "client-3", u)
    assert path == tmp_path / "updates" / "round-3" / "client-3.safetensors"
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["rank"] == 2 and meta["num_examples"] == 10 and meta["client"] == 3
    assert sorted(p.name for p in path.parent.iterdir()) == ["client-3.json", "client-3.safetensors"]
    for given in (path, path.with_suffix(""), path.with_suffix(".json")):
        v = load_update(given)
        assert (v.client, v.rank, v.round, v.meta) == (3, 2, 3, {"pruned_from": 4})
        for name, t in u.tensors.items():
            assert torch.equal(_bits(v.tensors[name]), _bits(t))
    # overwrite keeps the pair consistent
    u2 = make_update(client=3, rank=1, seed=5)
    save_update(path, u2)
    v = load_update(path)
    assert v.rank == 1 and torch.equal(v.tensors[f"{V}.lora_B"], u2.tensors[f"{V}.lora_B"])


def test_load_update_without_json_is_rejected(tmp_path):
    path = save_update(tmp_path / "client-0", make_update())
    path.with_suffix(".json").unlink()
    err = rejected(load_update, path)
    assert err.reason == "missing_metadata" and "client-0.json" in err.message
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_update(tmp_path / "nope.safetensors")


def test_valid_update_is_accepted_and_recorded():
    seen: set[int] = set()
    check(make_update(), seen_clients=seen, max_norm=1e6)
    assert seen == {2}
    # a client may send a smaller rank than its configured one (HetLoRA pruning / FedIT)
    check(make_update(client=1, rank=1), seen_clients=seen)
    check(make_update(client=3, rank=2), seen_clients=seen)
    check(make_update(client=0, rank=1), seen_clients=seen)
    assert seen == {0, 1, 2, 3}
    check(make_update(client=2, rank=1))  # pruned rank


def test_update_norm_is_frobenius_norm_of_all_factors():
    u = make_update()
    expected = torch.sqrt(sum((t.double() ** 2).sum() for t in u.tensors.values()))
    assert update_norm(u.tensors) == pytest.approx(float(expected), rel=1e-12)


# ----------------------------------------------------------------------------------------------
# validation: every rejection kind has its own reason code and names the culprit
# ----------------------------------------------------------------------------------------------
def _set(name: str, i: int, value: float):
    def mutate(u: ClientUpdate) -> None:
        u.tensors[name].view(-1)[i] = value

    return mutate


def _replace(name: str, tensor: torch.Tensor):
    def mutate(u: ClientUpdate) -> None:
        u.tensors[name] = tensor

    return mutate


def _attr(field: str, value):
    def mutate(u: ClientUpdate) -> None:
        setattr(u, field, value)

    return mutate


def _drop(*names: str):
    def mutate(u: ClientUpdate) -> None:
        for n in names:
            del u.tensors[n]

    return mutate


def _add(**tensors):
    def mutate(u: ClientUpdate) -> None:
        u.tensors.update({k.replace("__", "."): v for k, v in tensors.items()})

    return mutate


def _rank(client: int, rank: int):
    def mutate(u: ClientUpdate) -> None:
        fresh = make_update(client=client, rank=rank)
        u.client, u.rank, u.tensors = fresh.client, fresh.rank, fresh.tensors

    return mutate


VALIDATION_CASES = {
    "nan": (_set(f"{Q}.lora_A", 3, float("nan")), {}, "non_finite", [f"{Q}.lora_A", "NaN"]),
    "+inf": (_set(f"{V}.lora_B", 0, float("inf")), {}, "non_finite", [f"{V}.lora_B", "+inf"]),
    "-inf": (_set(f"{Q}.lora_B", 5, float("-inf")), {}, "non_finite", [f"{Q}.lora_B", "-inf"]),
    "float16": (
        _replace(f"{Q}.lora_A", torch.zeros(4, 5, dtype=torch.float16)),
        {},
        "wrong_dtype",
        [f"{Q}.lora_A", "float16"],
    ),
    "int64": (
        _replace(f"{V}.lora_B", torch.zeros(4, 4, dtype=torch.int64)),
        {},
        "wrong_dtype",
        [f"{V}.lora_B", "int64"],
    ),
    "float64": (_replace(f"{V}.lora_A", torch.zeros(4, 5, dtype=torch.float64)), {}, "wrong_dtype", ["float64"]),
    "shape_vs_declared_rank": (_attr("rank", 2), {}, "shape_rank_mismatch", ["rank 4", "declared rank is 2"]),
    "A_vs_base_model": (
        _replace(f"{Q}.lora_A", torch.zeros(4, 7)),
        {},
        "shape_model_mismatch",
        [f"{Q}.lora_A", "(4, 7)", "(r, 5)"],
    ),
    "B_vs_base_model": (
        _replace(f"{V}.lora_B", torch.zeros(9, 4)),
        {},
        "shape_model_mismatch",
        [f"{V}.lora_B", "(9, 4)", "(4, r)"],
    ),
    "A_not_2d": (_replace(f"{V}.lora_A", torch.zeros(4, 5, 1)), {}, "shape_model_mismatch", [f"{V}.lora_A"]),
    "A_B_ranks_differ": (
        _replace(f"{Q}.lora_B", torch.zeros(6, 3)),
        {},
        "ab_rank_mismatch",
        [f"{Q}.lora_A has rank 4", "lora_B has rank 3"],
    ),
    "rank_zero": (_attr("rank", 0), {}, "bad_rank", ["rank 0"]),
    "rank_negative": (_attr("rank", -2), {}, "bad_rank", ["rank -2"]),
    "rank_above_max": (_rank(2, 8), {}, "rank_above_max", ["rank 8", "R = 4"]),
    "rank_above_client": (_rank(1, 4), {}, "rank_above_client", ["client 1", "rank 4", "configured rank 2"]),
    "unknown_module": (
        _add(
            **{"model__layers__9__mlp__lora_A": torch.zeros(4, 5), "model__layers__9__mlp__lora_B": torch.zeros(6, 4)}
        ),
        {},
        "unknown_module",
        ["model.layers.9.mlp"],
    ),
    "missing_module": (_drop(f"{V}.lora_A", f"{V}.lora_B"), {}, "missing_module", [f"{V}.lora_A"]),
    "missing_B": (_drop(f"{Q}.lora_B"), {}, "missing_module", [f"{Q}.lora_B"]),
    "extra_key_kind": (_add(**{f"{Q}.lora_C".replace(".", "__"): torch.zeros(1)}), {}, "extra_key", [f"{Q}.lora_C"]),
    "extra_key_plain": (_add(bias=torch.zeros(1)), {}, "extra_key", ["'bias'"]),
    "extra_key_peft_style": (
        _add(**{f"{Q}.lora_A.weight".replace(".", "__"): torch.zeros(4, 5)}),
        {},
        "extra_key",
        [f"{Q}.lora_A.weight"],
    ),
    "norm_above_bound": (lambda u: None, {"max_norm": 1.0}, "norm_too_large", ["exceeds the bound 1"]),
    "round_mismatch": (_attr("round", 2), {}, "round_mismatch", ["round 2", "round 3"]),
    "method_mismatch": (_attr("method", "flora"), {}, "method_mismatch", ["'flora'", "'prelort'"]),
    "client_too_large": (_attr("client", 4), {}, "client_out_of_range", ["client id 4", "0..3"]),
    "client_negative": (_attr("client", -1), {}, "client_out_of_range", ["client id -1"]),
    "duplicate_client": (lambda u: None, {"seen_clients": {0, 2}}, "duplicate_client", ["client 2 already"]),
    "zero_examples": (_attr("num_examples", 0), {}, "bad_num_examples", ["num_examples = 0"]),
    "negative_examples": (_attr("num_examples", -5), {}, "bad_num_examples", ["num_examples = -5"]),
    "huge_examples": (
        _attr("num_examples", 10**400),
        {},
        "bad_num_examples",
        ["num_examples = 1000", "[1, 1000000000]"],
    ),
    "rms_above_bound": (
        lambda u: u.tensors[f"{Q}.lora_A"].mul_(1e12),
        {"max_rms": 10.0},
        "norm_too_large",
        ["validation.max_update_rms=10", "root-mean-square"],
    ),
    "change_above_bound": (
        lambda u: u.tensors[f"{Q}.lora_B"].__setitem__((0, 0), u.tensors[f"{Q}.lora_B"][0, 0] + 0.75),
        {"reference": make_update().tensors, "max_change_entry": 0.5},
        "change_too_large",
        [f"{Q}.lora_B changed by 0.75", "bound 0.5 (validation.max_change_entry)"],
    ),
    "non_finite_extra": (_attr("meta", {"loss": float("inf")}), {}, "bad_metadata", ["extra.loss = inf"]),
    "lone_surrogate_extra_key": (
        _attr("meta", {"ok": {"\ud800": 1}}),
        {},
        "bad_metadata",
        ["extra.ok key '\\ud800'", "lone surrogate"],
    ),
    "hetlora_pruned_to_zero": (
        lambda u: (_attr("method", "hetlora")(u), u.meta.update(pruned_to=0)),
        {"method": HetLoRA(SPEC)},
        "bad_method_field",
        ["pruned_to = 0", "[1, 4]"],
    ),
    "hetlora_pruned_to_text": (
        lambda u: (_attr("method", "hetlora")(u), u.meta.update(pruned_to="8")),
        {"method": HetLoRA(SPEC)},
        "bad_method_field",
        ["pruned_to = '8'"],
    ),
}


@pytest.mark.parametrize("case", list(VALIDATION_CASES))
def test_validation_rejects_with_its_own_reason(case):
    mutate, kwargs, reason, fragments = VALIDATION_CASES[case]
    u = make_update()
    mutate(u)
    seen = kwargs.get("seen_clients")
    before = set(seen) if seen is not None else None
    err = rejected(check, u, **kwargs)
    assert err.reason == reason, err
    for fragment in fragments:
        assert fragment in err.message, (fragment, err.message)
    assert str(err).startswith(reason + ": ")
    if seen is not None:
        assert seen == before  # a rejected update is not recorded


def test_the_change_bound_measures_the_change_not_the_factors():
    """Issue 26: a factor far from zero is fine when the client received it (an honest client after any earlier
    round is never refused for what the global model holds); a client that sent a lower rank (pruned) is compared
    with the prefix of what it received."""
    received = {k: v + 100.0 for k, v in make_update().tensors.items()}
    honest = make_update()
    honest.tensors = {k: (v + 0.01).contiguous() for k, v in received.items()}
    check(honest, reference=received, max_change_entry=0.5, max_rms=None)
    pruned = make_update(rank=2)
    pruned.tensors = {k: (v[:2] if k.endswith("lora_A") else v[:, :2]).clone() for k, v in received.items()}
    check(pruned, reference=received, max_change_entry=0.5, max_rms=None)
    pruned.tensors[f"{V}.lora_A"][1, 0] += 0.6
    assert rejected(check, pruned, reference=received, max_change_entry=0.5, max_rms=None).reason == "change_too_large"


def test_rejected_update_travels_the_wire_and_is_still_rejected():
    """The same problems reach validation through encode/decode (tensors are float32 on the wire)."""
    u = make_update()
    u.tensors[f"{Q}.lora_A"][1, 1] = float("nan")
    err = rejected(check, decode_update(*encode_update(u)))
    assert err.reason == "non_finite" and f"{Q}.lora_A" in err.message


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.int32, torch.int8])
def test_decoded_payload_with_wrong_dtype_is_rejected(dtype):
    u = make_update()
    tensors = dict(u.tensors)
    tensors[f"{V}.lora_A"] = tensors[f"{V}.lora_A"].to(dtype)
    _, meta = encode_update(u)
    err = rejected(check, decode_update(st_save(tensors), meta))
    assert err.reason == "wrong_dtype" and f"{V}.lora_A" in err.message


# ----------------------------------------------------------------------------------------------
# decoding untrusted bytes
# ----------------------------------------------------------------------------------------------
@pytest.fixture()
def wire():
    return encode_update(make_update())


def _safetensors_bytes(header: dict, body: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


@pytest.mark.parametrize(
    "payload, reason",
    [
        (b"", "not_safetensors"),
        (b"abc", "not_safetensors"),
        (b"\x00" * 64, "not_safetensors"),  # header length 0: no JSON header
        (b"hello world, not a tensor file", "header_too_large"),  # "hello wo" read as a length
        (json.dumps({"a": 1}).encode(), "header_too_large"),
    ],
)
def test_bytes_that_are_not_safetensors(payload, reason, wire):
    assert rejected(decode_update, payload, wire[1]).reason == reason


def test_garbage_header_is_not_safetensors(wire):
    err = rejected(decode_update, struct.pack("<Q", 5) + b"nope!", wire[1])
    assert err.reason == "not_safetensors" and "JSON object" in err.message
    err = rejected(
        decode_update,
        _safetensors_bytes({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\x00" * 4),
        wire[1],
    )
    assert err.reason == "not_safetensors" and "'x'" in err.message and "8 bytes" in err.message
    err = rejected(decode_update, wire[0] + b"\x00" * 4, wire[1])  # trailing bytes
    assert err.reason == "not_safetensors" and "unexplained bytes" in err.message
    err = rejected(
        decode_update,
        _safetensors_bytes(
            {
                "x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                "y": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
            },
            b"\x00" * 4,
        ),
        wire[1],
    )
    assert err.reason == "not_safetensors" and "starts at byte 0, expected 4" in err.message  # aliasing
    err = rejected(
        decode_update,
        _safetensors_bytes({"x": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, b"\x00" * 8),
        wire[1],
    )
    assert err.reason == "wrong_dtype" and "'C64'" in err.message


@pytest.mark.parametrize("keep", [1, 7, 8, 20, -1, -17])
def test_truncated_payload(keep, wire):
    data = wire[0][:keep]
    err = rejected(decode_update, data, wire[1])
    assert err.reason == ("not_safetensors" if len(data) < 8 else "truncated"), err
    if len(data) >= 8:
        assert "only" in err.message


@pytest.mark.parametrize("claimed", [MAX_HEADER_BYTES + 1, 2**40, 2**64 - 1])
def test_header_claiming_huge_size_is_rejected_without_allocating(claimed, wire):
    data = struct.pack("<Q", claimed) + b"{}" + b" " * 30
    err = rejected(decode_update, data, wire[1])
    assert err.reason == "header_too_large" and str(claimed) in err.message


def test_tensor_claiming_huge_size_is_rejected(wire):
    n = 2**20
    header = {"x.lora_A": {"dtype": "F32", "shape": [n, n], "data_offsets": [0, 4 * n * n]}}
    err = rejected(decode_update, _safetensors_bytes(header, b"\x00" * 16), wire[1])
    assert err.reason == "truncated" and "'x.lora_A'" in err.message and str(4 * n * n) in err.message


class _Marker:
    """Unpickling this creates a file: proof that a payload was (or was not) unpickled."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _pickle_payloads(marker: Path) -> dict[str, bytes]:
    buf = io.BytesIO()
    torch.save({"evil": _Marker(marker), "w": torch.ones(2)}, buf)
    out = {f"pickle-protocol-{p}": pickle.dumps(_Marker(marker), protocol=p) for p in range(0, 6)}
    out["torch.save"] = buf.getvalue()
    out["tiny-pickle"] = pickle.dumps(None, protocol=4)
    return out


def test_pickle_payloads_are_rejected_and_never_unpickled(tmp_path, wire):
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Marker(probe)))  # the payload does create the file when unpickled ...
    assert probe.exists()
    marker = tmp_path / "marker"
    for name, payload in _pickle_payloads(marker).items():
        err = rejected(decode_update, payload, wire[1])
        assert err.reason == "pickle_payload", (name, err)
        assert "pickle" in err.message
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(payload)
        path.with_suffix(".json").write_text(json.dumps(wire[1]))
        assert rejected(load_update, path).reason == "pickle_payload"
    assert not marker.exists()  # ... but decoding never unpickles


def test_short_real_payload_whose_length_starts_with_0x80_is_truncated_not_pickle(wire):
    # header length 0x0280 = 640 begins with bytes 80 02, like a pickle; it is a truncated safetensors file
    header = {"x.lora_A": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    raw = json.dumps(header).encode().ljust(0x280)
    data = struct.pack("<Q", len(raw)) + raw + b"\x00" * 4
    assert data[:2] == b"\x80\x02"
    assert decode_update(data, {"rank": 1, "num_examples": 1, "method": "m", "round": 0, "client": 0}).tensors
    err = rejected(decode_update, data[:100], {"rank": 1, "num_examples": 1, "method": "m", "round": 0, "client": 0})
    assert err.reason == "truncated"


# ----------------------------------------------------------------------------------------------
# metadata
# ----------------------------------------------------------------------------------------------
GOOD_META = {"rank": 4, "num_examples": 10, "method": "prelort", "round": 3, "client": 2}


@pytest.mark.parametrize(
    "meta, fragment",
    [
        (b"{not json", "not JSON"),
        ("", "not JSON"),
        (b"\xff\xfe\x00", "UTF-8"),
        ("[1, 2]", "JSON object"),
        ("3", "JSON object"),
        ('{"rank": NaN, "num_examples": 1, "method": "m", "round": 0, "client": 0}', "NaN"),
        ([1], "JSON object"),
    ],
)
def test_metadata_not_a_json_object(meta, fragment, wire):
    err = rejected(decode_update, wire[0], meta)
    assert err.reason == "bad_metadata" and fragment in err.message


@pytest.mark.parametrize("field", list(GOOD_META))
def test_metadata_lacking_a_field(field, wire):
    meta = {k: v for k, v in GOOD_META.items() if k != field}
    err = rejected(decode_update, wire[0], json.dumps(meta))
    assert err.reason == "bad_metadata" and repr(field) in err.message


@pytest.mark.parametrize(
    "field, value",
    [
        ("rank", "4"),
        ("rank", 4.0),
        ("rank", True),
        ("rank", None),
        ("num_examples", 10.5),
        ("num_examples", [10]),
        ("round", "3"),
        ("client", False),
        ("client", 2.0),
        ("method", 3),
        ("method", None),
        ("extra", [1]),
    ],
)
def test_metadata_with_wrong_types(field, value, wire):
    err = rejected(decode_update, wire[0], GOOD_META | {field: value})
    assert err.reason == "bad_metadata" and repr(field) in err.message


def test_metadata_with_unknown_field(wire):
    err = rejected(decode_update, wire[0], GOOD_META | {"admin": True})
    assert err.reason == "bad_metadata" and "'admin'" in err.message


@pytest.mark.parametrize(
    "field, value, reason",
    [
        ("rank", 0, "bad_rank"),
        ("rank", -1, "bad_rank"),
        ("num_examples", 0, "bad_num_examples"),
        ("num_examples", -4, "bad_num_examples"),
        ("round", -1, "round_mismatch"),
        ("client", -3, "client_out_of_range"),
    ],
)
def test_metadata_values_out_of_range(field, value, reason, wire):
    err = rejected(decode_update, wire[0], GOOD_META | {field: value})
    assert err.reason == reason and f"{field!r} = {value}" in err.message


SURROGATE = "\ud800"  # what JSON's "\\ud800" escape decodes to: a str that UTF-8 cannot encode


@pytest.mark.parametrize(
    "meta, where",
    [
        (GOOD_META | {"extra": {SURROGATE: 1}}, "extra key"),
        (GOOD_META | {"extra": {SURROGATE: 1e300}}, "extra key"),  # refused for the key, before its value
        (GOOD_META | {"extra": {"a": [{"b": {"c" + SURROGATE: 1}}]}}, "extra.a[0].b key"),
        (GOOD_META | {"extra": {"note": "x" + SURROGATE + "y"}}, "extra.note ="),
        (GOOD_META | {"method": "prelort" + SURROGATE}, "'method' ="),
    ],
)
def test_metadata_strings_that_are_not_valid_text_are_refused(meta, where, wire):
    """Issue 26 item 3: a lone surrogate anywhere in the metadata is bad metadata, named escaped."""
    for form in (meta, json.dumps(meta), json.dumps(meta).encode()):
        err = rejected(decode_update, wire[0], form)
        assert err.reason == "bad_metadata", err
        assert f"metadata {where} " in err.message and "lone surrogate" in err.message, err.message
        assert "\\ud800" in err.message and SURROGATE not in str(err)
        str(err).encode("utf-8")  # what a log handler or the terminal does with it


def test_a_rejection_message_is_always_one_encodable_line(tmp_path):
    """Whatever a client put into the text a rejection quotes, it reaches a UTF-8 log file as one line."""
    err = UpdateRejected("bad_metadata", f"key {SURROGATE}\nsecond line\u2028third\tend é")
    assert err.message == "key \\ud800\\nsecond line\\u2028third\\tend é" and str(err) == f"bad_metadata: {err.message}"
    log = tmp_path / "run.log"
    with log.open("w", encoding="utf-8") as f:
        f.write(f"rejected: {err}\n")
    assert len(log.read_text(encoding="utf-8").splitlines()) == 1


def _zero_size_tensors(count: int) -> bytes:
    """A safetensors payload of ``count`` empty tensors ``x0`` ... (issue 26 item 4: 240,000 made 16 MB)."""
    entry = '"x{}":{{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}'
    raw = ("{" + ",".join(entry.format(i) for i in range(count)) + "}").encode()
    return struct.pack("<Q", len(raw)) + raw


@pytest.fixture()
def tensor_decodes(monkeypatch) -> list[int]:
    """The sizes of the payloads handed to safetensors' decoder from now on."""
    calls: list[int] = []
    real = updates_mod._st_load

    def spy(data: bytes):
        calls.append(len(data))
        return real(data)

    monkeypatch.setattr(updates_mod, "_st_load", spy)
    return calls


def test_a_header_of_240000_zero_size_tensors_is_refused_before_decoding(tmp_path, tensor_decodes):
    """Issue 26 item 4: the header is checked against the layout before any tensor is decoded, by
    `verify-update` (load_update) and by the round loop (decode_raw) alike: 240,000 tensors (14 MB)
    are more than the header of this federation's 4 tensors can hold, so the header is not even parsed."""
    payload = _zero_size_tensors(240_000)
    assert len(payload) <= max_payload_bytes(SPEC) and len(payload) - 8 <= MAX_HEADER_BYTES  # formerly parsed
    (tmp_path / "u.safetensors").write_bytes(payload)
    (tmp_path / "u.json").write_text(json.dumps(GOOD_META))
    result = _invoke(_run_dir(tmp_path), tmp_path / "u.safetensors")
    assert result.exit_code == 2, result.output
    assert tensor_decodes == [], "verify-update decoded the tensors before refusing the header"
    assert result.output.startswith(f"rejected: header_too_large: client 2: header of {len(payload) - 8} bytes ")
    assert f"the {updates_mod.max_header_bytes(SPEC)} bytes the 4 tensors" in result.output
    assert len(result.output.splitlines()) == 1
    err = rejected(decode_raw, RawUpdate(2, payload, GOOD_META), max_payload_bytes(SPEC), SPEC)
    assert err.reason == "header_too_large", err
    assert tensor_decodes == [], "the round loop's decoder decoded the tensors before refusing the header"


def test_more_tensors_than_the_layout_has_are_refused_before_decoding(tmp_path, tensor_decodes):
    """Within the header bound, the names (and so their number) are checked before decoding."""
    payload = _zero_size_tensors(600)
    assert len(payload) - 8 < updates_mod.max_header_bytes(SPEC)
    (tmp_path / "u.safetensors").write_bytes(payload)
    (tmp_path / "u.json").write_text(json.dumps(GOOD_META))
    result = _invoke(_run_dir(tmp_path), tmp_path / "u.safetensors")
    assert result.exit_code == 2, result.output
    assert tensor_decodes == [], "verify-update decoded the tensors before refusing their names"
    assert result.output.startswith("rejected: extra_key: client 2: unexpected tensor 'x0' (only <module>.lora_A")
    assert "the update holds 600 tensors, an update of this federation has 4" in result.output
    assert len(result.output.splitlines()) == 1
    err = rejected(decode_raw, RawUpdate(2, payload, GOOD_META), max_payload_bytes(SPEC), SPEC)
    assert err.reason == "extra_key" and "600 tensors" in err.message
    assert tensor_decodes == [], "the round loop's decoder decoded the tensors before refusing their names"


@pytest.mark.parametrize(
    "extra, reason, fragment",
    [
        ({"bias": torch.zeros(1)}, "extra_key", "'bias'"),
        ({"model.layers.9.mlp.lora_A": torch.zeros(0)}, "unknown_module", "'model.layers.9.mlp'"),
        ({f"{Q}.lora_C": torch.zeros(0), "z": torch.zeros(0)}, "extra_key", f"'{Q}.lora_C'"),  # the smallest
    ],
)
def test_unexpected_tensor_names_are_refused_undecoded_with_the_validation_reason(extra, reason, fragment, wire):
    u = make_update()
    u.tensors.update(extra)
    validated = rejected(check, u)
    assert (validated.reason, fragment in validated.message) == (reason, True)
    data = st_save(u.tensors)
    assert rejected(decode_update, data, wire[1], spec=SPEC).message == validated.message
    assert isinstance(decode_update(data, wire[1]), ClientUpdate)  # without the layout: decoded, checked later


def test_a_valid_update_decodes_with_the_layout_check(tmp_path, wire, tensor_decodes):
    u = decode_update(*wire, spec=SPEC)
    check(u)
    check(load_update(save_update(tmp_path / "u", make_update()), spec=SPEC))
    assert len(tensor_decodes) == 2


def test_payload_above_the_federation_size_is_refused_unread(tmp_path, wire):
    err = rejected(decode_update, wire[0], wire[1], max_bytes=len(wire[0]) - 1)
    assert err.reason == "too_large" and f"payload of {len(wire[0])} bytes" in err.message
    assert decode_update(wire[0], wire[1], max_bytes=len(wire[0])).rank == 4


def test_every_reason_code_is_exercised():
    exercised = {case[2] for case in VALIDATION_CASES.values()} | {
        "not_safetensors",
        "truncated",
        "header_too_large",
        "pickle_payload",
        "bad_metadata",
        "missing_metadata",
        "too_large",
    }  # too_large: test_payload_above_the_federation_size_is_refused_unread
    assert exercised == set(REASONS) - {"not_sampled"}  # not_sampled: raised by the round loop


# ----------------------------------------------------------------------------------------------
# prelort verify-update
# ----------------------------------------------------------------------------------------------
def _run_dir(tmp_path: Path, max_norm: float | None = 1000.0, last_round: int = 2) -> Path:
    run = tmp_path / "run"
    g = torch.Generator().manual_seed(1)
    state = GlobalState(
        tensors={
            f"{m}.{k}": torch.randn(*shape, generator=g)
            for m, (d_out, d_in) in SPEC.modules.items()
            for k, shape in (("lora_A", (4, d_in)), ("lora_B", (d_out, 4)))
        }
    )
    info = {
        "method": "prelort",
        "modules": {m: list(s) for m, s in SPEC.modules.items()},
        "client_ranks": list(SPEC.client_ranks),
        "alpha": SPEC.alpha,
        "rng": "",
    }
    for r in range(last_round + 1):
        save_checkpoint(run, r, state, info)
    cfg = Config.model_validate(
        {"clients": {"num": 4, "ranks": [1, 2, 4, 2]}, "validation": {"max_update_norm": max_norm}}
    )
    (run / "config.yaml").write_text(cfg.to_yaml())
    return run


def _invoke(*args: str):
    return CliRunner().invoke(app, ["verify-update", *map(str, args)])


def test_verify_update_accepts_a_good_update(tmp_path):
    run = _run_dir(tmp_path)
    path = save_update(tmp_path / "client-2", make_update(round_=3))
    result = _invoke(run, path)
    assert result.exit_code == 0, result.output
    assert result.output.startswith("accepted: client 2, rank 4, round 3")
    assert "bound 1000" in result.output


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (_set(f"{Q}.lora_A", 0, float("nan")), "non_finite"),
        (_rank(1, 4), "rank_above_client"),
        (_attr("round", 2), "round_mismatch"),
        (_attr("method", "fedit"), "method_mismatch"),
        (_drop(f"{V}.lora_A", f"{V}.lora_B"), "missing_module"),
    ],
)
def test_verify_update_rejects_a_bad_update(tmp_path, mutate, reason):
    run = _run_dir(tmp_path)
    u = make_update(round_=3)
    mutate(u)
    path = save_update(tmp_path / "bad", u)
    result = _invoke(run, path)
    assert result.exit_code == 2, result.output
    assert result.output.startswith(f"rejected: {reason}: ")


def test_verify_update_uses_the_configured_norm_bound(tmp_path):
    path = save_update(tmp_path / "u", make_update(round_=3))
    result = _invoke(_run_dir(tmp_path, max_norm=0.5), path)
    assert result.exit_code == 2 and "rejected: norm_too_large" in result.output and "0.5" in result.output
    result = _invoke(_run_dir(tmp_path / "b", max_norm=None), path)
    assert result.exit_code == 0, result.output


def test_verify_update_round_option_and_file_problems(tmp_path):
    run = _run_dir(tmp_path)
    path = save_update(tmp_path / "old", make_update(round_=1))
    assert _invoke(run, path).exit_code == 2
    result = _invoke(run, path, "--round", "1")
    assert result.exit_code == 0 and "round 1" in result.output
    evil = tmp_path / "evil.safetensors"
    evil.write_bytes(pickle.dumps({"a": 1}))
    evil.with_suffix(".json").write_text(json.dumps(GOOD_META))
    result = _invoke(run, evil)
    assert result.exit_code == 2 and "rejected: pickle_payload" in result.output
    path.with_suffix(".json").unlink()
    result = _invoke(run, path)
    assert result.exit_code == 2 and "rejected: missing_metadata" in result.output
    result = _invoke(run, tmp_path / "absent.safetensors")
    assert result.exit_code == 2 and "absent.safetensors" in result.output


def test_verify_update_needs_a_checkpoint(tmp_path):
    path = save_update(tmp_path / "u", make_update())
    (tmp_path / "empty").mkdir()
    result = _invoke(tmp_path / "empty", path)
    assert result.exit_code == 1 and "no checkpoint" in result.output


@pytest.mark.parametrize("extra", [{SURROGATE: 1}, {SURROGATE: 1e300}, {"n": {"x": SURROGATE}}])
def test_verify_update_refuses_a_lone_surrogate_in_extra(tmp_path, extra):
    """Issue 26 item 3: exit 2 with the usual one-line reason (was: accepted, or exit 1 with an internal error)."""
    path = save_update(tmp_path / "u", make_update(round_=3))
    meta = json.loads(path.with_suffix(".json").read_text())
    path.with_suffix(".json").write_text(json.dumps(meta | {"extra": extra}))
    result = _invoke(_run_dir(tmp_path), path)
    assert result.exit_code == 2, result.output
    assert result.output.startswith("rejected: bad_metadata: metadata extra") and "\\ud800" in result.output
    assert "lone surrogate" in result.output and len(result.output.splitlines()) == 1
