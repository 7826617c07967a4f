"""One SecAgg+ aggregation of given updates in Flower's simulation runtime, for tests/flower/test_flower_secagg.py
(a test helper: it moved here from prelort.flower, where nothing else used it).

The encoding, decoding and finish of the two padded sums are Flower-free and live in
:mod:`prelort.secure_sums` (with the quantisation analysis); this module adds only the Flower apps that carry
them: :func:`secagg_aggregate_simulation` runs one ``SecAggPlusWorkflow`` (Flower 1.42's legacy API:
``DefaultWorkflow`` with a ``LegacyContext`` on the server, ``secaggplus_mod`` around a ``NumPyClient`` on the
client) over one SuperNode per update and finishes the round with :func:`prelort.secure_sums.finish_secagg`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from prelort.methods import ClientUpdate, GlobalState, Method
from prelort.secure_sums import (
    SECAGG_CLIPPING_RANGE,
    SECAGG_QUANTIZATION_RANGE,
    WEIGHT_UNITS,
    PrivacyError,
    SecAggLayout,
    aggregation_rule,
    encode_for_secagg,
    finish_secagg,
    quantisation_bound,
    weight_units,
)


# -- one SecAgg+ aggregation in Flower's simulation runtime ------------------------------------------------
class _Payload:
    """Per partition: what that client uploads (its encoded arrays, weight and clear metadata)."""

    def __init__(self, arrays: list[np.ndarray], weight_units: int, client: int, meta_json: str):
        self.arrays, self.weight_units, self.client, self.meta_json = arrays, weight_units, client, meta_json


def _client_app(payloads: list[_Payload]):
    from flwr.client import ClientApp, NumPyClient
    from flwr.client.mod import secaggplus_mod

    class SecAggClient(NumPyClient):
        def __init__(self, payload: _Payload):
            self.payload = payload

        def fit(self, parameters, config):
            p = self.payload
            return p.arrays, p.weight_units, {"client": p.client, "meta": p.meta_json}

    def client_fn(context):
        return SecAggClient(payloads[int(context.node_config["partition-id"])]).to_client()

    return ClientApp(client_fn=client_fn, mods=[secaggplus_mod])


def _server_app(
    layout: SecAggLayout,
    num_clients: int,
    result: dict[str, Any],
    *,
    max_weight: float,
    clipping_range: float,
    quantization_range: int,
    timeout: float | None,
):
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server import LegacyContext, ServerApp, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

    class CaptureSums(FedAvg):
        """Keeps what SecAgg+ hands over (the weighted mean of the uploads) and the clients' clear metadata."""

        def aggregate_fit(self, server_round, results, failures):
            if results:
                result["arrays"] = parameters_to_ndarrays(results[0][1].parameters)
                result["meta"] = [(int(r.metrics["client"]), json.loads(str(r.metrics["meta"]))) for _, r in results]
                result["weights"] = [float(r.num_examples) for _, r in results]
            result["failures"] = [repr(f) for f in failures]
            return (results[0][1].parameters if results else None), {}

    # The template the legacy workflow broadcasts: tiny (one float per array) - clients ignore it.
    template = ndarrays_to_parameters([np.zeros(1, dtype=np.float32)])
    strategy = CaptureSums(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=num_clients,
        min_available_clients=num_clients,
        min_evaluate_clients=0,
        initial_parameters=template,
    )
    app = ServerApp()

    @app.main()
    def main(grid, context) -> None:
        legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=1), strategy=strategy)
        workflow = DefaultWorkflow(
            fit_workflow=SecAggPlusWorkflow(
                num_shares=1.0,
                reconstruction_threshold=0.67,
                max_weight=max_weight,
                clipping_range=clipping_range,
                quantization_range=quantization_range,
                timeout=timeout,
            )
        )
        workflow(grid, legacy)

    return app


def secagg_aggregate_simulation(
    method: Method,
    state: GlobalState,
    updates: Sequence[ClientUpdate],
    *,
    max_weight: float,
    clipping_range: float = SECAGG_CLIPPING_RANGE,
    quantization_range: int = SECAGG_QUANTIZATION_RANGE,
    uniform_weight: bool = False,
    timeout: float | None = 300.0,
) -> tuple[GlobalState, dict[str, Any]]:
    """Aggregate ``updates`` under SecAgg+ in Flower's simulation runtime (one SuperNode per update).

    ``max_weight`` (W): a public bound on every client's weight w_k (e.g. the federation's number of training
    examples); SecAgg+ quantises w_k / W. Returns the new state and ``{"arrays": the workflow's output (N', D'),
    "rho_total": sum_k rho_k, "bound": the per-entry quantisation bound, "seconds": wall time}``.
    """
    import time

    from flwr.simulation import run_simulation

    aggregation_rule(method)
    if len(updates) < 3:
        raise PrivacyError(f"SecAgg+ needs at least 3 clients to hide one update, got {len(updates)}")
    layout = SecAggLayout.of(state)
    payloads = []
    for update in updates:
        arrays, weight = encode_for_secagg(
            method, update, layout, clipping_range=clipping_range, uniform_weight=uniform_weight
        )
        if weight > max_weight:
            raise PrivacyError(f"client {update.client}: weight {weight:g} exceeds max_weight {max_weight:g}")
        payloads.append(_Payload(arrays, weight_units(weight, max_weight), update.client, json.dumps(update.meta)))
    result: dict[str, Any] = {}
    server = _server_app(
        layout,
        len(updates),
        result,
        max_weight=WEIGHT_UNITS,
        clipping_range=clipping_range,
        quantization_range=quantization_range,
        timeout=timeout,
    )
    t0 = time.perf_counter()
    run_simulation(
        server_app=server,
        client_app=_client_app(payloads),
        num_supernodes=len(updates),
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    seconds = time.perf_counter() - t0
    if "arrays" not in result:
        raise RuntimeError(f"SecAgg+ produced no aggregate (failures: {result.get('failures')})")
    meta = [(c, m) for c, m in result["meta"]]
    new = finish_secagg(method, state, result["arrays"], layout, meta)
    rho = sum(round(n / WEIGHT_UNITS * quantization_range) / quantization_range for n in result["weights"])
    info = {
        "arrays": result["arrays"],
        "rho_total": rho,
        "seconds": seconds,
        "clients": len(result["weights"]),
        "bound": quantisation_bound(len(result["weights"]), rho, clipping_range, quantization_range),
    }
    return new, info


__all__ = ["secagg_aggregate_simulation"]
