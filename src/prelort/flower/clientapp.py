"""The Flower ClientApp: one prelort client per SuperNode.

A node holds one partition (node_config ``partition-id``, the prelort client id; ``num-partitions``,
the number of clients). On a TRAIN message it decodes its task (records.py), builds - once per
process - the federation's model and its own partition from the config that came with the task, runs
:class:`prelort.client.ClientRunner` (the same local training as the in-process engine) and replies
with the update in prelort's wire format. A QUERY ``prelort.hello`` is answered with the node's
partition, which is how the ServerApp learns which node holds which client.

Caching: the model and tokenized partition live in module-level variables keyed by the config
sections they depend on. In simulation a Ray actor process serves many messages, so they are built
once; a deployed SuperNode starts a fresh ``flwr-clientapp`` process per message (Flower's
subprocess isolation), so there they are rebuilt every round.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from . import records

log = logging.getLogger("prelort")

app = ClientApp()

# {"key": ..., "model": PeftModel, "tokenizer": ...} and {(key, partition): examples}
_MODEL_CACHE: dict[str, Any] = {}
_PARTITION_CACHE: dict[tuple[str, int], list[dict]] = {}
_SPLIT_CACHE: dict[str, Any] = {}  # {"key": ..., "parts": the untokenized per-client datasets}


def _key(config: dict[str, Any], sections: tuple[str, ...]) -> str:
    picked = {s: config.get(s) for s in sections}
    return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()


def client_state(config: dict[str, Any], partition_id: int):
    """``(cfg, model, examples)`` for this node: built on first use, then reused while the config's
    model/data sections stay the same."""
    from ..config import from_dict
    from ..data import tokenize_for_training
    from ..runner import load_data, load_federation_model

    cfg = from_dict(config)
    model_key = _key(config, ("seed", "model", "lora", "clients"))
    if _MODEL_CACHE.get("key") != model_key:
        _MODEL_CACHE.clear()
        _PARTITION_CACHE.clear()
        _SPLIT_CACHE.clear()
        _, tokenizer, model = load_federation_model(cfg)
        _MODEL_CACHE.update(key=model_key, model=model, tokenizer=tokenizer)
    data_key = _key(config, ("seed", "data", "clients", "model"))
    if (data_key, partition_id) not in _PARTITION_CACHE:
        # one simulation process may serve several partitions: split the data once per process
        if _SPLIT_CACHE.get("key") != data_key:
            _SPLIT_CACHE.clear()
            _SPLIT_CACHE.update(key=data_key, parts=load_data(cfg)[2])
        parts = _SPLIT_CACHE["parts"]
        if not 0 <= partition_id < len(parts):
            raise ValueError(f"partition-id {partition_id} is not a client of this federation "
                             f"(clients.num = {len(parts)})")
        _PARTITION_CACHE[(data_key, partition_id)] = tokenize_for_training(
            parts[partition_id], _MODEL_CACHE["tokenizer"], cfg.data.max_length)
    return cfg, _MODEL_CACHE["model"], _PARTITION_CACHE[(data_key, partition_id)]


def run_task(task: records.DecodedTask, partition_id: int):
    """Train this node's client on ``task``; returns the ClientUpdate."""
    from ..client import ClientRunner
    from ..federation import ClientTask

    if task.client != partition_id:
        raise ValueError(f"this SuperNode holds partition {partition_id} but the task is for client {task.client}")
    cfg, model, examples = client_state(task.config, partition_id)
    runner = ClientRunner(cfg, model, {partition_id: examples}, progress=False)
    return runner.run(ClientTask(round=task.round, client=task.client, rank=task.rank, broadcast=task.broadcast,
                                 plan=task.plan, seed=task.seed))


@app.query()
def hello(msg: Message, context: Context) -> Message:
    """Tell the server which prelort client this node is."""
    return Message(records.encode_hello_reply(dict(context.node_config)), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Run one round of local training. An exception becomes a Flower error reply (the server logs it
    as a failed client and the round goes on)."""
    partition_id, _ = records.node_partition(dict(context.node_config))
    task = records.decode_task(msg.content)
    update = run_task(task, partition_id)
    return Message(records.encode_reply(update), reply_to=msg)
