"""Secure aggregation (Flower SecAgg+) of prelort's two plain sums.

PreLort's segment-wise rule, zero-padding and FedIT (and HetLoRA, whose norm weight a client computes
itself) need only, per global tensor, the numerator and denominator sums (docs/design.md section 2)

    N = sum_k w_k pad(X_k, R)        D = sum_k w_k pad(1_{r_k}, R)

so each client uploads fixed-shape arrays - every factor zero-padded to the global shape, plus its
padded weight mask 1_{r_k} (length R) - and SecAgg+ reveals only their weighted sums to the server.

Flower 1.42 has SecAgg+ only in its legacy API: ``SecAggPlusWorkflow`` inside a ``DefaultWorkflow`` with a
``LegacyContext`` on the server, ``secaggplus_mod`` around a ``NumPyClient`` on the client. The workflow
gives the strategy the weighted MEAN of what the clients sent, with weights rho_k = n_k / 2**16 where
n_k = round(w_k / W * 2**16) is the integer weight the client reports (W = ``max_weight``, a public bound
on the weights; :func:`weight_units`):

    N' = sum_k rho_k pad(X_k) / sum_k rho_k,     D' = sum_k rho_k 1_{r_k} / sum_k rho_k

Both rules are invariant to a common factor of N and D (segment: N_i / D_i; padded: N / D_0), so
:func:`prelort.privacy.finish_from_sums` finishes the round from (N', D') directly.

Quantisation error (what the test asserts). Each client sends stochastic-rounded integers of
rho_k x in [-c, c] (c = ``clipping_range``) with step delta = 2c / Q, so each of its entries is off by
less than delta, and after the division the recovered N', D' are off by less than K delta / sum_k rho_k
per entry (K = the clients aggregated). With the defaults c = 8, Q = 2**22 that is K * 3.8e-6 / sum rho.
Values beyond [-c, c] would be clipped silently by SecAgg+, so :func:`encode_for_secagg` refuses them.

Module contents: the client-side encoding (:func:`encode_for_secagg`), the server-side decoding
(:func:`decode_secagg_mean`, :func:`finish_secagg`), and :func:`secagg_aggregate_simulation`, which runs
one SecAgg+ aggregation of given updates in Flower's simulation runtime (tests, benchmarks).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..methods import ClientUpdate, GlobalState, Method
from ..privacy import (
    SECAGG_CLIPPING_RANGE,
    SECAGG_QUANTIZATION_RANGE,
    PrivacyError,
    aggregation_rule,
    client_weight,
    factor_sums,
    finish_from_sums,
)

DEFAULT_CLIPPING_RANGE = SECAGG_CLIPPING_RANGE
DEFAULT_QUANTIZATION_RANGE = SECAGG_QUANTIZATION_RANGE
DEFAULT_MODULUS_RANGE = 2**32
# SecAgg+ carries a client's weight as an integer ``num_examples`` and quantises num_examples / max_weight
# with Q: clients send n_k = round(w_k / W * WEIGHT_UNITS) and the workflow's max_weight is WEIGHT_UNITS.
# Q / WEIGHT_UNITS = 64 is an integer, so SecAgg+ adds no second rounding: rho_k = n_k / WEIGHT_UNITS exactly.
WEIGHT_UNITS = 2**16


@dataclass(frozen=True)
class SecAggLayout:
    """The fixed order and shapes of the arrays every client uploads: the global tensors (sorted by name),
    then the weight mask of length R. Public: the server sends it to every client."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    rank: int

    @classmethod
    def of(cls, state: GlobalState) -> "SecAggLayout":
        names = tuple(sorted(state.tensors))
        shapes = tuple(tuple(int(n) for n in state.tensors[k].shape) for k in names)
        a = next((state.tensors[k] for k in names if k.endswith(".lora_A")), None)
        if a is None:
            raise PrivacyError("secure aggregation needs a global state of LoRA factors (lora_A / lora_B)")
        return cls(names, shapes, int(a.shape[0]))

    def to_json(self) -> str:
        return json.dumps({"names": list(self.names), "shapes": [list(s) for s in self.shapes], "rank": self.rank})

    @classmethod
    def from_json(cls, text: str) -> "SecAggLayout":
        d = json.loads(text)
        return cls(tuple(d["names"]), tuple(tuple(int(n) for n in s) for s in d["shapes"]), int(d["rank"]))

    def num_values(self) -> int:
        return sum(int(np.prod(s)) for s in self.shapes) + self.rank


def encode_for_secagg(method: Method, update: ClientUpdate, layout: SecAggLayout, *,
                      clipping_range: float = DEFAULT_CLIPPING_RANGE, uniform_weight: bool = False
                      ) -> tuple[list[np.ndarray], float]:
    """What client k uploads through SecAgg+: ``([pad(X_k) per layout name..., 1_{r_k}], w_k)``.

    ``w_k`` is the method's weight (number of examples; HetLoRA: ||B_k A_k||_F), or 1 with
    ``uniform_weight`` (client-level DP). A value outside [-clipping_range, clipping_range] raises
    :class:`PrivacyError` (SecAgg+ would clip it silently).
    """
    sums = factor_sums(method, dict(zip(layout.names, layout.shapes)), [update], [1.0])
    arrays = [sums[name].num.to(torch.float32).numpy() for name in layout.names]
    mask = sums[layout.names[0]].den.to(torch.float32).numpy()
    for name, arr in zip(layout.names, arrays):
        peak = float(np.abs(arr).max()) if arr.size else 0.0
        if not peak <= clipping_range:
            raise PrivacyError(f"client {update.client}: {name} holds a value of magnitude {peak:.4g} outside "
                               f"SecAgg+'s clipping range +-{clipping_range:g}; raise the clipping range")
    weight = 1.0 if uniform_weight else client_weight(method, update)
    return [*arrays, mask], weight


def decode_secagg_mean(arrays: Sequence[np.ndarray], layout: SecAggLayout
                       ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(N', D') per global tensor from the workflow's aggregated arrays (same order as uploaded)."""
    if len(arrays) != len(layout.names) + 1:
        raise ValueError(f"SecAgg+ returned {len(arrays)} arrays, the layout has {len(layout.names) + 1}")
    num = {}
    for name, shape, arr in zip(layout.names, layout.shapes, arrays):
        if tuple(arr.shape) != shape:
            raise ValueError(f"SecAgg+ sum of {name} has shape {tuple(arr.shape)}, expected {shape}")
        num[name] = torch.from_numpy(np.asarray(arr, dtype=np.float64).copy())
    den_arr = np.asarray(arrays[-1], dtype=np.float64)
    if den_arr.shape != (layout.rank,):
        raise ValueError(f"SecAgg+ weight mask sum has shape {den_arr.shape}, expected ({layout.rank},)")
    den = torch.from_numpy(den_arr.copy())
    return num, {name: den for name in layout.names}


def finish_secagg(method: Method, state: GlobalState, arrays: Sequence[np.ndarray], layout: SecAggLayout,
                  client_meta: Sequence[tuple[int, dict[str, Any]]] = ()) -> GlobalState:
    """The new global state from SecAgg+'s output. ``client_meta``: (client, meta) sent in the clear (HetLoRA's
    ``pruned_to``: a rank is public anyway), for the method's bookkeeping."""
    rule = aggregation_rule(method)
    num, den = decode_secagg_mean(arrays, layout)
    out = GlobalState(tensors=finish_from_sums(rule, state, num, den), meta=dict(state.meta))
    after = getattr(method, "_after", None)
    if after is not None:
        after(out, list(client_meta))
    return out


def weight_units(weight: float, max_weight: float) -> int:
    """The integer SecAgg+ weight of a client: n_k = round(w_k / W * WEIGHT_UNITS), at least 1 for w_k > 0.

    rho_k = n_k / WEIGHT_UNITS is the weight SecAgg+ applies; it differs from w_k / W by at most
    1 / (2 WEIGHT_UNITS) (exact when w_k / W is a multiple of 2**-16)."""
    if not 0 <= weight <= max_weight:
        raise PrivacyError(f"weight {weight:g} outside [0, max_weight={max_weight:g}]")
    n = round(weight / max_weight * WEIGHT_UNITS)
    return max(n, 1) if weight > 0 else 0


def weighs_by_norm(method: Method) -> bool:
    """Whether ``method`` weighs a client by its update's norm (HetLoRA) rather than its number of examples."""
    from ..methods.hetlora import HetLoRA

    return isinstance(method, HetLoRA)


def max_weight_bound(method: Method, total_examples: int, max_update_norm: float | None = None) -> float:
    """W, the public bound on every client's weight w_k that SecAgg+ divides by (:func:`weight_units`).

    * Data-size weights (prelort, fedit, zeropad): w_k = n_k <= the federation's number of training
      examples, so W = ``total_examples`` (a client can hold at most all of them).
    * HetLoRA's norm weight: w_k = sqrt(sum_m ||B_m A_m||_F^2) <= sum_m ||B_m||_F ||A_m||_F
      <= sum_m (||A_m||_F^2 + ||B_m||_F^2) / 2 = ||update||^2 / 2 <= ``max_update_norm``^2 / 2, which the
      client enforces on its own update (``validation.max_update_norm``) before it encodes it.

    A tighter W keeps more precision in n_k = round(w_k / W * 2**16). A client whose weight exceeds W
    refuses to upload (``weight_units`` raises).
    """
    if weighs_by_norm(method):
        if max_update_norm is None:
            raise PrivacyError(f"method {method.name!r} weighs clients by a norm: secure aggregation needs "
                               "validation.max_update_norm to bound it (||B A||_F <= max_update_norm**2 / 2)")
        return float(max_update_norm) ** 2 / 2.0
    if total_examples <= 0:
        raise PrivacyError(f"total_examples must be positive, got {total_examples}")
    return float(total_examples)


def quantisation_bound(num_clients: int, rho_total: float, clipping_range: float = DEFAULT_CLIPPING_RANGE,
                       quantization_range: int = DEFAULT_QUANTIZATION_RANGE) -> float:
    """Per-entry bound on |recovered N' - exact N'| (module docstring): K * (2c / Q) / sum_k rho_k."""
    return num_clients * (2.0 * clipping_range / quantization_range) / rho_total


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


def _server_app(layout: SecAggLayout, num_clients: int, result: dict[str, Any], *, max_weight: float,
                clipping_range: float, quantization_range: int, timeout: float | None):
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
    strategy = CaptureSums(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=num_clients,
                           min_available_clients=num_clients, min_evaluate_clients=0, initial_parameters=template)
    app = ServerApp()

    @app.main()
    def main(grid, context) -> None:
        legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=1), strategy=strategy)
        workflow = DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(
            num_shares=1.0, reconstruction_threshold=0.67, max_weight=max_weight, clipping_range=clipping_range,
            quantization_range=quantization_range, timeout=timeout))
        workflow(grid, legacy)

    return app


def secagg_aggregate_simulation(method: Method, state: GlobalState, updates: Sequence[ClientUpdate], *,
                                max_weight: float, clipping_range: float = DEFAULT_CLIPPING_RANGE,
                                quantization_range: int = DEFAULT_QUANTIZATION_RANGE, uniform_weight: bool = False,
                                timeout: float | None = 300.0) -> tuple[GlobalState, dict[str, Any]]:
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
        arrays, weight = encode_for_secagg(method, update, layout, clipping_range=clipping_range,
                                           uniform_weight=uniform_weight)
        if weight > max_weight:
            raise PrivacyError(f"client {update.client}: weight {weight:g} exceeds max_weight {max_weight:g}")
        payloads.append(_Payload(arrays, weight_units(weight, max_weight), update.client, json.dumps(update.meta)))
    result: dict[str, Any] = {}
    server = _server_app(layout, len(updates), result, max_weight=WEIGHT_UNITS, clipping_range=clipping_range,
                         quantization_range=quantization_range, timeout=timeout)
    t0 = time.perf_counter()
    run_simulation(server_app=server, client_app=_client_app(payloads), num_supernodes=len(updates),
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    seconds = time.perf_counter() - t0
    if "arrays" not in result:
        raise RuntimeError(f"SecAgg+ produced no aggregate (failures: {result.get('failures')})")
    meta = [(c, m) for c, m in result["meta"]]
    new = finish_secagg(method, state, result["arrays"], layout, meta)
    rho = sum(round(n / WEIGHT_UNITS * quantization_range) / quantization_range for n in result["weights"])
    info = {"arrays": result["arrays"], "rho_total": rho, "seconds": seconds, "clients": len(result["weights"]),
            "bound": quantisation_bound(len(result["weights"]), rho, clipping_range, quantization_range)}
    return new, info


__all__ = ["SecAggLayout", "decode_secagg_mean", "encode_for_secagg", "finish_secagg", "max_weight_bound",
           "quantisation_bound", "secagg_aggregate_simulation", "weight_units"]
