"""The Flower engine (``engine: flower-sim`` and ``engine: flower``): clients are Flower SuperNodes, reached
through a ServerApp's ``Grid`` (:mod:`prelort.apps.serverapp`). flwr is imported only where a message is
built, so importing this module (and the in-process path) never imports flwr.

``GridEngine.execute(tasks)`` is what :meth:`prelort.runner.Session.run` calls each round: it sends each
sampled client's task to the node holding that client's partition (one TRAIN message each, records.py),
waits up to ``flower.round_timeout`` seconds, and returns every reply as a :class:`~prelort.protocol.RawUpdate`
(the wire format, undecoded: the round loop checks its tensor names against the layout, then decodes it). A node that errs, does not answer in time, or answers with something that cannot be decoded
becomes an Exception in the result list (carrying ``.client``), which the Federation logs while the round
goes on - exactly as with the in-process engine.

Which node is which client: a node states its node_config ``partition-id`` in reply to a
``prelort.hello`` QUERY (:class:`NodeDirectory`). Nodes that join late are greeted before the next round.
A node may also declare its site's rank (node-config ``rank``), how it holds its base model (``quantization``)
and that it keeps held-out records (``eval-path``): :func:`site_declared_config` greets the nodes before the run
starts and makes the declared ranks the run's ``clients.ranks``; a node declaring an invalid rank or quantisation
is refused with the reason, which its client's failures then carry; ``GridEngine.quantization_of`` tells the
training records each client's quantisation. ``GridEngine.evaluate`` sends on-site evaluation (EVALUATE
messages) to the nodes that keep held-out records.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence

from ..config import Config, from_dict, site_quantization_problem, site_rank_problem
from ..flower import records
from ..protocol import ClientFailed, ClientTask, EngineResult, EvalSums, EvalTask, RawUpdate
from ..updates import UpdateRejected, parse_metadata

log = logging.getLogger("prelort")

# A greeting costs a ClientApp start on a deployed node (~10 s here); never wait longer than this for one.
HELLO_TIMEOUT = 120.0


class NodeDirectory:
    """Flower node id <-> prelort client id, learned by greeting every connected node once."""

    def __init__(self, grid, num_clients: int, hello_timeout: float = HELLO_TIMEOUT, rank_cap: int | None = None):
        self.grid = grid
        self.num_clients = num_clients
        self.hello_timeout = hello_timeout
        self.rank_cap = rank_cap  # the largest rank a node may declare (clients.max_rank)
        self.client_of: dict[int, int] = {}  # node id -> client id
        self.ignored: dict[int, str] = {}  # node id -> why it holds no client
        self.refused: dict[int, str] = {}  # client id -> why the node that claimed it was refused
        self.declared_rank: dict[int, int] = {}  # client id -> the rank its node declared
        self.declared_quantization: dict[int, str] = {}  # client id -> how its node declared it holds its base
        self.has_eval: set[int] = set()  # clients whose node keeps held-out records
        self.fixed_ranks: list[int] | None = None  # the run's ranks, once it started: a later node must agree

    def node_of(self, client: int) -> int | None:
        for node, c in self.client_of.items():
            if c == client:
                return node
        return None

    def clients(self) -> set[int]:
        return set(self.client_of.values())

    def refresh(self, wanted: Iterable[int], wait: float) -> set[int]:
        """Greet new nodes, forget gone ones, and wait up to ``wait`` seconds until every client in
        ``wanted`` has a node. Returns the wanted clients that still have none."""
        from flwr.app import Message, MessageType

        wanted = set(wanted)
        deadline = time.monotonic() + wait
        announced = False
        while True:
            live = set(self.grid.get_node_ids())
            for node in [n for n in self.client_of if n not in live]:
                log.warning("SuperNode %d (client %d) left the federation", node, self.client_of.pop(node))
            new = sorted(live - set(self.client_of) - set(self.ignored))
            if new:
                messages = [
                    Message(
                        records.encode_hello(), dst_node_id=n, message_type=MessageType.QUERY, ttl=self.hello_timeout
                    )
                    for n in new
                ]
                for reply in self.grid.send_and_receive(messages, timeout=self.hello_timeout):
                    self._learn(reply)
            missing = wanted - self.clients()
            if not missing or time.monotonic() >= deadline:
                if missing:
                    log.warning(
                        "no SuperNode holds partition(s) %s after waiting %.0f s (flower.node_wait); "
                        "those clients fail this round",
                        sorted(missing),
                        wait,
                    )
                return missing
            if not announced:
                log.info("waiting for SuperNodes holding partition(s) %s (up to %.0f s)", sorted(missing), wait)
                announced = True
            time.sleep(1.0)

    def _learn(self, reply) -> None:
        node = reply.metadata.src_node_id
        if reply.has_error():
            self.ignored[node] = f"hello failed: {reply.error.reason}"
            log.warning("SuperNode %d holds no client: %s", node, self.ignored[node])
            return
        try:
            pid, num = records.decode_hello_reply(reply.content)
        except ValueError as e:
            self.ignored[node] = str(e)
        else:
            if num != self.num_clients:
                self.ignored[node] = f"num-partitions={num} but the federation has clients.num={self.num_clients}"
            elif not 0 <= pid < self.num_clients:
                self.ignored[node] = f"partition-id={pid} is not in 0..{self.num_clients - 1}"
            elif (other := self.node_of(pid)) is not None:
                # Loud: without SuperNode authentication either node may be an impostor (docs/deployment.md).
                self.ignored[node] = (
                    f"partition-id={pid} is already held by SuperNode {other}; two nodes claim "
                    f"client {pid} - check which one is genuine"
                )
            elif (problem := self._declaration_problem(pid, reply.content)) is not None:
                self.ignored[node] = self.refused[pid] = f"SuperNode {node} (client {pid}) refused: {problem}"
            else:
                self.client_of[node] = pid
                self.refused.pop(pid, None)
                if records.decode_site_declaration(reply.content).has_eval:
                    self.has_eval.add(pid)
                else:
                    self.has_eval.discard(pid)
                log.info("SuperNode %d holds client %d%s", node, pid, self._declared(pid))
                return
        log.warning("SuperNode %d holds no client: %s", node, self.ignored[node])

    def _declaration_problem(self, client: int, content) -> str | None:
        """Why the rank or quantisation a node declares for ``client`` is refused (None: none declared, or valid
        ones, noted)."""
        declared = records.decode_site_declaration(content)
        rank, quantization = declared.rank, declared.quantization
        problem = None if rank is None else site_rank_problem(rank, self.rank_cap)
        if problem is None and rank is not None and self.fixed_ranks is not None and rank != self.fixed_ranks[client]:
            problem = f"rank {rank} is not the rank {self.fixed_ranks[client]} client {client} had when the run started"
        if problem is None and quantization is not None:
            problem = site_quantization_problem(quantization)
        if problem is not None:
            return f"declared {problem}"
        if rank is not None:
            self.declared_rank[client] = rank
        if quantization is not None:
            self.declared_quantization[client] = quantization
        else:
            self.declared_quantization.pop(client, None)
        return None

    def _declared(self, client: int) -> str:
        """What the node of ``client`` declared, for the log: `` (declared rank 8, quantization nf4)`` or ``""``."""
        parts = []
        if (rank := self.declared_rank.get(client)) is not None:
            parts.append(f"rank {rank}")
        if (quantization := self.declared_quantization.get(client)) is not None:
            parts.append(f"quantization {quantization}")
        return f" (declared {', '.join(parts)})" if parts else ""

    def quantization_of(self, client: int, cfg: Config) -> str | None:
        """How ``client`` holds its base model: what its node declared, else the config's
        (:meth:`Config.client_quantization`); None while the node that claimed it is refused."""
        if client in self.refused:
            return None
        return cfg.client_quantization(client, self.declared_quantization.get(client))

    def log_assignments(self) -> None:
        """Log which node holds which client (with what it declared) and every node refused: a greeting made
        before the run directory existed leaves these lines in run.log too."""
        for node, client in sorted(self.client_of.items(), key=lambda kv: kv[1]):
            log.info("SuperNode %d holds client %d%s", node, client, self._declared(client))
        for node, why in self.ignored.items():
            log.warning("SuperNode %d holds no client: %s", node, why)

    def missing_reason(self, client: int) -> str:
        """Why no node holds ``client``: its node was refused (the reason), or none claimed it."""
        return self.refused.get(client, f"no SuperNode holds partition {client}")


def directory_for(grid, cfg: Config) -> NodeDirectory:
    """The node directory of a run on ``grid``."""
    return NodeDirectory(
        grid,
        cfg.clients.num,
        hello_timeout=min(HELLO_TIMEOUT, cfg.flower.round_timeout, cfg.flower.node_wait),
        rank_cap=cfg.clients.rank_cap(),
    )


def site_declared_config(grid, cfg: Config) -> tuple[Config, NodeDirectory]:
    """engine flower: greet the SuperNodes (up to ``flower.node_wait`` for all ``clients.num``) before the run
    starts and make the ranks they declare (node-config ``rank``) the run's ``clients.ranks`` - so segment
    boundaries come from the ranks present; a client whose node declares none keeps its configured rank.
    Returns the config the run then uses (config.yaml records it) and the directory, which refuses a node that
    joins later with another rank."""
    nodes = directory_for(grid, cfg)
    nodes.refresh(range(cfg.clients.num), wait=cfg.flower.node_wait)
    declared = nodes.declared_rank
    ranks = [declared.get(k, cfg.clients.rank_of(k)) for k in range(cfg.clients.num)]
    nodes.fixed_ranks = ranks
    if not declared:
        return cfg, nodes
    data = cfg.to_dict()
    data["clients"]["ranks"] = ranks
    for site, rank in zip(data["clients"].get("sites") or [], ranks):
        site["rank"] = rank
    log.info(
        "site-declared ranks: clients %s declared %s; the run's client ranks are %s",
        sorted(declared),
        [declared[k] for k in sorted(declared)],
        ranks,
    )
    return from_dict(data), nodes


class GridEngine:
    """Runs a round's tasks on Flower SuperNodes (see the module docstring). ``nodes``: a directory already
    greeted (:func:`site_declared_config`); else one is made."""

    def __init__(self, grid, cfg: Config, config_json: str, nodes: NodeDirectory | None = None):
        self.grid = grid
        self.cfg = cfg
        self.config_json = config_json
        self.nodes = nodes if nodes is not None else directory_for(grid, cfg)
        self.round_seconds: list[float] = []

    def quantization_of(self, client: int) -> str | None:
        """How ``client`` holds its base model (its node's declaration, else the config's), for the records."""
        return self.nodes.quantization_of(client, self.cfg)

    def execute(self, tasks: Sequence[ClientTask]) -> list[EngineResult]:
        from flwr.app import Message, MessageType

        if not tasks:
            return []
        timeout = self.cfg.flower.round_timeout
        self.nodes.refresh((t.client for t in tasks), wait=self.cfg.flower.node_wait)
        results: dict[int, EngineResult] = {}
        messages, sent = [], {}
        for task in tasks:
            node = self.nodes.node_of(task.client)
            if node is None:
                results[task.client] = ClientFailed(task.client, self.nodes.missing_reason(task.client))
                continue
            content = records.encode_task(
                task.round, task.client, task.rank, task.seed, task.plan, task.broadcast, self.config_json
            )
            messages.append(
                Message(
                    content, dst_node_id=node, message_type=MessageType.TRAIN, group_id=str(task.round), ttl=timeout
                )
            )
            sent[node] = task
        t0 = time.perf_counter()
        replies = list(self.grid.send_and_receive(messages, timeout=timeout)) if messages else []
        self.round_seconds.append(time.perf_counter() - t0)
        for reply in replies:
            node = reply.metadata.src_node_id
            task = sent.pop(node, None)
            if task is None:
                log.warning("ignoring an unexpected reply from SuperNode %d", node)
                continue
            results[task.client] = self._result(node, task, reply)
        for node, task in sent.items():
            results[task.client] = ClientFailed(
                task.client, f"SuperNode {node} sent no reply within {timeout:g} s (flower.round_timeout)"
            )
        return [results[t.client] for t in tasks]

    @staticmethod
    def _result(node: int, task: ClientTask, reply) -> EngineResult:
        """The reply as a :class:`RawUpdate`, undecoded: the round loop decodes it (:func:`prelort.protocol.decode_raw`)
        after checking its tensor names and their number against the federation's layout. Only the metadata is
        read here, for the client the node's update declares."""
        if reply.has_error():
            return ClientFailed(
                task.client, f"SuperNode {node} replied with error {reply.error.code}: {reply.error.reason}"
            )
        try:
            payload, meta = records.reply_parts(reply.content)
            declared = parse_metadata(meta)["client"]
        except UpdateRejected as e:
            e.client = task.client  # type: ignore[attr-defined]  # Federation logs who sent it
            return e
        if declared != task.client:
            return ClientFailed(
                task.client,
                f"SuperNode {node} holds client {task.client} but its update declares client {declared}",
            )
        return RawUpdate(task.client, payload, meta)

    def evaluate(self, tasks: Sequence[EvalTask]) -> list[EvalSums | Exception | None]:
        """On-site evaluation: one EVALUATE message to each node that keeps held-out records (its node-config
        ``eval-path``, or with ``clients.sites`` the site's ``eval_path``); None for the others."""
        from flwr.app import Message, MessageType

        sites = self.cfg.clients.sites or []
        results: dict[int, EvalSums | Exception | None] = {t.client: None for t in tasks}
        messages, sent = [], {}
        for task in tasks:
            node = self.nodes.node_of(task.client)
            keeps = task.client in self.nodes.has_eval or (task.client < len(sites) and sites[task.client].eval_path)
            if node is None or not keeps:
                continue
            content = records.encode_eval_task(task.round, task.client, task.rank, task.broadcast, self.config_json)
            messages.append(
                Message(
                    content,
                    dst_node_id=node,
                    message_type=MessageType.EVALUATE,
                    group_id=str(task.round),
                    ttl=self.cfg.flower.round_timeout,
                )
            )
            sent[node] = task
        replies = list(self.grid.send_and_receive(messages, timeout=self.cfg.flower.round_timeout)) if messages else []
        for reply in replies:
            task = sent.pop(reply.metadata.src_node_id, None)
            if task is None:
                continue
            if reply.has_error():
                results[task.client] = ClientFailed(task.client, f"evaluation failed: {reply.error.reason}")
                continue
            try:
                results[task.client] = records.decode_eval_reply(reply.content)
            except ValueError as e:
                results[task.client] = e
        for node, task in sent.items():
            results[task.client] = ClientFailed(task.client, f"SuperNode {node} sent no evaluation in time")
        return [results[t.client] for t in tasks]
