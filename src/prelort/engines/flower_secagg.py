"""The Flower engine under secure aggregation (``engine: flower-sim`` / ``flower`` with
``privacy.secure_aggregation``): a round's tasks run through Flower's SecAgg+.

Flower 1.42 has SecAgg+ only in its legacy API, so :meth:`SecAggGridEngine.execute` runs, per prelort round,
one ``DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))`` with ``ServerConfig(num_rounds=1)`` on the
ServerApp's own grid. Its legacy strategy (:class:`TaskStrategy`) does no sampling and no aggregation of
its own:

* ``configure_fit`` gives each node that holds a sampled client ITS OWN ``FitIns`` - the client's task
  (broadcast prefix, TrainPlan, seed; :func:`prelort.flower.records.encode_secagg_task`) plus the public
  upload layout, the weight bound W and SecAgg+'s clipping range;
* ``aggregate_fit`` receives SecAgg+'s weighted mean of the uploads (the same arrays in every FitRes) and
  each client's clear metrics (its id, training loss and the method's ``clear_meta_fields``), and keeps them.

The client side (:mod:`prelort.apps.clientapp`, behind ``secaggplus_mod``) trains with the usual
:func:`~prelort.apps.clientapp.run_task`, validates and clips its own update, and uploads
:func:`prelort.secure_sums.encode_for_secagg`. ``execute`` returns a
:class:`~prelort.protocol.SecureAggregate`, which :meth:`prelort.federation.Federation.end_round_secure`
finishes with :func:`prelort.secure_sums.finish_secagg`.

Which node is which client comes from the :class:`~prelort.engines.flower.NodeDirectory` (the node's own
``partition-id``), never from what a client claims in its metrics.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..config import Config
from ..flower import records
from ..protocol import ClientTask, SecureAggregate
from ..secure_sums import SECAGG_CLIPPING_RANGE, SECAGG_QUANTIZATION_RANGE, WEIGHT_UNITS, SecAggLayout
from .flower import GridEngine, NodeDirectory

log = logging.getLogger("prelort")

# SecAgg+'s secret sharing: every sampled client shares its keys with all others (num_shares = 1.0 of them),
# and 2/3 of the shares rebuild a key, so a round survives up to a third of its clients dropping out.
NUM_SHARES = 1.0
RECONSTRUCTION_THRESHOLD = 0.67
_CLIENT_IN_REASON = re.compile(r"client (\d+)\b")


def _make_strategy(fitins_by_node: dict[int, Any], captured: dict[str, Any]):
    """A legacy ``Strategy`` that sends each node its own FitIns and keeps what SecAgg+ hands over."""
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server.strategy import Strategy

    class TaskStrategy(Strategy):
        def initialize_parameters(self, client_manager):
            # what the workflow would broadcast to all: unused (each node gets its own task), so one float
            return ndarrays_to_parameters([np.zeros(1, dtype=np.float32)])

        def configure_fit(self, server_round, parameters, client_manager):
            proxies = client_manager.all()
            out = []
            for node, fitins in fitins_by_node.items():
                proxy = proxies.get(str(node))
                if proxy is None:
                    captured.setdefault("unreachable", []).append(node)
                    continue
                out.append((proxy, fitins))
            return out

        def aggregate_fit(self, server_round, results, failures):
            captured["arrays"] = parameters_to_ndarrays(results[0][1].parameters) if results else None
            captured["results"] = [
                (int(proxy.node_id), int(res.num_examples), dict(res.metrics)) for proxy, res in results
            ]
            captured["failures"] = [_failure_text(f) for f in failures]
            return None, {}  # prelort keeps the state; nothing for the workflow to store

        def configure_evaluate(self, server_round, parameters, client_manager):
            return []

        def aggregate_evaluate(self, server_round, results, failures):
            return None, {}

        def evaluate(self, server_round, parameters):
            return None

    return TaskStrategy()


def _failure_text(failure: Any) -> str:
    """The gist of a failed node's error: Flower's reason is the exception's text, in simulation wrapped
    in a Ray traceback whose last line is ``Exception ClientAppException occurred. Message: <text>'>``."""
    err = failure.args[0] if isinstance(failure, BaseException) and failure.args else failure
    reason = getattr(err, "reason", None)
    text = str(reason) if reason is not None else str(err)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    last = lines[-1] if lines else text
    gist = re.sub(r"^Exception \w+ occurred\. Message: ", "", last)
    return gist.removesuffix("'>") if gist != last else last


class SecAggGridEngine(GridEngine):
    """Runs each round's tasks on Flower SuperNodes through SecAgg+ (see the module docstring).

    ``layout_of()``: the public upload layout of the current global state; ``max_weight``: W, the public
    bound on every client's weight (:func:`prelort.secure_sums.max_weight_bound`); ``context``: the
    ServerApp's Context (the legacy workflow wraps it in a ``LegacyContext``).
    """

    def __init__(
        self,
        grid,
        cfg: Config,
        config_json: str,
        context,
        layout_of: Callable[[], SecAggLayout],
        max_weight: float,
        *,
        clipping_range: float = SECAGG_CLIPPING_RANGE,
        quantization_range: int = SECAGG_QUANTIZATION_RANGE,
        nodes: NodeDirectory | None = None,
    ):
        super().__init__(grid, cfg, config_json, nodes)
        self.context = context
        self.layout_of = layout_of
        self.max_weight = float(max_weight)
        self.clipping_range = float(clipping_range)
        self.quantization_range = int(quantization_range)

    def execute(self, tasks: Sequence[ClientTask]) -> SecureAggregate:  # type: ignore[override]
        from flwr.common import FitIns, ndarrays_to_parameters

        agg = SecureAggregate(None, clipping_range=self.clipping_range, quantization_range=self.quantization_range)
        if not tasks:
            return agg
        self.nodes.refresh((t.client for t in tasks), wait=self.cfg.flower.node_wait)
        layout_json = self.layout_of().to_json()
        fitins_by_node: dict[int, Any] = {}
        task_of_node: dict[int, ClientTask] = {}
        for task in tasks:
            node = self.nodes.node_of(task.client)
            if node is None:
                agg.failed[task.client] = self.nodes.missing_reason(task.client)
                continue
            arrays, config = records.encode_secagg_task(
                task.round,
                task.client,
                task.rank,
                task.seed,
                task.plan,
                task.broadcast,
                self.config_json,
                layout_json,
                self.max_weight,
                self.clipping_range,
            )
            fitins_by_node[node] = FitIns(ndarrays_to_parameters(arrays), config)
            task_of_node[node] = task
        if len(fitins_by_node) < 3:
            for task in task_of_node.values():
                agg.failed[task.client] = (
                    f"SecAgg+ not started: only {len(fitins_by_node)} sampled client(s) have a "
                    "SuperNode, at least 3 are needed to hide one update"
                )
            return agg
        captured: dict[str, Any] = {}
        t0 = time.perf_counter()
        try:
            self._run_workflow(fitins_by_node, captured)
        except Exception as e:  # a protocol error fails this round (retried), not the run
            log.exception("round %d: SecAgg+ workflow raised", tasks[0].round)
            captured = {"error": f"{type(e).__name__}: {e}"}
        self.round_seconds.append(time.perf_counter() - t0)
        return self._collect(agg, captured, task_of_node)

    def _run_workflow(self, fitins_by_node: dict[int, Any], captured: dict[str, Any]) -> None:
        from flwr.server import LegacyContext, ServerConfig
        from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

        legacy = LegacyContext(
            context=self.context, config=ServerConfig(num_rounds=1), strategy=_make_strategy(fitins_by_node, captured)
        )
        # Clients report n_k = round(w_k / W * WEIGHT_UNITS) (<= WEIGHT_UNITS) as num_examples, so the
        # workflow's max_weight is WEIGHT_UNITS and rho_k = n_k / WEIGHT_UNITS exactly (see secagg.py).
        workflow = DefaultWorkflow(
            fit_workflow=SecAggPlusWorkflow(
                num_shares=NUM_SHARES,
                reconstruction_threshold=RECONSTRUCTION_THRESHOLD,
                max_weight=WEIGHT_UNITS,
                clipping_range=self.clipping_range,
                quantization_range=self.quantization_range,
                timeout=self.cfg.flower.round_timeout,
            )
        )
        workflow(self.grid, legacy)

    def _collect(
        self, agg: SecureAggregate, captured: dict[str, Any], task_of_node: dict[int, ClientTask]
    ) -> SecureAggregate:
        """Map SecAgg+'s results back to prelort clients; every sampled client not in the sum is failed."""
        in_sum: set[int] = set()
        if captured.get("arrays") is not None:
            agg.arrays = list(captured["arrays"])
            for node, units, metrics in captured["results"]:
                task = task_of_node.get(node)
                if task is None:  # cannot happen: the workflow only sends to the nodes we configured
                    log.warning("SecAgg+ result from unexpected SuperNode %d", node)
                    continue
                claimed = metrics.get("client")
                if claimed != task.client:
                    log.warning(
                        "SuperNode %d holds client %d but its SecAgg+ metrics claim client %r",
                        node,
                        task.client,
                        claimed,
                    )
                try:
                    meta = json.loads(str(metrics.get("meta", "{}")))
                except ValueError:
                    meta = {}
                agg.clients.append((task.client, meta if isinstance(meta, dict) else {}))
                agg.weight_units.append(units)
                in_sum.add(task.client)
        failures = list(captured.get("failures", []))
        if "error" in captured:
            failures.append(f"the SecAgg+ workflow raised {captured['error']}")
        elif captured.get("arrays") is None:
            failures.append("SecAgg+ halted before unmasking (too few clients left to rebuild the masks)")
        by_client: dict[int, list[str]] = {}
        unattributed = []
        sampled = {t.client for t in task_of_node.values()}
        for text in failures:
            m = _CLIENT_IN_REASON.search(text)
            if m and int(m.group(1)) in sampled:
                by_client.setdefault(int(m.group(1)), []).append(text)
            else:
                unattributed.append(text)
        for node, task in task_of_node.items():
            if task.client in in_sum:
                continue
            timed_out = (
                f"SuperNode {node} dropped out of SecAgg+ (no reply within flower.round_timeout="
                f"{self.cfg.flower.round_timeout:g} s)"
            )
            reasons = by_client.get(task.client) or unattributed or [timed_out]
            agg.failed[task.client] = "; ".join(dict.fromkeys(reasons))  # the workflow lists a failure twice
        return agg


__all__ = ["SecAggGridEngine"]
