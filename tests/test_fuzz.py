"""Property-based fuzzing of the untrusted-input parsers: client updates and configs.

Nothing may escape but the documented error types: ``UpdateRejected`` for updates, ``ConfigError``
for configs (both ValueError subclasses, but a bare ValueError/TypeError/KeyError is a bug).
"""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel
from safetensors.torch import save as st_save

from prelort import config as config_mod
from prelort import updates
from prelort.config import Config, ConfigError, method_sections
from prelort.methods.base import ClientUpdate, FederationSpec
from prelort.updates import UpdateRejected, decode_update, encode_update, parse_metadata, validate_update

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

SPEC = FederationSpec(modules={"l0.q": (3, 4), "l1.v": (2, 4)}, client_ranks=(1, 2, 2), alpha=4.0)
_g = torch.Generator().manual_seed(0)
VALID = ClientUpdate(
    client=1,
    rank=2,
    num_examples=3,
    round=1,
    method="prelort",
    tensors={
        "l0.q.lora_A": torch.randn(2, 4, generator=_g),
        "l0.q.lora_B": torch.randn(3, 2, generator=_g),
        "l1.v.lora_A": torch.randn(2, 4, generator=_g),
        "l1.v.lora_B": torch.randn(2, 2, generator=_g),
    },
)
VALID_BYTES, VALID_META = encode_update(VALID)

json_scalars = (
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


def assert_loggable(e: UpdateRejected) -> None:
    """A rejection is one line of text that a UTF-8 log file takes (issue 26 item 3)."""
    str(e).encode("utf-8")
    assert len(str(e).splitlines()) == 1, str(e)


def decode_or_reject(data: bytes, meta) -> ClientUpdate | None:
    """Decode; a successful decode must also validate or be rejected cleanly."""
    try:
        update = decode_update(data, meta)
    except UpdateRejected as e:
        assert e.reason and e.message
        assert_loggable(e)
        return None
    try:
        validate_update(update, SPEC, method="prelort", round_=1, seen_clients=set(), max_norm=100.0)
    except UpdateRejected:
        pass
    return update


# ----------------------------------------------------------------------------------------------
# client updates
# ----------------------------------------------------------------------------------------------
@FUZZ
@given(st.binary(max_size=512))
def test_random_bytes(data):
    decode_or_reject(data, VALID_META)


@FUZZ
@given(
    st.binary(min_size=8, max_size=8) | st.integers(0, 2**64 - 1).map(lambda n: struct.pack("<Q", n)),
    st.binary(max_size=256),
)
def test_random_header_length(prefix, rest):
    decode_or_reject(prefix + rest, VALID_META)


@FUZZ
@given(st.data())
def test_mutated_valid_payload(data):
    payload = bytearray(VALID_BYTES)
    for _ in range(data.draw(st.integers(1, 6))):
        op = data.draw(st.sampled_from(["flip", "truncate", "insert", "delete"]))
        pos = data.draw(st.integers(0, max(len(payload) - 1, 0)))
        if op == "flip" and payload:
            payload[pos] ^= data.draw(st.integers(1, 255))
        elif op == "truncate":
            del payload[pos:]
        elif op == "insert":
            payload[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del payload[pos : pos + data.draw(st.integers(1, 8))]
    decode_or_reject(bytes(payload), VALID_META)


header_entries = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(["F32", "F16", "I64", "BOOL", "C64", "XX", ""]) | json_values,
        "shape": st.lists(st.integers(-2, 2**40), max_size=4) | json_values,
        "data_offsets": st.lists(st.integers(-2, 2**40), min_size=0, max_size=3) | json_values,
    }
)


@FUZZ
@given(
    st.dictionaries(
        st.sampled_from(list(VALID.tensors)) | st.text(max_size=10), header_entries | json_values, max_size=5
    ),
    st.binary(max_size=128),
    st.booleans(),
)
def test_random_headers(header, body, with_metadata):
    if with_metadata:
        header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header).encode()
    decode_or_reject(struct.pack("<Q", len(raw)) + raw + body, VALID_META)


@FUZZ
@given(json_values | st.dictionaries(st.sampled_from(list(VALID_META) + ["other"]), json_values, max_size=7))
def test_random_json_metadata(meta):
    for form in (meta, json.dumps(meta), json.dumps(meta).encode()):
        try:
            parsed = parse_metadata(form)
        except UpdateRejected:
            continue
        assert type(parsed["rank"]) is int and parsed["rank"] > 0
        decode_or_reject(VALID_BYTES, form)


@FUZZ
@given(st.binary(max_size=64) | st.text(max_size=64))
def test_random_metadata_text(meta):
    try:
        parse_metadata(meta)
    except UpdateRejected:
        pass


# any code point, lone surrogates (what JSON's "\\udXXX" escapes decode to) and line breaks included
# (joined from a list: st.text never yields lone surrogates, whatever its alphabet)
any_text = st.lists(st.characters(exclude_categories=()) | st.sampled_from(["\ud800", "\udfff", "\n"]), max_size=8).map(
    "".join
)


@FUZZ
@given(
    st.recursive(
        st.none() | st.integers(-5, 5) | any_text,
        lambda children: st.lists(children, max_size=3) | st.dictionaries(any_text, children, max_size=3),
        max_leaves=8,
    ),
    st.just("prelort") | any_text,
)
def test_metadata_text_with_any_code_points(extra, method):
    """Accepted metadata is valid text (it can be logged and written as UTF-8 JSON); refused metadata is
    refused with a loggable one-line reason - in every form the metadata travels."""
    meta = dict(VALID_META, extra={"x": extra}, method=method)
    for form in (meta, json.dumps(meta), json.dumps(meta).encode()):
        try:
            update = decode_update(VALID_BYTES, form)
        except UpdateRejected as e:
            assert_loggable(e)
            continue
        json.dumps(update.meta, ensure_ascii=False).encode("utf-8")
        update.method.encode("utf-8")
        try:
            validate_update(update, SPEC, method=None, round_=1)
        except UpdateRejected as e:
            assert_loggable(e)


@FUZZ
@given(
    st.lists(st.sampled_from(list(VALID.tensors)) | any_text | st.from_regex(r"l[01]\.[qv]\.lora_[ABC]"), max_size=12),
    st.booleans(),
)
def test_header_names_outside_the_layout_are_never_decoded(names, with_valid):
    """Given the federation (as the round loop and verify-update give it), a header naming any tensor
    outside the layout is refused before safetensors decodes anything (issue 26 item 4)."""
    tensors = {name: torch.zeros(0) for name in names}
    if with_valid:
        tensors = dict(VALID.tensors) | tensors
    try:
        data = st_save(tensors)
    except Exception:  # names safetensors' writer refuses (e.g. lone surrogates) cannot be sent this way
        return
    layout = updates.layout_names(SPEC)
    decoded: list[bytes] = []
    real_load = updates._st_load
    updates._st_load = lambda payload: (decoded.append(payload), real_load(payload))[1]
    try:
        update = decode_update(data, VALID_META, spec=SPEC)
    except UpdateRejected as e:
        assert_loggable(e)
        assert decoded == [] or set(tensors) <= layout, e
        return
    finally:
        updates._st_load = real_load
    assert set(update.tensors) <= layout and decoded == [data]


@FUZZ
@given(st.fixed_dictionaries({k: st.just(v) | json_values for k, v in VALID_META.items()}))
def test_perturbed_metadata_fields(meta):
    decode_or_reject(VALID_BYTES, meta)


# ----------------------------------------------------------------------------------------------
# configs
# ----------------------------------------------------------------------------------------------
def _key_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out.append(prefix + name)
            out += _key_paths(ann, prefix + name + ".")
        else:
            out.append(prefix + name)
    return out


# the declared keys and each registered method's options section (prelort.nested, hetlora.gamma, ...)
KEY_PATHS = _key_paths(Config) + [
    path for name, options in method_sections().items() for path in [name, *_key_paths(options, name + ".")]
]
keys = st.sampled_from(KEY_PATHS) | st.text(max_size=10)


def _nest(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for path, value in pairs:
        node = out
        parts = path.split(".")
        for part in parts[:-1]:
            nxt = node.get(part)
            if not isinstance(nxt, dict):
                nxt = node[part] = {}
            node = nxt
        node[parts[-1]] = value
    return out


def _config_or_error(fn, *args):
    try:
        cfg = fn(*args)
    except ConfigError as e:
        assert str(e)
        return None
    assert isinstance(cfg, Config)
    return cfg


@FUZZ
@given(st.lists(st.tuples(keys, json_values), max_size=6))
def test_from_dict_random_nested(pairs):
    _config_or_error(config_mod.from_dict, _nest(pairs))


@FUZZ
@given(json_values)
def test_from_dict_random_top_level(data):
    _config_or_error(config_mod.from_dict, data)


override_values = st.text(max_size=20) | st.sampled_from(
    [
        "2001-02-30",
        "[1, 2",
        "{a: 1",
        "*x",
        "!!binary xx",
        "!!python/object:os.system x",
        "2001-01-01",
        "!!set {a}",
        "1e400",
        "-.inf",
        ".nan",
        "[[[[",
        "? [a]: 1",
        "~",
    ]
)


@FUZZ
@given(
    st.lists(st.tuples(keys, override_values).map(lambda kv: f"{kv[0]}={kv[1]}") | st.text(max_size=20), max_size=4),
    st.lists(st.tuples(keys, json_values), max_size=3),
)
def test_overrides(overrides, pairs):
    _config_or_error(config_mod.from_dict, _nest(pairs), overrides)


@FUZZ
@given(
    st.text(max_size=200)
    | st.lists(st.tuples(keys, override_values), max_size=5).map(lambda kvs: "\n".join(f"{k}: {v}" for k, v in kvs)),
    st.sampled_from([".yaml", ".toml"]),
)
def test_load_random_files(text, suffix):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"config{suffix}"
        path.write_text(text)
        _config_or_error(config_mod.load, path)


@FUZZ
@given(st.binary(max_size=64))
def test_load_binary_file(data):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "config.yaml"
        path.write_bytes(data)
        _config_or_error(config_mod.load, path)
