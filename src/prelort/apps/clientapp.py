"""The Flower ClientApp: one prelort client per SuperNode.

A node holds one partition (node_config ``partition-id``, the prelort client id; ``num-partitions``,
the number of clients). On a TRAIN message it decodes its task (records.py), builds - once per
process - the federation's model and its own examples from the config that came with the task (the
recipe of :mod:`prelort.recipe`, which the in-process runner follows too), runs
:class:`prelort.client.ClientRunner` (the same local training as the in-process engine) and replies
with the update in prelort's wire format. A QUERY ``prelort.hello`` is answered with the node's
partition, which is how the ServerApp learns which node holds which client.

A site's own data (docs/deployment.md): node_config ``data-path`` names the file (or directory, or saved
dataset) the node trains on instead of slice ``partition-id`` of the server's ``data.source`` (with
``clients.sites`` in the config, e.g. under flower-sim, the site's ``data_path``); ``rank`` declares the
site's rank (sent with the hello; the node never trains above it); ``quantization`` how it holds its base
model (none, int8, nf4; sent with the hello; else the site's ``clients.sites`` entry's, else
``model.quantization``); ``eval-path`` its held-out records, on which an EVALUATE message is answered with
counts and sums only. A file that cannot be used fails the task with a reason that names no path and no
record (the full message goes to this node's log).

Under secure aggregation the same ``train`` handler receives the four stages of Flower's SecAgg+ protocol
(messages that carry SecAgg+'s config record): they go to a legacy ``NumPyClient`` behind
``secaggplus_mod``, whose ``fit`` decodes the task, trains with :func:`run_task`, validates and clips its own
update and uploads the fixed-shape encoding of :mod:`prelort.secure_sums` (:func:`secure_upload`). One
ClientApp serves both paths, so the launcher writes the same app either way.

Caching: the models (at most one per quantisation setting, :class:`prelort.recipe.ClientModels`) and the
tokenized partitions live in module-level variables keyed by the config sections they depend on. In
simulation a Ray actor process serves many messages (of partitions that may hold their bases differently),
so they are built once; a deployed SuperNode starts a fresh ``flwr-clientapp`` process per message (Flower's
subprocess isolation), so there they are rebuilt every round.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS as SECAGG_CONFIGS

from ..flower import records

log = logging.getLogger("prelort")

app = ClientApp()

# {"key": ..., "models": recipe.ClientModels (at most one model per quantisation setting)} and
# {(key, partition): examples}
_MODEL_CACHE: dict[str, Any] = {}
_PARTITION_CACHE: dict[tuple[str, int], list[dict]] = {}
_SPLIT_CACHE: dict[str, Any] = {}  # {"key": ..., "parts": the untokenized per-client datasets}


def _key(config: dict[str, Any], sections: tuple[str, ...]) -> str:
    picked = {s: config.get(s) for s in sections}
    return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()


def site_path(cfg: Any, node_config: dict[str, Any] | None, partition_id: int, key: str) -> str | None:
    """The site file this node uses for ``key`` (``data-path`` or ``eval-path``): its node_config's, else the
    config's ``clients.sites`` entry for its partition (one machine playing the sites), else None."""
    node_config = node_config or {}
    if node_config.get(key):
        return str(node_config[key])
    sites = cfg.clients.sites or []
    if 0 <= partition_id < len(sites):
        return sites[partition_id].data_path if key == records.DATA_PATH else sites[partition_id].eval_path
    return None


def site_quantization(cfg: Any, node_config: dict[str, Any] | None, partition_id: int) -> str:
    """How this node holds its base model: its node_config's ``quantization``, else the config's ``clients.sites``
    entry for its partition, else ``model.quantization``; a ValueError with the reason for an invalid one."""
    from ..config import site_quantization_problem

    declared = (node_config or {}).get(records.QUANTIZATION)
    if declared is not None and (problem := site_quantization_problem(declared)):
        raise ValueError(f"this site's node-config {problem}")
    return cfg.client_quantization(partition_id, declared)


def _model(config: dict[str, Any], cfg: Any, quantization: str):
    """``(model, tokenizer)`` with the base held as ``quantization`` says, built on first use."""
    from ..recipe import ClientModels

    model_key = _key(config, ("seed", "model", "lora", "clients", "train"))
    if _MODEL_CACHE.get("key") != model_key:
        _MODEL_CACHE.clear()
        _PARTITION_CACHE.clear()
        _SPLIT_CACHE.clear()
        _MODEL_CACHE.update(key=model_key, models=ClientModels(cfg))
    return _MODEL_CACHE["models"].at(quantization)


def _site_records(load: Any, *args: Any) -> Any:
    """``load(*args)`` of a site file; its SiteDataError is logged here in full (path and parser message stay
    on the site) and raised with the reason the server may read."""
    from ..data.sites import SiteDataError

    try:
        return load(*args)
    except SiteDataError as e:
        log.error("this site's data cannot be used: %s", e.detail)
        raise SiteDataError(str(e)) from None


def client_state(config: dict[str, Any], partition_id: int, node_config: dict[str, Any] | None = None):
    """``(cfg, model, examples)`` for this node: built on first use, then reused while the config's
    model/data sections (and the node's data-path) stay the same."""
    from ..config import from_dict
    from ..recipe import client_examples, load_data, site_examples

    cfg = from_dict(config)
    model, tokenizer = _model(config, cfg, site_quantization(cfg, node_config, partition_id))
    data_key = _key(config, ("seed", "data", "clients", "model"))
    path = site_path(cfg, node_config, partition_id, records.DATA_PATH)
    if path is not None:  # the site's own file, and nothing else
        if (data_key, path) not in _PARTITION_CACHE:
            _PARTITION_CACHE[(data_key, path)] = _site_records(site_examples, cfg, tokenizer, path)
        return cfg, model, _PARTITION_CACHE[(data_key, path)]
    if (data_key, partition_id) not in _PARTITION_CACHE:
        # one simulation process may serve several partitions: split the data once per process
        if _SPLIT_CACHE.get("key") != data_key:
            _SPLIT_CACHE.clear()
            _SPLIT_CACHE.update(key=data_key, parts=load_data(cfg)[2])
        parts = _SPLIT_CACHE["parts"]
        if not 0 <= partition_id < len(parts):
            raise ValueError(
                f"partition-id {partition_id} is not a client of this federation (clients.num = {len(parts)})"
            )
        _PARTITION_CACHE[(data_key, partition_id)] = client_examples(cfg, tokenizer, parts[partition_id])
    return cfg, model, _PARTITION_CACHE[(data_key, partition_id)]


def run_task(task: records.DecodedTask, partition_id: int, node_config: dict[str, Any] | None = None):
    """Train this node's client on ``task``; returns the ClientUpdate."""
    from ..client import ClientRunner
    from ..protocol import ClientTask

    if task.client != partition_id:
        raise ValueError(f"this SuperNode holds partition {partition_id} but the task is for client {task.client}")
    declared = (node_config or {}).get(records.RANK)
    if isinstance(declared, int) and task.rank > declared:
        raise ValueError(f"the task asks for rank {task.rank}, above the rank {declared} this site declared")
    cfg, model, examples = client_state(task.config, partition_id, node_config)
    runner = ClientRunner(cfg, model, {partition_id: examples}, progress=False)
    return runner.run(
        ClientTask(
            round=task.round,
            client=task.client,
            rank=task.rank,
            broadcast=task.broadcast,
            plan=task.plan,
            seed=task.seed,
        )
    )


class SecAggUploadRefused(RuntimeError):
    """This client trained but sent nothing to SecAgg+ (its update failed its own checks, or encoding did)."""


def secure_upload(
    secagg_task: records.SecAggTask, partition_id: int, node_config: dict[str, Any] | None = None
) -> tuple[list[Any], int, dict[str, Any]]:
    """Train, then what this client hands to SecAgg+: ``(arrays, n_k, metrics)``.

    The server never sees this update, so the checks it would run happen here: the update is validated
    (:func:`prelort.updates.server_check`, the server's own checks and bounds), clipped with
    ``robust.clip_norm`` (under ``privacy.dp``: ``privacy.clip_norm``, then weight 1) against the adapter it
    received (:func:`prelort.privacy.clip_update`), and encoded in the public layout
    (:func:`prelort.secure_sums.encode_for_secagg`, which refuses values SecAgg+ would clip). Any failure
    raises, so nothing is uploaded and the round goes on without this client.
    ``metrics`` travel in the clear: the client id, its training loss and the method's ``clear_meta_fields`` only.
    """
    from .. import adapters, methods
    from ..privacy import clip_update
    from ..rank_geometry import adapter_prefix
    from ..secure_sums import SecAggLayout, encode_for_secagg, weight_units
    from ..updates import server_check

    task = secagg_task.task
    update = run_task(task, partition_id, node_config)
    cfg, model, _ = client_state(task.config, partition_id, node_config)
    spec = cfg.federation_spec(adapters.LoraAdapter(model).modules)
    server_check(update, spec, methods.build(cfg.method, spec), cfg.validation, round_=task.round)
    # privacy.dp: clip to privacy.clip_norm (the DP sensitivity; it replaces robust clipping, as on the server)
    clip_norm = cfg.privacy.clip_norm if cfg.privacy.dp else cfg.robust.clip_norm
    if clip_norm is not None:
        update, norm, clipped = clip_update(update, adapter_prefix(task.broadcast.adapter, update.rank), clip_norm)
        if clipped:
            log.info(
                "client %d: clipped its update change %.4g -> %.4g before secure aggregation",
                task.client,
                norm,
                clip_norm,
            )
    method = methods.build(cfg.method, spec)
    layout = SecAggLayout.from_json(secagg_task.layout_json)
    arrays, weight = encode_for_secagg(
        method, update, layout, clipping_range=secagg_task.clipping_range, uniform_weight=cfg.privacy.dp
    )
    units = weight_units(weight, secagg_task.max_weight)
    clear = {k: update.meta[k] for k in ("loss", *method.clear_meta_fields) if k in update.meta}
    return arrays, units, {"client": task.client, "meta": json.dumps(clear)}


def _secagg_client_fn(context: Context):
    from flwr.client import NumPyClient

    node_config = dict(context.node_config)
    partition_id, _ = records.node_partition(node_config)

    class SecAggClient(NumPyClient):
        def fit(self, parameters, config):
            task = records.decode_secagg_task(list(parameters), dict(config))
            try:
                return secure_upload(task, partition_id, node_config)
            except Exception as e:  # the server reads the client id from Flower's error reason
                raise SecAggUploadRefused(
                    f"client {task.task.client} did not upload to SecAgg+: {type(e).__name__}: {e}"
                ) from e

    return SecAggClient().to_client()


_SECAGG_APP: ClientApp | None = None


def _secagg_app() -> ClientApp:
    """SecAgg+'s legacy path: a NumPyClient behind ``secaggplus_mod`` (built on first use)."""
    global _SECAGG_APP
    if _SECAGG_APP is None:
        from flwr.client.mod import secaggplus_mod

        _SECAGG_APP = ClientApp(client_fn=_secagg_client_fn, mods=[secaggplus_mod])
    return _SECAGG_APP


@app.query()
def hello(msg: Message, context: Context) -> Message:
    """Tell the server which prelort client this node is."""
    return Message(records.encode_hello_reply(dict(context.node_config)), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Run one round of local training. An exception becomes a Flower error reply (the server logs it
    as a failed client and the round goes on). A message carrying SecAgg+'s config record is one stage of
    the secure-aggregation protocol and goes to the legacy SecAgg+ client instead."""
    if SECAGG_CONFIGS in msg.content.config_records:  # a stage of SecAgg+ (privacy.secure_aggregation)
        return _secagg_app()(msg, context)
    node_config = dict(context.node_config)
    partition_id, _ = records.node_partition(node_config)
    task = records.decode_task(msg.content)
    update = run_task(task, partition_id, node_config)
    return Message(records.encode_reply(update), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """On-site evaluation: the global adapter of this site's tier on its held-out records (``eval-path``),
    answered with counts and sums only (:func:`prelort.client.evaluate_on_site`)."""
    from ..client import evaluate_on_site
    from ..config import from_dict
    from ..recipe import site_eval_records

    node_config = dict(context.node_config)
    partition_id, _ = records.node_partition(node_config)
    task, config = records.decode_eval_task(msg.content)
    if task.client != partition_id:
        raise ValueError(f"this SuperNode holds partition {partition_id} but the task is for client {task.client}")
    cfg = from_dict(config)
    path = site_path(cfg, node_config, partition_id, records.EVAL_PATH)
    if path is None:
        raise ValueError("this site keeps no held-out records (no eval-path)")
    held_out = _site_records(site_eval_records, cfg, path)
    model, tokenizer = _model(config, cfg, site_quantization(cfg, node_config, partition_id))
    return Message(records.encode_eval_reply(evaluate_on_site(model, tokenizer, held_out, cfg, task)), reply_to=msg)
