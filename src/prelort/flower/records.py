"""prelort's messages as Flower records (Message API, flwr 1.42).

Server -> client, one TRAIN message per sampled client (its own task):

* ``prelort.task`` (ConfigRecord): ``format`` = ``prelort-task-v1``, ``round``, ``client``, ``rank``,
  ``seed``, ``plan`` (the TrainPlan as JSON) and ``config`` (the run's resolved config as JSON, so a
  ClientApp needs no file of its own and works where ``context.run_config`` is empty);
* ``prelort.adapter`` (ArrayRecord): the broadcast prefix, ``<module>.lora_A`` (r x d_in) and
  ``<module>.lora_B`` (d_out x r), one ``Array(ndarray)`` each, float32;
* ``prelort.base_delta`` (ArrayRecord, only for methods whose broadcast has one): ``<module>.delta``.

Client -> server, the reply carries the update in prelort's wire format (docs/design.md section 7); the engine
hands the undecoded parts (:func:`reply_parts`) to the round loop, which decodes them with
:func:`prelort.protocol.decode_raw` (names against the layout first) and validates them exactly like an update
read from disk:

* ``prelort.update`` (ArrayRecord): one Array ``safetensors`` whose data are the safetensors bytes
  (``stype`` = ``safetensors``; Flower chunks large Arrays in transit);
* ``prelort.update_meta`` (ConfigRecord): ``format`` = ``safetensors-v1`` and ``meta``, the JSON metadata.

Under secure aggregation (``privacy.secure_aggregation``) the task travels as a legacy ``FitIns``
instead (Flower's SecAgg+ exists only for the legacy API): :func:`encode_secagg_task` gives its
parameters (the broadcast tensors, sorted by name) and flat config (``format`` =
``prelort-secagg-task-v1``, the same fields as ``prelort.task`` plus the public upload layout, the weight
bound and SecAgg+'s clipping range). The reply is SecAgg+'s masked vector of fixed-shape zero-padded
factors and weight mask (:mod:`prelort.secure_sums`), never an individual update.

Node hand-shake (QUERY ``prelort.hello``): the ClientApp answers with its node_config ``partition-id``
and ``num-partitions``, which is how the server maps a Flower node to a prelort client id, and with what the
site declares: ``rank`` (its node-config ``rank``, as given: the server checks it), ``quantization`` (how it
holds its base model, node-config ``quantization``, as given: the server checks it too) and ``has-eval``
(whether it keeps held-out records, node-config ``eval-path``) - never a path.

On-site evaluation (EVALUATE message, :func:`encode_eval_task`): ``prelort.eval_task`` (ConfigRecord:
``format`` = ``prelort-eval-task-v1``, ``round``, ``client``, ``rank``, ``config``) with the tier's adapter
(``prelort.adapter``, ``prelort.base_delta`` as for a task); the reply, ``prelort.eval_sums`` (ConfigRecord:
``format``, ``client``, ``n``, ``correct``, ``loglik_sum``, ``tokens``), holds counts and sums only.
"""

from __future__ import annotations

import dataclasses
import json
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from ..methods import Broadcast, ClientUpdate, FederationSpec, TrainPlan
from ..protocol import EvalSums, EvalTask
from ..updates import UpdateRejected, decode_update, encode_update

if TYPE_CHECKING:  # flwr is imported lazily: prelort imports without it
    from flwr.app import RecordDict

TASK = "prelort.task"
ADAPTER = "prelort.adapter"
BASE_DELTA = "prelort.base_delta"
UPDATE = "prelort.update"
UPDATE_META = "prelort.update_meta"
HELLO = "prelort.hello"
TASK_FORMAT = "prelort-task-v1"
UPDATE_FORMAT = "safetensors-v1"
HELLO_FORMAT = "prelort-hello-v1"
SECAGG_TASK_FORMAT = "prelort-secagg-task-v1"
SAFETENSORS_STYPE = "safetensors"
PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
# what a site's node-config may declare (docs/deployment.md)
DATA_PATH = "data-path"
EVAL_PATH = "eval-path"
RANK = "rank"
QUANTIZATION = "quantization"
HAS_EVAL = "has-eval"
EVAL_TASK = "prelort.eval_task"
EVAL_SUMS = "prelort.eval_sums"
EVAL_TASK_FORMAT = "prelort-eval-task-v1"
EVAL_SUMS_FORMAT = "prelort-eval-sums-v1"


class BadTask(ValueError):
    """A TRAIN message that is not a well-formed prelort task."""


@dataclasses.dataclass
class DecodedTask:
    """A task as a ClientApp receives it: the round's work plus the run's config (a plain dict)."""

    round: int
    client: int
    rank: int
    seed: int
    plan: TrainPlan
    broadcast: Broadcast
    config: dict[str, Any]
    config_json: str


# -- tensors <-> ArrayRecord -------------------------------------------------------------------------------
def tensors_to_record(tensors: dict[str, Tensor]):
    """An ArrayRecord of float32 ``Array(ndarray)`` (Flower refuses bare ndarrays in ArrayRecord)."""
    from flwr.app import Array, ArrayRecord

    return ArrayRecord(
        {name: Array(t.detach().to("cpu", torch.float32).contiguous().numpy()) for name, t in tensors.items()}
    )


def record_to_tensors(record) -> dict[str, Tensor]:
    """Inverse of :func:`tensors_to_record` (``Array.numpy`` never unpickles)."""
    out = {}
    for name in record:
        arr = record[name].numpy()
        out[name] = torch.from_numpy(np.array(arr, dtype=np.float32, copy=True))
    return out


# -- plan <-> JSON --------------------------------------------------------------------------------------------
def plan_to_json(plan: TrainPlan) -> str:
    return json.dumps(dataclasses.asdict(plan))


def plan_from_json(text: str) -> TrainPlan:
    try:
        d = json.loads(text)
        extra = d.get("extra") or {}
        if not isinstance(extra, dict):
            raise TypeError(f"extra is a {type(extra).__name__}, not an object")
        return TrainPlan(
            rank=int(d["rank"]),
            truncations=tuple(int(t) for t in d["truncations"]),
            mode=d.get("mode", "off"),
            extra=extra,
        )
    except (ValueError, KeyError, TypeError) as e:
        raise BadTask(f"task plan is not a TrainPlan: {e}") from None


# -- the task (server -> client) ------------------------------------------------------------------------------
def encode_task(
    round_: int, client: int, rank: int, seed: int, plan: TrainPlan, broadcast: Broadcast, config_json: str
) -> RecordDict:
    """The RecordDict of one client's TRAIN message."""
    from flwr.app import ConfigRecord, RecordDict

    content = RecordDict(
        {
            TASK: ConfigRecord({"format": TASK_FORMAT, **_task_fields(round_, client, rank, seed, plan, config_json)}),
            ADAPTER: tensors_to_record(broadcast.adapter),
        }
    )
    if broadcast.base_delta is not None:
        content[BASE_DELTA] = tensors_to_record(broadcast.base_delta)
    return content


def decode_task(content: RecordDict) -> DecodedTask:
    """The task in a TRAIN message; raises :class:`BadTask` naming what is missing or malformed."""
    if TASK not in content.config_records:
        raise BadTask(f"message has no {TASK!r} ConfigRecord (records: {sorted(content)})")
    rec = content.config_records[TASK]
    if rec.get("format") != TASK_FORMAT:
        raise BadTask(f"task format {rec.get('format')!r} is not {TASK_FORMAT!r} (prelort versions differ?)")
    _require_fields(rec, _TASK_FIELDS, "task")
    if ADAPTER not in content.array_records:
        raise BadTask(f"message has no {ADAPTER!r} ArrayRecord")
    adapter = record_to_tensors(content.array_records[ADAPTER])
    base_delta = record_to_tensors(content.array_records[BASE_DELTA]) if BASE_DELTA in content.array_records else None
    return _decoded_task(rec, Broadcast(adapter, base_delta), "task")


_TASK_FIELDS = ("round", "client", "rank", "seed", "plan", "config")


def _task_fields(round_: int, client: int, rank: int, seed: int, plan: TrainPlan, config_json: str) -> dict[str, Any]:
    """The fields every task carries, whichever way it travels (ConfigRecord or legacy FitIns config)."""
    return {
        "round": int(round_),
        "client": int(client),
        "rank": int(rank),
        "seed": int(seed),
        "plan": plan_to_json(plan),
        "config": config_json,
    }


def _require_fields(rec: Any, fields: tuple[str, ...], what: str) -> None:
    for field in fields:
        if field not in rec:
            raise BadTask(f"{what} lacks {field!r}")


def _decoded_task(rec: Any, broadcast: Broadcast, what: str) -> DecodedTask:
    """A :class:`DecodedTask` from the fields of :func:`_task_fields` (already checked present)."""
    try:
        config = json.loads(str(rec["config"]))
    except ValueError as e:
        raise BadTask(f"{what} config is not JSON: {e}") from None
    return DecodedTask(
        round=int(rec["round"]),
        client=int(rec["client"]),
        rank=int(rec["rank"]),
        seed=int(rec["seed"]),
        plan=plan_from_json(str(rec["plan"])),
        broadcast=broadcast,
        config=config,
        config_json=str(rec["config"]),
    )


# -- the update (client -> server) ---------------------------------------------------------------------------
def encode_reply(update: ClientUpdate) -> RecordDict:
    """The RecordDict of a TRAIN reply: safetensors bytes + JSON metadata (prelort's wire format)."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

    data, meta = encode_update(update)
    payload = Array(dtype="uint8", shape=(len(data),), stype=SAFETENSORS_STYPE, data=data)
    return RecordDict(
        {
            UPDATE: ArrayRecord({"safetensors": payload}),
            UPDATE_META: ConfigRecord({"format": UPDATE_FORMAT, "meta": json.dumps(meta, allow_nan=False)}),
        }
    )


def reply_parts(content: RecordDict) -> tuple[bytes, str]:
    """The wire format in a TRAIN reply, undecoded: ``(safetensors bytes, metadata JSON text)``, after checking
    only the records around them; raises :class:`UpdateRejected`. The server decodes the parts itself
    (:func:`prelort.protocol.decode_raw`), checking the tensor names and their number against the federation's
    layout before any tensor is decoded."""
    if UPDATE_META not in content.config_records:
        raise UpdateRejected("missing_metadata", f"reply has no {UPDATE_META!r} ConfigRecord")
    meta_rec = content.config_records[UPDATE_META]
    if meta_rec.get("format") != UPDATE_FORMAT:
        raise UpdateRejected("bad_metadata", f"update format {meta_rec.get('format')!r} is not {UPDATE_FORMAT!r}")
    meta = meta_rec.get("meta")
    if not isinstance(meta, str):
        raise UpdateRejected("missing_metadata", f"{UPDATE_META!r} has no 'meta' JSON string")
    if UPDATE not in content.array_records or "safetensors" not in content.array_records[UPDATE]:
        raise UpdateRejected("not_safetensors", f"reply has no {UPDATE!r} ArrayRecord with a 'safetensors' Array")
    payload = content.array_records[UPDATE]["safetensors"]
    if payload.stype != SAFETENSORS_STYPE:
        raise UpdateRejected("not_safetensors", f"update Array has stype {payload.stype!r}, not {SAFETENSORS_STYPE!r}")
    return bytes(payload.data), meta


def decode_reply(content: RecordDict, spec: FederationSpec | None = None) -> ClientUpdate:
    """The ClientUpdate in a TRAIN reply (:func:`reply_parts` decoded; ``spec``: the names checked against its
    layout first); raises :class:`UpdateRejected` (the same reasons as for a file)."""
    return decode_update(*reply_parts(content), spec=spec)


# -- the task under secure aggregation (legacy FitIns: ndarrays + a flat config) ------------------------------
@dataclasses.dataclass
class SecAggTask:
    """A task as a SecAgg+ client receives it, plus what it needs to encode its upload: the public
    layout of the global state (:class:`prelort.secure_sums.SecAggLayout` as JSON), the weight bound W
    and SecAgg+'s clipping range."""

    task: DecodedTask
    layout_json: str
    max_weight: float
    clipping_range: float


def encode_secagg_task(
    round_: int,
    client: int,
    rank: int,
    seed: int,
    plan: TrainPlan,
    broadcast: Broadcast,
    config_json: str,
    layout_json: str,
    max_weight: float,
    clipping_range: float,
) -> tuple[list[np.ndarray], dict[str, Any]]:
    """``(parameters, config)`` of one client's legacy FitIns: the broadcast tensors as float32 ndarrays in
    the order of their sorted names, and a flat config with the same fields as ``prelort.task`` plus
    ``names`` (JSON list), ``layout``, ``max_weight`` and ``clipping_range``."""
    if broadcast.base_delta is not None:
        raise ValueError("a secure-aggregation task cannot carry a base delta (sum-aggregatable methods send none)")
    names = sorted(broadcast.adapter)
    arrays = [broadcast.adapter[n].detach().to("cpu", torch.float32).contiguous().numpy() for n in names]
    config = {
        "format": SECAGG_TASK_FORMAT,
        **_task_fields(round_, client, rank, seed, plan, config_json),
        "names": json.dumps(names),
        "layout": layout_json,
        "max_weight": float(max_weight),
        "clipping_range": float(clipping_range),
    }
    return arrays, config


def decode_secagg_task(arrays: list[np.ndarray], config: dict[str, Any]) -> SecAggTask:
    """Inverse of :func:`encode_secagg_task`; raises :class:`BadTask` naming what is missing or malformed."""
    if config.get("format") != SECAGG_TASK_FORMAT:
        raise BadTask(f"secure-aggregation task format {config.get('format')!r} is not {SECAGG_TASK_FORMAT!r}")
    what = "secure-aggregation task"
    _require_fields(config, _TASK_FIELDS + ("names", "layout", "max_weight", "clipping_range"), what)
    try:
        names = json.loads(str(config["names"]))
    except ValueError as e:
        raise BadTask(f"{what} names are not JSON: {e}") from None
    if not isinstance(names, list) or len(names) != len(arrays):
        raise BadTask(f"{what} has {len(arrays)} arrays for names {names!r}")
    adapter = {str(n): torch.from_numpy(np.array(a, dtype=np.float32, copy=True)) for n, a in zip(names, arrays)}
    task = _decoded_task(config, Broadcast(adapter, None), what)
    return SecAggTask(task, str(config["layout"]), float(config["max_weight"]), float(config["clipping_range"]))


# -- node hand-shake -----------------------------------------------------------------------------------------
def encode_hello():
    from flwr.app import ConfigRecord, RecordDict

    return RecordDict({HELLO: ConfigRecord({"format": HELLO_FORMAT})})


def encode_hello_reply(node_config: dict[str, Any]):
    """What a node answers to ``prelort.hello``: its partition id and the number of partitions, the rank it
    declares (if any; an int, or the text given, which the server refuses), the quantisation it declares (if any;
    the text given, which the server checks) and whether it keeps held-out records."""
    from flwr.app import ConfigRecord, RecordDict

    pid, num = node_partition(node_config)
    fields: dict[str, Any] = {"format": HELLO_FORMAT, PARTITION_ID: pid, NUM_PARTITIONS: num}
    if RANK in node_config:
        rank = node_config[RANK]
        fields[RANK] = rank if isinstance(rank, int) and not isinstance(rank, bool) else str(rank)[:40]
    if QUANTIZATION in node_config:
        fields[QUANTIZATION] = str(node_config[QUANTIZATION])[:40]
    fields[HAS_EVAL] = bool(node_config.get(EVAL_PATH))
    return RecordDict({HELLO: ConfigRecord(fields)})


def decode_hello_reply(content: RecordDict) -> tuple[int, int]:
    if HELLO not in content.config_records:
        raise ValueError(f"hello reply has no {HELLO!r} ConfigRecord")
    rec = content.config_records[HELLO]
    try:
        return int(rec[PARTITION_ID]), int(rec[NUM_PARTITIONS])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"hello reply lacks a valid {e}") from None


@dataclasses.dataclass(frozen=True)
class SiteDeclaration:
    """What a node declared in its hello reply, as sent (the server checks it): ``rank`` and ``quantization``
    (None: none declared) and whether it keeps held-out records (``has_eval``)."""

    rank: Any
    has_eval: bool
    quantization: Any = None


def decode_site_declaration(content: RecordDict) -> SiteDeclaration:
    """The :class:`SiteDeclaration` of a hello reply."""
    rec = content.config_records[HELLO]
    return SiteDeclaration(rec.get(RANK), bool(rec.get(HAS_EVAL, False)), rec.get(QUANTIZATION))


def node_partition(node_config: dict[str, Any]) -> tuple[int, int]:
    """``(partition-id, num-partitions)`` of a node; a clear error if the node was started without them."""
    missing = [k for k in (PARTITION_ID, NUM_PARTITIONS) if k not in node_config]
    if missing:
        raise ValueError(
            f"SuperNode node_config lacks {missing}: start it with "
            f'--node-config "partition-id=K num-partitions=N" (K = the prelort client id)'
        )
    try:
        return int(node_config[PARTITION_ID]), int(node_config[NUM_PARTITIONS])
    except (TypeError, ValueError):
        raise ValueError(
            f"SuperNode node_config partition-id={node_config[PARTITION_ID]!r} "
            f"num-partitions={node_config[NUM_PARTITIONS]!r} are not integers"
        ) from None


# -- on-site evaluation (server -> site -> server) ------------------------------------------------------------
def encode_eval_task(round_: int, client: int, rank: int, broadcast: Broadcast, config_json: str) -> RecordDict:
    """The RecordDict of one site's EVALUATE message: the tier's adapter and the run's config."""
    from flwr.app import ConfigRecord, RecordDict

    content = RecordDict(
        {
            EVAL_TASK: ConfigRecord(
                {
                    "format": EVAL_TASK_FORMAT,
                    "round": int(round_),
                    "client": int(client),
                    "rank": int(rank),
                    "config": config_json,
                }
            ),
            ADAPTER: tensors_to_record(broadcast.adapter),
        }
    )
    if broadcast.base_delta is not None:
        content[BASE_DELTA] = tensors_to_record(broadcast.base_delta)
    return content


def decode_eval_task(content: RecordDict) -> tuple[EvalTask, dict[str, Any]]:
    """``(task, config)`` of an EVALUATE message (the run's config as a dict); raises :class:`BadTask`."""
    if EVAL_TASK not in content.config_records:
        raise BadTask(f"message has no {EVAL_TASK!r} ConfigRecord (records: {sorted(content)})")
    rec = content.config_records[EVAL_TASK]
    if rec.get("format") != EVAL_TASK_FORMAT:
        raise BadTask(f"evaluation task format {rec.get('format')!r} is not {EVAL_TASK_FORMAT!r}")
    _require_fields(rec, ("round", "client", "rank", "config"), "evaluation task")
    if ADAPTER not in content.array_records:
        raise BadTask(f"message has no {ADAPTER!r} ArrayRecord")
    adapter = record_to_tensors(content.array_records[ADAPTER])
    base_delta = record_to_tensors(content.array_records[BASE_DELTA]) if BASE_DELTA in content.array_records else None
    try:
        config = json.loads(str(rec["config"]))
        task = EvalTask(int(rec["round"]), int(rec["client"]), int(rec["rank"]), Broadcast(adapter, base_delta))
    except (TypeError, ValueError) as e:
        raise BadTask(f"evaluation task is malformed: {e}") from None
    return task, config


def encode_eval_reply(sums: EvalSums) -> RecordDict:
    """A site's EVALUATE reply: its counts and sums, nothing per example."""
    from flwr.app import ConfigRecord, RecordDict

    return RecordDict(
        {
            EVAL_SUMS: ConfigRecord(
                {
                    "format": EVAL_SUMS_FORMAT,
                    "client": int(sums.client),
                    "n": int(sums.n),
                    "correct": int(sums.correct),
                    "loglik_sum": float(sums.loglik_sum),
                    "tokens": int(sums.tokens),
                }
            )
        }
    )


def decode_eval_reply(content: RecordDict) -> EvalSums:
    """The :class:`EvalSums` of an EVALUATE reply (their values are checked by the round loop); ValueError when
    the reply is not one."""
    if EVAL_SUMS not in content.config_records:
        raise ValueError(f"evaluation reply has no {EVAL_SUMS!r} ConfigRecord")
    rec = content.config_records[EVAL_SUMS]
    if rec.get("format") != EVAL_SUMS_FORMAT:
        raise ValueError(f"evaluation reply format {rec.get('format')!r} is not {EVAL_SUMS_FORMAT!r}")
    missing = [k for k in ("client", "n", "correct", "loglik_sum", "tokens") if k not in rec]
    if missing:
        raise ValueError(f"evaluation reply lacks {missing}")
    return EvalSums(rec["client"], rec["n"], rec["correct"], rec["loglik_sum"], rec["tokens"])
