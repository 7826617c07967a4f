"""prelort messages as Flower records, and the Grid-backed engine against a scripted Grid (no Flower runtime)."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import Array, ConfigRecord, Error, Message, RecordDict  # noqa: E402

from prelort.config import from_dict  # noqa: E402
from prelort.engines.flower import GridEngine, site_declared_config  # noqa: E402
from prelort.flower import records  # noqa: E402
from prelort.methods import Broadcast, ClientUpdate, TrainPlan  # noqa: E402
from prelort.protocol import ClientFailed, ClientTask, EvalSums, EvalTask  # noqa: E402
from prelort.updates import UpdateRejected  # noqa: E402

MOD = "model.layers.0.self_attn.q_proj"


def _adapter(rank: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"{MOD}.lora_A": torch.randn(rank, 6, generator=g), f"{MOD}.lora_B": torch.randn(5, rank, generator=g)}


def _update(client: int = 1, rank: int = 2, round_: int = 3) -> ClientUpdate:
    return ClientUpdate(
        client=client,
        rank=rank,
        num_examples=17,
        tensors=_adapter(rank, seed=client),
        round=round_,
        method="prelort",
        meta={"loss": 1.25},
    )


def test_task_round_trip_keeps_every_field_and_value():
    plan = TrainPlan(rank=4, truncations=(1, 2, 4), mode="sandwich", extra={"prune_start": 3, "prune_lam": 0.01})
    delta = {f"{MOD}.delta": torch.randn(5, 6)}
    cfg_json = json.dumps({"method": "prelort", "seed": 7})
    content = records.encode_task(5, 2, 4, 2**62 + 11, plan, Broadcast(_adapter(4), delta), cfg_json)
    task = records.decode_task(content)
    assert (task.round, task.client, task.rank, task.seed) == (5, 2, 4, 2**62 + 11)
    assert task.plan == plan
    assert task.config == {"method": "prelort", "seed": 7}
    for k, v in _adapter(4).items():
        assert torch.equal(task.broadcast.adapter[k], v) and task.broadcast.adapter[k].dtype == torch.float32
    assert torch.equal(task.broadcast.base_delta[f"{MOD}.delta"], delta[f"{MOD}.delta"])


def test_a_plans_method_extra_survives_the_wire_and_drives_the_client_side():
    """HetLoRA's pruning instructions travel in TrainPlan.extra; the client builds the same SelfPruning from them."""
    from prelort.methods import FederationSpec
    from prelort.methods.hetlora import HetLoRA, SelfPruning

    spec = FederationSpec(
        modules={MOD: (5, 6)},
        client_ranks=(2, 8),
        alpha=16.0,
        options={"hetlora_prune": True, "hetlora_gamma": 0.5, "hetlora_lam": 0.01},
    )
    method = HetLoRA(spec)
    plan = method.plan(8)
    decoded = records.plan_from_json(records.plan_to_json(plan))
    assert decoded == plan
    local = method.local_training(decoded)
    assert isinstance(local, SelfPruning) and (local.start, local.lam, local.rank) == (4, 0.01, 8)
    with pytest.raises(records.BadTask, match="not a TrainPlan"):
        records.plan_from_json(json.dumps({"rank": 2, "truncations": [2], "extra": [1]}))


def test_task_without_base_delta_decodes_to_none():
    content = records.encode_task(1, 0, 2, 1, TrainPlan(2, (2,)), Broadcast(_adapter(2)), "{}")
    assert records.BASE_DELTA not in content.array_records
    assert records.decode_task(content).broadcast.base_delta is None


def test_decode_task_names_what_is_missing():
    with pytest.raises(records.BadTask, match="prelort.task"):
        records.decode_task(RecordDict({"x": ConfigRecord({"a": 1})}))
    content = records.encode_task(1, 0, 2, 1, TrainPlan(2, (2,)), Broadcast(_adapter(2)), "{}")
    content.config_records[records.TASK]["format"] = "prelort-task-v0"
    with pytest.raises(records.BadTask, match="prelort-task-v0"):
        records.decode_task(content)


def test_reply_round_trip_is_the_wire_format():
    upd = _update()
    back = records.decode_reply(records.encode_reply(upd))
    assert (back.client, back.rank, back.num_examples, back.round, back.method) == (1, 2, 17, 3, "prelort")
    assert back.meta == {"loss": 1.25}
    for k, v in upd.tensors.items():
        assert torch.equal(back.tensors[k], v)


def test_reply_with_corrupt_payload_or_metadata_is_rejected_with_a_reason():
    content = records.encode_reply(_update())
    data = content.array_records[records.UPDATE]["safetensors"].data
    content.array_records[records.UPDATE]["safetensors"] = Array(
        dtype="uint8", shape=(10,), stype="safetensors", data=data[:10]
    )
    with pytest.raises(UpdateRejected) as e:
        records.decode_reply(content)
    assert e.value.reason in ("truncated", "not_safetensors")

    content = records.encode_reply(_update())
    del content[records.UPDATE_META]
    with pytest.raises(UpdateRejected) as e:
        records.decode_reply(content)
    assert e.value.reason == "missing_metadata"

    content = records.encode_reply(_update())
    content.config_records[records.UPDATE_META]["meta"] = json.dumps({"rank": "two"})
    with pytest.raises(UpdateRejected) as e:
        records.decode_reply(content)
    assert e.value.reason == "bad_metadata"


def test_node_partition_requires_both_keys():
    assert records.node_partition({"partition-id": 3, "num-partitions": 4}) == (3, 4)
    with pytest.raises(ValueError, match="num-partitions"):
        records.node_partition({"partition-id": 3})
    with pytest.raises(ValueError, match="not integers"):
        records.node_partition({"partition-id": "x", "num-partitions": 4})


# -- GridEngine against a scripted grid -----------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _task_identity():
    """Flower stamps messages with the run id of the ServerApp process; outside one, pretend a run."""
    from flwr.supercore.task_identity import TaskIdentity

    before = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1234, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = before


class ScriptedGrid:
    """A Grid stand-in: nodes answer hello with their partition and TRAIN with whatever ``behaviour`` says."""

    def __init__(self, partitions: dict[int, int], num: int, behaviour, node_configs: dict[int, dict] | None = None):
        self.partitions = partitions  # node id -> partition id
        self.num = num
        self.behaviour = behaviour  # (node, task) -> RecordDict | Error | None (no reply)
        self.node_configs = node_configs or {}  # node id -> what else its --node-config says (rank, eval-path)
        self.sent: list[Message] = []

    def get_node_ids(self):
        return list(self.partitions)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for m in messages:
            self.sent.append(m)
            node = m.metadata.dst_node_id
            if records.HELLO in m.content.config_records:
                node_config = {"partition-id": self.partitions[node], "num-partitions": self.num}
                content = records.encode_hello_reply({**node_config, **self.node_configs.get(node, {})})
                replies.append(_reply(m, content))
                continue
            if records.EVAL_TASK in m.content.config_records:
                out = self.behaviour(node, records.decode_eval_task(m.content)[0])
            else:
                out = self.behaviour(node, records.decode_task(m.content))
            if out is None:
                continue
            replies.append(Message(out, reply_to=m))
        return replies


def _reply(m: Message, content: RecordDict) -> Message:
    return Message(content, reply_to=m)


def _tasks(clients, round_=1):
    return [ClientTask(round_, c, 2, Broadcast(_adapter(2)), TrainPlan(2, (2,)), seed=c) for c in clients]


def _engine(grid, num=3):
    cfg = from_dict(
        {"clients": {"num": num, "per_round": num, "ranks": [2]}, "flower": {"round_timeout": 5, "node_wait": 1}}
    )
    return GridEngine(grid, cfg, json.dumps(cfg.to_dict()))


def test_engine_sends_each_task_to_the_node_of_its_partition_and_decodes_replies():
    def train(node, task):
        return records.encode_reply(_update(client=task.client, rank=2, round_=task.round))

    grid = ScriptedGrid({101: 2, 102: 0, 103: 1}, 3, train)
    results = _engine(grid).execute(_tasks([0, 1, 2]))
    assert [r.client for r in results] == [0, 1, 2]
    trains = [m for m in grid.sent if records.TASK in m.content.config_records]
    assert {m.metadata.dst_node_id: records.decode_task(m.content).client for m in trains} == {102: 0, 103: 1, 101: 2}
    assert all(m.metadata.group_id == "1" for m in trains)


def test_engine_turns_silence_errors_and_impostors_into_failures():
    def train(node, task):
        if node == 101:
            return None  # never answers
        if node == 102:
            return Error(code=0, reason="boom in ClientApp")
        return records.encode_reply(_update(client=0, rank=2, round_=task.round))  # node 103 claims client 0

    grid = ScriptedGrid({101: 0, 102: 1, 103: 2}, 3, train)
    results = _engine(grid).execute(_tasks([0, 1, 2]))
    assert all(isinstance(r, ClientFailed) for r in results)
    assert [r.client for r in results] == [0, 1, 2]
    assert "no reply" in str(results[0]) and "boom in ClientApp" in str(results[1])
    assert "declares client 0" in str(results[2])


def test_engine_marks_a_rejected_payload_with_its_client():
    def train(node, task):
        content = records.encode_reply(_update(client=task.client, rank=2, round_=task.round))
        content.config_records[records.UPDATE_META]["format"] = "other"
        return content

    results = _engine(ScriptedGrid({7: 0}, 1, train), num=1).execute(_tasks([0]))
    assert isinstance(results[0], UpdateRejected) and results[0].client == 0


def test_engine_ignores_misconfigured_nodes_and_fails_their_clients():
    def train(node, task):
        return records.encode_reply(_update(client=task.client, rank=2, round_=task.round))

    # node 2 says num-partitions=3 like the others but duplicates partition 0; partition 1 has no node
    grid = ScriptedGrid({1: 0, 2: 0, 3: 2}, 3, train)
    engine = _engine(grid)
    results = engine.execute(_tasks([0, 1, 2]))
    assert isinstance(results[1], ClientFailed) and "no SuperNode holds partition 1" in str(results[1])
    assert results[0].client == 0 and results[2].client == 2
    assert "already held" in engine.nodes.ignored[2]


# -- what a site declares: rank, held-out records; on-site evaluation ------------------------------------------
def _site_grid(node_configs, behaviour=None):
    partitions = {node: k for k, node in enumerate(node_configs)}
    return ScriptedGrid(partitions, len(partitions), behaviour or (lambda node, task: None), node_configs)


def _flower_cfg(num: int, **clients):
    return from_dict(
        {"clients": {"num": num, "per_round": num, **clients}, "flower": {"round_timeout": 5, "node_wait": 1}}
    )


def test_the_hello_reply_carries_the_declared_rank_and_whether_the_site_evaluates_never_a_path():
    node_config = {"partition-id": 1, "num-partitions": 2, "rank": 8, "eval-path": "/site/secret/held-out.jsonl"}
    reply = records.encode_hello_reply({**node_config, "data-path": "/site/secret/train.jsonl", "quantization": "nf4"})
    assert records.decode_hello_reply(reply) == (1, 2)
    assert records.decode_site_declaration(reply) == records.SiteDeclaration(8, True, "nf4")
    assert "secret" not in json.dumps(dict(reply.config_records[records.HELLO].items()))
    assert records.decode_site_declaration(
        records.encode_hello_reply({"partition-id": 0, "num-partitions": 2})
    ) == records.SiteDeclaration(None, False, None)


def test_declared_ranks_become_the_runs_ranks_and_segments():
    grid = _site_grid({11: {"rank": 2, "eval-path": "/a"}, 12: {"rank": 8}, 13: {}})
    cfg, nodes = site_declared_config(grid, _flower_cfg(3))  # configured ranks [1, 2, 4, 8]: cap 8
    assert cfg.clients.ranks == [2, 8, 4]  # client 2 declared nothing: its configured rank
    assert cfg.federation_spec({}).distinct_ranks == [2, 4, 8]
    assert nodes.has_eval == {0} and nodes.declared_rank == {0: 2, 1: 8}


@pytest.mark.parametrize(
    ("rank", "reason"),
    [
        (0, "declared rank 0 is not positive"),
        (-3, "declared rank -3 is not positive"),
        (16, "declared rank 16 is above clients.max_rank (8)"),
        ("big", "declared rank 'big' is not an integer"),
        ("8", "declared rank '8' is not an integer"),  # rank="8": a TOML string
        (2.5, "declared rank '2.5' is not an integer"),
    ],
)
def test_an_invalid_declared_rank_is_refused_and_its_client_fails_with_the_reason(rank, reason):
    grid = _site_grid({11: {"rank": 2}, 12: {"rank": rank}})
    cfg, nodes = site_declared_config(grid, _flower_cfg(2, max_rank=8))
    assert cfg.clients.ranks == [2, 2]  # the refused node's client keeps its configured rank
    engine = GridEngine(grid, cfg, json.dumps(cfg.to_dict()), nodes)
    failed = engine.execute(_tasks([1]))[0]
    assert isinstance(failed, ClientFailed) and reason in str(failed), str(failed)


def test_declared_quantizations_go_to_the_records_and_an_invalid_one_is_refused_with_the_reason():
    grid = _site_grid({11: {"rank": 2, "quantization": "nf4"}, 12: {"quantization": "fp4"}, 13: {}})
    cfg, nodes = site_declared_config(grid, _flower_cfg(3, ranks=[2]))
    engine = GridEngine(grid, cfg, json.dumps(cfg.to_dict()), nodes)
    assert [engine.quantization_of(k) for k in range(3)] == ["nf4", None, "none"]  # refused: not known
    failed = engine.execute(_tasks([1]))[0]
    reason = "declared quantization 'fp4' is not one of none, int8, nf4"
    assert isinstance(failed, ClientFailed) and reason in str(failed), str(failed)
    assert cfg.clients.ranks == [2, 2, 2]  # the refused node's client keeps its configured rank


def test_a_node_joining_later_with_another_rank_is_refused():
    grid = _site_grid({11: {"rank": 2}, 12: {"rank": 8}})
    cfg, nodes = site_declared_config(grid, _flower_cfg(2))
    grid.partitions[13], grid.node_configs[13] = 1, {"rank": 4}  # a second node claims client 1 at rank 4
    del grid.partitions[12]
    nodes.refresh([1], wait=0)
    assert "not the rank 8 client 1 had when the run started" in nodes.refused[1]


def test_eval_tasks_and_sums_round_trip_through_the_records():
    task = EvalTask(3, 1, 2, Broadcast(_adapter(2)))
    decoded, config = records.decode_eval_task(records.encode_eval_task(3, 1, 2, task.broadcast, '{"seed": 5}'))
    assert (decoded.round, decoded.client, decoded.rank, config) == (3, 1, 2, {"seed": 5})
    torch.testing.assert_close(decoded.broadcast.adapter, task.broadcast.adapter)
    sums = EvalSums(1, n=4, correct=3, loglik_sum=-7.5, tokens=9)
    assert records.decode_eval_reply(records.encode_eval_reply(sums)) == sums
    assert set(records.encode_eval_reply(sums).config_records[records.EVAL_SUMS]) == {
        "format",
        "client",
        "n",
        "correct",
        "loglik_sum",
        "tokens",
    }


def test_on_site_evaluation_reaches_only_sites_with_held_out_records():
    def evaluate(node, task):
        if node == 12:
            return Error(code=2, reason="site eval-path: the file holds no record")
        return records.encode_eval_reply(EvalSums(task.client, 4, 1, -2.0, 6))

    grid = _site_grid({11: {"rank": 2, "eval-path": "/a"}, 12: {"rank": 8, "eval-path": "/b"}, 13: {}}, evaluate)
    cfg, nodes = site_declared_config(grid, _flower_cfg(3))
    engine = GridEngine(grid, cfg, json.dumps(cfg.to_dict()), nodes)
    tasks = [EvalTask(1, k, r, Broadcast(_adapter(r))) for k, r in enumerate(cfg.clients.ranks)]
    results = engine.evaluate(tasks)
    assert results[0] == EvalSums(0, 4, 1, -2.0, 6)
    assert isinstance(results[1], ClientFailed) and "holds no record" in str(results[1])
    assert results[2] is None
    evaluated = [m.metadata.dst_node_id for m in grid.sent if records.EVAL_TASK in m.content.config_records]
    assert sorted(evaluated) == [11, 12]


def test_engine_hands_a_reply_over_undecoded_so_its_names_are_checked_before_any_tensor_is():
    """A reply of 20,000 zero-size tensors (issue 26, hole 4, on the Flower path): the engine reads only the
    metadata and returns the wire parts; the round loop's decode_raw refuses the names against the layout before
    safetensors decodes a single tensor."""
    from safetensors.torch import save as st_save

    from prelort import updates
    from prelort.methods import FederationSpec
    from prelort.protocol import RawUpdate, decode_raw

    junk = {f"junk.{i}": torch.zeros(0) for i in range(20_000)}

    def train(node, task):
        content = records.encode_reply(_update(client=task.client, rank=2, round_=task.round))
        data = st_save(junk)
        content.array_records[records.UPDATE]["safetensors"] = Array(
            dtype="uint8", shape=(len(data),), stype="safetensors", data=data
        )
        return content

    results = _engine(ScriptedGrid({7: 0}, 1, train), num=1).execute(_tasks([0]))
    assert isinstance(results[0], RawUpdate) and results[0].client == 0

    def no_decoding(data):
        raise AssertionError("the payload was decoded before its names were checked")

    spec = FederationSpec(modules={MOD: (5, 6)}, client_ranks=(2,), alpha=16.0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(updates, "_st_load", no_decoding)
        with pytest.raises(UpdateRejected) as e:
            decode_raw(results[0], spec=spec)
    assert e.value.reason in ("header_too_large", "extra_key") and e.value.client == 0
    assert records.decode_reply(records.encode_reply(_update(client=0)), spec=spec).client == 0
