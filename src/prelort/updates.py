"""Client updates on the wire and on disk, and the server's validation of them (docs/design.md section 7).

An update is two parts:

* tensors: safetensors bytes holding, per adapted module, ``<module>.lora_A`` (r x d_in) and
  ``<module>.lora_B`` (d_out x r), float32;
* metadata: a JSON object ``{"rank", "num_examples", "method", "round", "client", "extra"}``
  (``extra`` carries :attr:`ClientUpdate.meta`, e.g. a method's own fields; it may be omitted).

On disk the parts are ``NAME.safetensors`` and ``NAME.json`` side by side. Untrusted bytes are never
unpickled: the safetensors header is parsed and bounds-checked here, with the standard library, before
the safetensors library sees the payload. Every problem raises :class:`UpdateRejected` with a short
machine-readable ``reason`` (one code per kind of problem, listed in :data:`REASONS`) and a message
naming the offending key or value.
"""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save
from torch import Tensor

from .methods.base import ClientUpdate, FederationSpec, Method, split_key
from .rank_geometry import factor_rank, rank_dim

# Header of a LoRA update: ~150 bytes per tensor; 16 MiB allows ~100k tensors and stops a header
# that claims gigabytes before anything is allocated.
MAX_HEADER_BYTES = 16 * 1024 * 1024
# Where the federation is known, its layout bounds the header far below that (max_header_bytes): per
# tensor its name plus 1 KiB (an entry is ~80 bytes however the JSON is spaced), and 64 KiB for
# __metadata__ and padding. A header above it holds more tensors than the layout has and is not parsed.
_HEADER_BYTES_PER_TENSOR = 1024
_HEADER_BYTES_SLACK = 64 * 1024
# safetensors element sizes of the dtypes we can decode (validation then insists on F32).
_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}  # fmt: skip
_MAX_NDIM = 8
# First opcodes of protocol 0/1 pickles: MARK, GLOBAL, EMPTY_DICT/LIST/TUPLE, NONE, INT, STRING, UNICODE.
_PICKLE_V0_FIRST = {b"(", b"c", b"}", b"]", b")", b"N", b"I", b"S", b"V", b"F", b"L"}
FACTOR_KINDS = ("lora_A", "lora_B")

# Bounds on the metadata, checked before any arithmetic touches it (docs/security.md lists them).
# num_examples: a client with more than 10**9 examples is implausible, and with every weight below 10**9
# no sum or product of weights can overflow (float32 holds 3.4e38).
MAX_NUM_EXAMPLES = 10**9
# rank, round, client: integers far beyond any real federation, so arithmetic on them stays exact.
MAX_META_INT = 2**53
# The metadata as JSON text (a real one is ~500 bytes; ``extra`` is the client's free-form part).
MAX_METADATA_BYTES = 64 * 1024
# Numbers inside ``extra`` (losses, timings, tail norms): finite and at most this large in magnitude,
# so means of them cannot overflow into Infinity (which JSON cannot hold).
MAX_EXTRA_NUMBER = 1e15
_MAX_EXTRA_DEPTH = 8

REASONS: dict[str, str] = {
    # decoding
    "not_safetensors": "the tensor payload is not a well-formed safetensors file",
    "truncated": "the payload is shorter than its header says",
    "header_too_large": "the safetensors header claims an implausible size (for the federation's layout, where known)",
    "pickle_payload": "the payload is a pickle / torch.save file (never loaded)",
    "bad_metadata": "the metadata is not a JSON object with the required fields and types",
    "missing_metadata": "the .json metadata file beside the .safetensors file is missing",
    # validation
    "non_finite": "a tensor holds NaN or infinite values",
    "wrong_dtype": "a tensor is not float32",
    "shape_rank_mismatch": "a factor's rank dimension differs from the declared rank",
    "shape_model_mismatch": "a factor's shape does not match the base model's layer",
    "ab_rank_mismatch": "lora_A and lora_B of one module have different ranks",
    "bad_rank": "the declared rank is not a positive integer",
    "rank_above_max": "the declared rank exceeds the federation's largest rank R",
    "rank_above_client": "the declared rank exceeds the client's configured rank",
    "unknown_module": "a module that the base model does not adapt",
    "missing_module": "an adapted module is absent from the update",
    "extra_key": "a tensor name that is not <module>.lora_A or <module>.lora_B",
    "norm_too_large": "the update's norm exceeds validation.max_update_norm",
    "change_too_large": "an entry of the update differs from what the client received by more than "
    "validation.max_change_entry",
    "round_mismatch": "the update belongs to another round",
    "method_mismatch": "the update was made for another method",
    "client_out_of_range": "the client id is not a client of this federation",
    "duplicate_client": "a second update from the same client in one round",
    "bad_num_examples": f"num_examples is not an integer in [1, {MAX_NUM_EXAMPLES}]",
    "bad_method_field": "a method-specific field in extra (Method.check_update) is invalid for the method",
    "too_large": "the update is larger than any update of this federation can be (refused before reading it)",
    # raised by the round loop (federation.py), not here
    "not_sampled": "the client was not sampled this round",
}


class UpdateRejected(ValueError):
    """A client update the server must not use. ``reason`` is a short code, one of :data:`REASONS`."""

    def __init__(self, reason: str, message: str):
        message = _loggable(message)
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


def _loggable(text: str) -> str:
    """``text`` with every non-printable character escaped as in ``repr``: a rejection names what a client
    sent, and a lone surrogate (unencodable as UTF-8) or a line break in it must not break the one-line
    entry in run.log or on the terminal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


# ----------------------------------------------------------------------------------------------
# encoding
# ----------------------------------------------------------------------------------------------
def _plain_f32(t: Tensor) -> Tensor:
    # clone: safetensors refuses tensors that share storage (prefix views of one global tensor do)
    return t.detach().to(device="cpu", dtype=torch.float32).contiguous().clone()


def update_metadata(update: ClientUpdate) -> dict[str, Any]:
    """The JSON-able metadata of ``update`` (the ``.json`` half of the wire format)."""
    return {
        "rank": int(update.rank),
        "num_examples": int(update.num_examples),
        "method": str(update.method),
        "round": int(update.round),
        "client": int(update.client),
        "extra": dict(update.meta),
    }


def encode_update(update: ClientUpdate) -> tuple[bytes, dict[str, Any]]:
    """``(safetensors bytes, metadata dict)`` of ``update``; tensors are sent as contiguous float32."""
    tensors = {name: _plain_f32(t) for name, t in update.tensors.items()}
    meta = update_metadata(update)
    json.dumps(meta, allow_nan=False)  # fail here, at the sender, if ``meta`` is not JSON-able
    return _st_save(tensors), meta


# ----------------------------------------------------------------------------------------------
# decoding (untrusted input)
# ----------------------------------------------------------------------------------------------
def _looks_pickled(data: bytes) -> bool:
    """torch.save zip archives, pickles of protocol 2-5 (they start with PROTO n), and protocol 0-1
    pickles (a usual first opcode, and the STOP opcode ``.`` at the end)."""
    if data[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return True
    if len(data) >= 2 and data[0] == 0x80 and 2 <= data[1] <= 5:
        return True
    return len(data) >= 2 and data[:1] in _PICKLE_V0_FIRST and data.endswith(b".")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _parse_header(
    data: bytes, total_len: int | None = None, spec: FederationSpec | None = None, who: str = "update"
) -> dict[str, Any]:
    """The tensor entries of a safetensors header, after checking every declared size against ``data``.

    ``total_len``: the payload's full length when ``data`` is only its beginning (at least the 8 length
    bytes and the header): a file's header is checked before its body is read. ``spec``: the header is
    checked against the federation's layout - one longer than :func:`max_header_bytes` is not parsed, and
    after the format checks the tensor names are (:func:`_check_names_known`, one pass over the keys) -, so
    a header of many unexpected tensors costs at most the parse of ``max_header_bytes(spec)`` bytes.
    """
    total = len(data) if total_len is None else total_len
    if total < 8 or len(data) < 8:
        if _looks_pickled(data):
            raise UpdateRejected("pickle_payload", "payload starts like a pickle; refusing to load it")
        raise UpdateRejected("not_safetensors", f"payload of {len(data)} bytes is too short for a safetensors file")
    (header_len,) = struct.unpack("<Q", data[:8])
    if spec is not None and max_header_bytes(spec) < header_len <= min(MAX_HEADER_BYTES, total - 8):
        raise UpdateRejected(
            "header_too_large",
            f"{who}: header of {header_len} bytes is longer than the {max_header_bytes(spec)} bytes the "
            f"{len(layout_names(spec))} tensors of an update of this federation take; not parsed",
        )
    header: Any = None
    if header_len <= min(MAX_HEADER_BYTES, total - 8) and 8 + header_len <= len(data):
        try:
            header = json.loads(
                data[8 : 8 + header_len].decode("utf-8"),
                object_pairs_hook=_no_duplicates,
                parse_constant=_reject_constant,
            )
        except (UnicodeDecodeError, ValueError, RecursionError):
            header = None
    if not isinstance(header, dict):
        # Classify what it is instead. A pickle's first 8 bytes read as an enormous header length, so
        # only such payloads are tested for pickle magic (a truncated real file whose length happens
        # to start with byte 0x80 stays "truncated").
        if header_len > MAX_HEADER_BYTES and _looks_pickled(data):
            raise UpdateRejected("pickle_payload", "payload is a pickle / torch.save archive; refusing to load it")
        if header_len > MAX_HEADER_BYTES:
            raise UpdateRejected("header_too_large", f"header claims {header_len} bytes (limit {MAX_HEADER_BYTES})")
        if header_len > total - 8:
            raise UpdateRejected("truncated", f"header claims {header_len} bytes but only {total - 8} follow")
        raise UpdateRejected("not_safetensors", "header is not a JSON object")

    body_len = total - 8 - header_len
    entries: list[tuple[int, int, str]] = []
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise UpdateRejected("not_safetensors", "__metadata__ must map strings to strings")
            continue
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise UpdateRejected(
                "not_safetensors", f"tensor {name!r}: header entry must have dtype, shape, data_offsets"
            )
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _DTYPE_BYTES:
            raise UpdateRejected("wrong_dtype", f"tensor {name!r} has dtype {dtype!r}; float32 (F32) expected")
        if not isinstance(shape, list) or len(shape) > _MAX_NDIM or not all(type(d) is int and d >= 0 for d in shape):
            raise UpdateRejected("not_safetensors", f"tensor {name!r}: bad shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(type(o) is int and o >= 0 for o in offsets)
            or offsets[0] > offsets[1]
        ):
            raise UpdateRejected("not_safetensors", f"tensor {name!r}: bad data_offsets {offsets!r}")
        nbytes = math.prod(shape) * _DTYPE_BYTES[dtype]  # Python ints: no overflow
        if offsets[1] - offsets[0] != nbytes:
            raise UpdateRejected(
                "not_safetensors",
                f"tensor {name!r}: shape {shape} {dtype} needs {nbytes} bytes, offsets span {offsets[1] - offsets[0]}",
            )
        if offsets[1] > body_len:
            raise UpdateRejected(
                "truncated", f"tensor {name!r} ends at byte {offsets[1]} of the data but only {body_len} are present"
            )
        entries.append((offsets[0], offsets[1], name))
    # Tensors must tile the data section exactly: no overlaps (aliasing), no holes, no trailing bytes.
    position = 0
    for begin, end, name in sorted(entries):
        if begin != position:
            raise UpdateRejected("not_safetensors", f"tensor {name!r} starts at byte {begin}, expected {position}")
        position = end
    if position != body_len:
        raise UpdateRejected("not_safetensors", f"{body_len - position} unexplained bytes after the last tensor")
    if spec is not None:  # after the format checks, so a malformed header keeps its reason
        _check_names_known([name for name in header if name != "__metadata__"], spec, who)
    return header


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _check_int(meta: dict[str, Any], field: str, minimum: int, reason: str, maximum: int = MAX_META_INT) -> int:
    if field not in meta:
        raise UpdateRejected("bad_metadata", f"metadata lacks {field!r}")
    value = meta[field]
    if type(value) is not int:  # bool is an int subclass; reject it and floats alike
        raise UpdateRejected("bad_metadata", f"metadata {field!r} must be an integer, got {_short(value)}")
    if value < minimum:
        raise UpdateRejected(reason, f"metadata {field!r} = {_short(value)} (must be >= {minimum})")
    if value > maximum:
        raise UpdateRejected(reason, f"metadata {field!r} = {_short(value)} (must be <= {maximum})")
    return value


def _check_text(value: str, what: str) -> None:
    """Refuse a metadata string (``what`` names it) that UTF-8 cannot encode: JSON's ``"\\ud800"`` escape
    decodes to a lone surrogate, which no log file, terminal or JSON writer with ``ensure_ascii=False`` takes."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise UpdateRejected(
            "bad_metadata", f"metadata {what} {_short(value)} is not valid text (it holds a lone surrogate)"
        ) from None


def _check_extra(value: Any, where: str = "extra", depth: int = 0) -> None:
    """``extra`` holds JSON values only, strings (keys too) valid text, numbers finite and bounded, nesting
    shallow."""
    if depth > _MAX_EXTRA_DEPTH:
        raise UpdateRejected("bad_metadata", f"metadata {where} is nested deeper than {_MAX_EXTRA_DEPTH} levels")
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, str):
        _check_text(value, f"{where} =")
        return
    if isinstance(value, int):
        if abs(value) > MAX_META_INT:
            raise UpdateRejected("bad_metadata", f"metadata {where} = {_short(value)} (|value| must be <= 2**53)")
        return
    if isinstance(value, float):
        if not math.isfinite(value) or abs(value) > MAX_EXTRA_NUMBER:
            raise UpdateRejected(
                "bad_metadata",
                f"metadata {where} = {value!r} (numbers must be finite, |value| <= {MAX_EXTRA_NUMBER:g})",
            )
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise UpdateRejected("bad_metadata", f"metadata {where} has a non-string key {_short(k)}")
            _check_text(k, f"{where} key")
            _check_extra(v, f"{where}.{k}", depth + 1)
        return
    if isinstance(value, list):
        for i, v in enumerate(value):
            _check_extra(v, f"{where}[{i}]", depth + 1)
        return
    raise UpdateRejected("bad_metadata", f"metadata {where} holds a {type(value).__name__}, not a JSON value")


def parse_metadata(meta: bytes | str | dict[str, Any]) -> dict[str, Any]:
    """Check the metadata half of an update; returns the JSON object."""
    if isinstance(meta, (bytes, bytearray, str)) and len(meta) > MAX_METADATA_BYTES:
        raise UpdateRejected("bad_metadata", f"metadata is {len(meta)} bytes long (limit {MAX_METADATA_BYTES})")
    if isinstance(meta, (bytes, bytearray)):
        try:
            meta = bytes(meta).decode("utf-8")
        except UnicodeDecodeError:
            raise UpdateRejected("bad_metadata", "metadata is not UTF-8 text") from None
    if isinstance(meta, str):
        try:
            meta = json.loads(meta, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
        except (ValueError, RecursionError) as e:
            raise UpdateRejected("bad_metadata", f"metadata is not JSON: {e}") from None
    if not isinstance(meta, dict):
        raise UpdateRejected("bad_metadata", f"metadata must be a JSON object, got {type(meta).__name__}")
    allowed = {"rank", "num_examples", "method", "round", "client", "extra"}
    unknown = sorted(str(k) for k in meta if k not in allowed)
    if unknown:
        raise UpdateRejected("bad_metadata", f"unknown metadata field(s) {unknown}")
    _check_int(meta, "rank", 1, "bad_rank")
    _check_int(meta, "num_examples", 1, "bad_num_examples", MAX_NUM_EXAMPLES)
    _check_int(meta, "round", 0, "round_mismatch")
    _check_int(meta, "client", 0, "client_out_of_range")
    if not isinstance(meta.get("method"), str):
        raise UpdateRejected("bad_metadata", f"metadata 'method' must be a string, got {meta.get('method')!r}")
    if not isinstance(meta.get("extra", {}), dict):
        raise UpdateRejected("bad_metadata", f"metadata 'extra' must be an object, got {_short(meta['extra'])}")
    if len(meta["method"]) > 64:
        raise UpdateRejected("bad_metadata", f"metadata 'method' is {len(meta['method'])} characters long")
    _check_text(meta["method"], "'method' =")
    _check_extra(meta.get("extra", {}))
    try:  # an already parsed object (e.g. from a Flower record) gets the same size limit as JSON text
        size = len(json.dumps(meta, allow_nan=False))
    except (TypeError, ValueError, RecursionError) as e:
        raise UpdateRejected("bad_metadata", f"metadata is not plain JSON: {e}") from None
    if size > MAX_METADATA_BYTES:
        raise UpdateRejected("bad_metadata", f"metadata is {size} bytes long as JSON (limit {MAX_METADATA_BYTES})")
    return meta


def decode_update(
    data: bytes,
    meta: bytes | str | dict[str, Any],
    max_bytes: int | None = None,
    *,
    spec: FederationSpec | None = None,
) -> ClientUpdate:
    """The :class:`ClientUpdate` encoded by :func:`encode_update`; raises :class:`UpdateRejected`.

    Decoding checks the format only (well-formed safetensors, sizes that fit, metadata fields and
    types); :func:`validate_update` checks the update against the federation. ``max_bytes``: refuse a
    larger payload before parsing it (:func:`max_payload_bytes` of the federation). ``spec``: refuse a
    header longer than :func:`max_header_bytes` unparsed, and one whose tensor names (and so their number)
    do not fit the federation's layout with the reason :func:`validate_update` would give, before any
    tensor is decoded (the round loop and ``verify-update`` pass it).
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise UpdateRejected("not_safetensors", f"payload must be bytes, got {type(data).__name__}")
    if max_bytes is not None and len(data) > max_bytes:
        raise UpdateRejected(
            "too_large",
            f"payload of {len(data)} bytes exceeds the {max_bytes} bytes an update of this federation can take",
        )
    data = bytes(data)
    fields = parse_metadata(meta)
    _parse_header(data, spec=spec, who=f"client {fields['client']}")
    try:
        tensors = _st_load(data)
    except (SafetensorError, ValueError, TypeError, KeyError, RuntimeError) as e:  # defence in depth
        raise UpdateRejected("not_safetensors", f"safetensors could not read the payload: {e}") from None
    return ClientUpdate(
        client=fields["client"],
        rank=fields["rank"],
        num_examples=fields["num_examples"],
        tensors=dict(tensors),
        round=fields["round"],
        method=fields["method"],
        meta=dict(fields.get("extra", {})),
    )


# ----------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------
def _atomic_write(path: Path, payload: bytes) -> None:
    """Write ``payload`` to ``path`` via a fsynced temporary sibling and an atomic rename."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def update_paths(path: str | Path) -> tuple[Path, Path]:
    """``(NAME.safetensors, NAME.json)`` for ``NAME`` or ``NAME.safetensors`` or ``NAME.json``."""
    p = Path(path)
    stem = p.with_suffix("") if p.suffix in (".safetensors", ".json") else p
    return stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")


def save_update(stem: str | Path, update: ClientUpdate) -> Path:
    """Write ``stem.safetensors`` and ``stem.json``; returns the ``.safetensors`` path.

    Each file is replaced atomically; the JSON is removed first and written last, so whenever
    ``stem.json`` exists it belongs to the ``stem.safetensors`` beside it.
    """
    data, meta = encode_update(update)
    tensor_path, meta_path = update_paths(stem)
    tensor_path.parent.mkdir(parents=True, exist_ok=True)
    meta_path.unlink(missing_ok=True)
    _atomic_write(tensor_path, data)
    _atomic_write(meta_path, (json.dumps(meta, indent=1, allow_nan=False) + "\n").encode())
    _fsync_dir(tensor_path.parent)
    return tensor_path


def max_payload_bytes(spec: FederationSpec) -> int:
    """The payload size above which an update of ``spec`` is refused unparsed (``too_large``): the largest
    header allowed plus four times the float32 factors of a rank-R update. A valid update is at most one
    rank-R update; the slack lets a moderately wrong one be rejected with its precise reason instead."""
    data = sum(4 * spec.max_rank * (d_out + d_in) for d_out, d_in in spec.modules.values())
    return 8 + MAX_HEADER_BYTES + 4 * data


def load_update(path: str | Path, max_bytes: int | None = None, *, spec: FederationSpec | None = None) -> ClientUpdate:
    """Read an update saved by :func:`save_update` (give the ``.safetensors`` path or the stem).

    The files' sizes and the safetensors header are checked before the tensor data is read: a file
    above ``max_bytes`` (or whose header does not account for its size, or, given ``spec``, whose
    tensor names do not fit the federation's layout) is refused unread.
    """
    tensor_path, meta_path = update_paths(path)
    if not tensor_path.is_file():
        raise FileNotFoundError(f"update file {tensor_path} does not exist")
    if not meta_path.is_file():
        raise UpdateRejected("missing_metadata", f"{meta_path} (the metadata of {tensor_path.name}) does not exist")
    meta_size = meta_path.stat().st_size
    if meta_size > MAX_METADATA_BYTES:
        raise UpdateRejected("bad_metadata", f"{meta_path.name} is {meta_size} bytes long (limit {MAX_METADATA_BYTES})")
    size = tensor_path.stat().st_size
    if max_bytes is not None and size > max_bytes:
        raise UpdateRejected(
            "too_large",
            f"{tensor_path.name} is {size} bytes, more than the {max_bytes} bytes an "
            "update of this federation can take; not read",
        )
    meta = meta_path.read_bytes()
    who = f"client {parse_metadata(meta)['client']}"
    with tensor_path.open("rb") as f:
        head = f.read(8)
        if len(head) == 8 and size > 8:
            (header_len,) = struct.unpack("<Q", head)
            if header_len <= min(MAX_HEADER_BYTES, size - 8):
                # a sound header vouches for the file's size before the body is read
                _parse_header(head + f.read(header_len), total_len=size, spec=spec, who=who)
        f.seek(0)
        data = f.read()
    return decode_update(data, meta, max_bytes, spec=spec)


# ----------------------------------------------------------------------------------------------
# validation against the federation
# ----------------------------------------------------------------------------------------------
def update_norm(tensors: dict[str, Tensor] | Iterable[Tensor]) -> float:
    """The update's norm: sqrt(sum over its tensors T of ||T||_F^2), in float64.

    This is the norm of the factors as sent (what ``validation.max_update_norm`` bounds and what
    norm clipping scales), not of the product B @ A.
    """
    values = tensors.values() if isinstance(tensors, dict) else tensors
    total = 0.0
    for t in values:
        total += float(torch.sum(t.detach().to(torch.float64) ** 2))
    return math.sqrt(total)


def validate_update(
    update: ClientUpdate,
    spec: FederationSpec,
    *,
    method: str | Method | None,
    round_: int | None,
    seen_clients: set[int] | None = None,
    max_norm: float | None = None,
    max_rms: float | None = None,
    reference: Mapping[str, Tensor] | None = None,
    max_change_entry: float | None = None,
) -> None:
    """Raise :class:`UpdateRejected` unless the server may aggregate ``update``.

    ``method`` / ``round_``: what the server expects (None skips that check); given a :class:`Method`
    (what the round loop and ``verify-update`` pass, via :func:`server_check`), its own
    :meth:`Method.check_update` runs too (the method's own fields in ``extra``). ``max_rms``: bound on the
    update's root-mean-square entry, :func:`update_norm` / sqrt(number of entries). ``seen_clients``: the
    clients already accepted this round; on acceptance ``update.client`` is ADDED to it, so one set
    per round rejects a second update from the same client. ``max_norm``: bound on :func:`update_norm`.
    ``reference``: what the client received (the broadcast adapter, cut to the update's rank); with
    ``max_change_entry``, every entry of the change (update minus reference) is at most that in magnitude.
    A client may send a rank below its configured one (a method's pruning or common rank) but
    never above it.

    The checks run in this order, the first failure raising: the metadata, the tensor names, the
    dtypes and shapes, the values (finite, within the norm bounds), the method's own fields.
    """
    who = f"client {update.client}"
    method_impl = method if isinstance(method, Method) else None
    if method_impl is not None:
        method = method_impl.name
    _check_update_metadata(update, spec, who, method=method, round_=round_, seen_clients=seen_clients)
    _check_tensor_names(update, spec, who)
    _check_dtypes_and_shapes(update, spec, who)
    _check_values(update, who, max_norm=max_norm, max_rms=max_rms)
    if reference is not None and max_change_entry is not None:
        _check_change(update, reference, who, max_change_entry)
    if method_impl is not None:
        try:
            method_impl.check_update(update)
        except ValueError as e:
            raise UpdateRejected("bad_method_field", f"{who}: {e}") from None
    if seen_clients is not None:
        seen_clients.add(update.client)


def _check_update_metadata(
    update: ClientUpdate,
    spec: FederationSpec,
    who: str,
    *,
    method: str | None,
    round_: int | None,
    seen_clients: set[int] | None,
) -> None:
    """Round, method, client id, num_examples, ``extra`` and the declared rank against the federation."""
    client, rank = update.client, update.rank
    if round_ is not None and update.round != round_:
        raise UpdateRejected(
            "round_mismatch", f"{who}: update is for round {update.round}, the server is at round {round_}"
        )
    if method is not None and update.method != method:
        raise UpdateRejected(
            "method_mismatch", f"{who}: update was made for method {update.method!r}, the run uses {method!r}"
        )
    if type(client) is not int or not 0 <= client < len(spec.client_ranks):
        raise UpdateRejected("client_out_of_range", f"client id {client!r} is not in 0..{len(spec.client_ranks) - 1}")
    if seen_clients is not None and client in seen_clients:
        raise UpdateRejected("duplicate_client", f"{who} already sent an update this round")
    if type(update.num_examples) is not int or not 0 < update.num_examples <= MAX_NUM_EXAMPLES:
        raise UpdateRejected(
            "bad_num_examples",
            f"{who}: num_examples = {_short(update.num_examples)} (must be an integer in [1, {MAX_NUM_EXAMPLES}])",
        )
    if not isinstance(update.meta, dict):
        raise UpdateRejected("bad_metadata", f"{who}: extra must be an object, got {type(update.meta).__name__}")
    _check_extra(update.meta)
    if isinstance(update.method, str):
        _check_text(update.method, "'method' =")
    if type(rank) is not int or rank <= 0:
        raise UpdateRejected("bad_rank", f"{who}: declared rank {rank!r} (must be a positive integer)")
    if rank > spec.max_rank:
        raise UpdateRejected(
            "rank_above_max", f"{who}: declared rank {rank} exceeds the federation's R = {spec.max_rank}"
        )
    if rank > spec.client_ranks[client]:
        raise UpdateRejected(
            "rank_above_client", f"{who}: declared rank {rank} exceeds its configured rank {spec.client_ranks[client]}"
        )


def layout_names(spec: FederationSpec) -> frozenset[str]:
    """The tensor names of an update of ``spec``: ``<module>.lora_A`` and ``<module>.lora_B`` per adapted module."""
    return frozenset(f"{module}.{kind}" for module in spec.modules for kind in FACTOR_KINDS)


def max_header_bytes(spec: FederationSpec) -> int:
    """The longest safetensors header an update of ``spec`` may have (at most :data:`MAX_HEADER_BYTES`):
    a longer one holds more tensors than the layout has and is refused unparsed (``header_too_large``)."""
    names = layout_names(spec)
    needed = _HEADER_BYTES_SLACK + sum(len(name.encode()) + _HEADER_BYTES_PER_TENSOR for name in names)
    return min(MAX_HEADER_BYTES, needed)


def _check_names_known(names: Collection[str], spec: FederationSpec, who: str) -> None:
    """Every name is one of :func:`layout_names` (so there are at most 2 per module). One pass over the
    names, no sorting: a decoder calls this on a header of any number of entries before decoding them.
    The name reported is the smallest unexpected one, so the verdict does not hang on the order sent."""
    expected = layout_names(spec)
    unexpected = [name for name in names if name not in expected]
    if not unexpected:
        return
    name = min(unexpected)
    count = (
        f"; the update holds {len(names)} tensors, an update of this federation has {len(expected)}"
        if len(names) > len(expected)
        else ""
    )
    module, kind = split_key(name)
    if kind not in FACTOR_KINDS or not module:
        raise UpdateRejected(
            "extra_key", f"{who}: unexpected tensor {_short(name, 200)} (only <module>.lora_A / .lora_B){count}"
        )
    raise UpdateRejected(
        "unknown_module",
        f"{who}: tensor {_short(name, 200)} names module {_short(module, 200)}, which is not adapted{count}",
    )


def _check_tensor_names(update: ClientUpdate, spec: FederationSpec, who: str) -> None:
    """Exactly ``<module>.lora_A`` and ``<module>.lora_B`` of every adapted module."""
    _check_names_known(update.tensors, spec, who)
    for module in spec.modules:
        for kind in FACTOR_KINDS:
            if f"{module}.{kind}" not in update.tensors:
                raise UpdateRejected("missing_module", f"{who}: no tensor {module}.{kind}")


def _check_dtypes_and_shapes(update: ClientUpdate, spec: FederationSpec, who: str) -> None:
    """float32 tensors; per module, factors that fit the base model's layer, one rank for A and B, the declared one."""
    for name in sorted(update.tensors):
        t = update.tensors[name]
        if not isinstance(t, Tensor) or t.dtype != torch.float32:
            got = t.dtype if isinstance(t, Tensor) else type(t).__name__
            raise UpdateRejected("wrong_dtype", f"{who}: tensor {name!r} has dtype {got}; float32 expected")
    for module, (d_out, d_in) in spec.modules.items():
        ranks = {}
        for kind, expected in (("lora_A", f"(r, {d_in})"), ("lora_B", f"({d_out}, r)")):
            x = update.tensors[f"{module}.{kind}"]
            ranks[kind] = factor_rank(kind, x, d_out, d_in)
            if ranks[kind] is None:
                raise UpdateRejected(
                    "shape_model_mismatch",
                    f"{who}: {module}.{kind} has shape {tuple(x.shape)}; expected {expected} for this layer",
                )
        rank_a, rank_b = ranks["lora_A"], ranks["lora_B"]
        if rank_a != rank_b:
            raise UpdateRejected(
                "ab_rank_mismatch", f"{who}: {module}.lora_A has rank {rank_a} but {module}.lora_B has rank {rank_b}"
            )
        if rank_a != update.rank:
            raise UpdateRejected(
                "shape_rank_mismatch", f"{who}: {module} factors have rank {rank_a}, declared rank is {update.rank}"
            )


def _check_values(update: ClientUpdate, who: str, *, max_norm: float | None, max_rms: float | None) -> None:
    """Finite entries only; the update's norm within ``max_norm`` and ``max_rms`` x sqrt(entries)."""
    for name in sorted(update.tensors):
        t = update.tensors[name]
        bad = ~torch.isfinite(t)
        if bool(bad.any()):
            kinds = []
            if bool(torch.isnan(t).any()):
                kinds.append("NaN")
            if bool(torch.isposinf(t).any()):
                kinds.append("+inf")
            if bool(torch.isneginf(t).any()):
                kinds.append("-inf")
            raise UpdateRejected(
                "non_finite", f"{who}: tensor {name!r} holds {int(bad.sum())} non-finite value(s) ({', '.join(kinds)})"
            )
    if max_norm is not None or max_rms is not None:
        norm = update_norm(update.tensors)
        if max_norm is not None and not norm <= max_norm:
            raise UpdateRejected(
                "norm_too_large",
                f"{who}: update norm {norm:.6g} exceeds the bound {max_norm:.6g} (validation.max_update_norm)",
            )
        entries = sum(t.numel() for t in update.tensors.values())
        if max_rms is not None and not norm <= max_rms * math.sqrt(entries):
            raise UpdateRejected(
                "norm_too_large",
                f"{who}: update norm {norm:.6g} exceeds the bound {max_rms * math.sqrt(entries):.6g} "
                f"(validation.max_update_rms={max_rms:g} x sqrt({entries} entries); root-mean-square "
                f"entry {norm / math.sqrt(max(entries, 1)):.6g})",
            )


def _check_change(update: ClientUpdate, reference: Mapping[str, Tensor], who: str, bound: float) -> None:
    """Every entry of update - reference within +-``bound`` (validation.max_change_entry). ``reference`` holds what
    the client received at (at least) the update's rank; names and shapes were checked already."""
    worst, where = 0.0, ""
    for name in sorted(update.tensors):
        x = update.tensors[name]
        ref = reference.get(name)
        if ref is None:
            raise UpdateRejected("extra_key", f"{who}: no received tensor {name!r} to compare the update with")
        dim = rank_dim(split_key(name)[1])
        if ref.shape[dim] < x.shape[dim]:
            raise UpdateRejected(
                "shape_rank_mismatch", f"{who}: {name} has rank {x.shape[dim]}, it received rank {ref.shape[dim]}"
            )
        largest = float((x.double() - ref.narrow(dim, 0, x.shape[dim]).double()).abs().max()) if x.numel() else 0.0
        if largest > worst:
            worst, where = largest, name
    if worst > bound:
        raise UpdateRejected(
            "change_too_large",
            f"{who}: an entry of {where} changed by {worst:.6g} from what the client received, more than the "
            f"bound {bound:g} (validation.max_change_entry)",
        )


def server_check(
    update: ClientUpdate,
    spec: FederationSpec,
    method: Method,
    validation: Any,
    *,
    round_: int | None,
    seen_clients: set[int] | None = None,
    reference: Mapping[str, Tensor] | None = None,
) -> None:
    """The server's whole check of one decoded update, with the bounds of ``validation`` (the run's
    :class:`prelort.config.ValidationConfig`). The round loop (:meth:`prelort.federation.Federation.accept`),
    ``prelort verify-update`` and a Flower client checking its own update all call this one function, so
    "verify-update accepts it" means "the round accepts it". ``reference``: what the client received this round
    (its broadcast adapter), for the bound on the change (``validation.max_change_entry``)."""
    validate_update(
        update,
        spec,
        method=method,
        round_=round_,
        seen_clients=seen_clients,
        max_norm=validation.max_update_norm,
        max_rms=validation.max_update_rms,
        reference=reference,
        max_change_entry=validation.max_change_entry,
    )
