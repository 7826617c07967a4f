"""The two padded sums of a round, their SecAgg+ encoding and how a round finishes from them.

Engine-independent and Flower-free: the round loop (:mod:`prelort.federation`), client-level DP
(:mod:`prelort.privacy`) and the Flower apps (:mod:`prelort.apps`) all import it; it imports only the
methods and the rank geometry below it.

A sum-aggregatable method (``Method.sum_aggregatable``: it declares a ``sum_rule``) needs, per global tensor,
only the numerator and denominator sums (docs/design.md section 2)

    N = sum_k w_k pad(X_k, R)        D = sum_k w_k pad(1_{r_k}, R)

with w_k the method's client weight (:func:`client_weight`: number of examples, or a norm of the update, which a
client computes itself) over the factors it contributes (``contributed_factors``: e.g. without a pruned tail); the method's
``finish_sums`` turns them into the new state (segment: N_i / D_i; padded: N / D_0).

Under secure aggregation each client uploads fixed-shape arrays - every factor zero-padded to the global shape,
plus its padded weight mask 1_{r_k} (length R) - and SecAgg+ reveals only their weighted sums to the server.
Flower 1.42 has SecAgg+ only in its legacy API (``SecAggPlusWorkflow`` on the server, ``secaggplus_mod``
around a ``NumPyClient`` on the client; :mod:`prelort.engines.flower_secagg`). The workflow gives the strategy
the weighted MEAN of what the clients sent, with weights rho_k = n_k / 2**16 where n_k = round(w_k / W * 2**16)
is the integer weight the client reports (W = ``max_weight``, a public bound on the weights;
:func:`weight_units`, :func:`max_weight_bound`):

    N' = sum_k rho_k pad(X_k) / sum_k rho_k,     D' = sum_k rho_k 1_{r_k} / sum_k rho_k

Both rules are invariant to a common factor of N and D, so :func:`finish_secagg` finishes the round from
(N', D') directly.

Quantisation error. Each client sends stochastic-rounded integers of rho_k x in [-c, c] (c = the clipping
range) with step delta = 2c / Q, so each of its entries is off by less than delta, and after the division the
recovered N', D' are off by less than K delta / sum_k rho_k per entry (K = the clients aggregated;
:func:`quantisation_bound`). With the defaults c = 8, Q = 2**22 that is K * 3.8e-6 / sum rho. Values beyond
[-c, c] would be clipped silently by SecAgg+, so :func:`encode_for_secagg` refuses them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .factor_sums import FactorSums
from .methods import ClientUpdate, GlobalState, Method, SumRule
from .methods.toolkit import fold_updates

# SecAgg+'s clipping range c and quantisation range Q as prelort runs them (Flower's defaults). Defined here,
# with no Flower import, so the engine-independent federation code and prelort.flower share one value.
SECAGG_CLIPPING_RANGE = 8.0
SECAGG_QUANTIZATION_RANGE = 2**22
# SecAgg+ carries a client's weight as an integer ``num_examples`` and quantises num_examples / max_weight
# with Q: clients send n_k = round(w_k / W * WEIGHT_UNITS) and the workflow's max_weight is WEIGHT_UNITS.
# Q / WEIGHT_UNITS = 64 is an integer, so SecAgg+ adds no second rounding: rho_k = n_k / WEIGHT_UNITS exactly.
WEIGHT_UNITS = 2**16


class PrivacyError(ValueError):
    """A privacy setting cannot be honoured for this method or input (the message says why)."""


# -- which methods ------------------------------------------------------------------------------------------
def aggregation_rule(method: Method) -> SumRule:
    """The method's ``sum_rule``: how it turns the two padded sums (N, D) into its new state.

    ``segment``: dimension i = N_i / D_i (prefix-nested segments; one rank for everyone is its special case);
    ``padded``: every dimension = N / D_0 = N / sum_k p_k (zero-padding FedAvg).
    Raises :class:`PrivacyError` for a method whose aggregate is not a function of these sums.
    """
    if method.sum_rule is not None:
        return method.sum_rule
    from . import methods

    able = sorted(name for name, cls in methods.available().items() if cls.sum_aggregatable)
    raise PrivacyError(
        f"method {method.name!r} does not aggregate plain sums of padded LoRA factors "
        f"(sum_aggregatable={method.sum_aggregatable}, dense_state={method.dense_state}): its aggregate needs "
        "each client's own tensors (for example an SVD of a mean of dense products s*B_k A_k, or the stacked "
        f"factors), so neither client-level DP on the sums nor secure aggregation applies; use {', '.join(able)}"
    )


# -- the two sums --------------------------------------------------------------------------------------------
def client_weight(method: Method, update: ClientUpdate) -> float:
    """The client's unnormalised aggregation weight as the method defines it (number of examples,
    or a norm of the update where ``weight_depends_on_update``). A client computes it itself before secure aggregation."""
    return float(method.client_weight(update, method.contributed_factors(update)))


def factor_sums(
    method: Method, shapes: Mapping[str, Sequence[int]], updates: Sequence[ClientUpdate], weights: Sequence[float]
) -> FactorSums:
    """Per global tensor name (``shapes``: name -> the global tensor's shape), the padded sums
    N = sum_k w_k pad(X_k) and D_i = sum_{k: r_k > i} w_k, over the factors each client contributes."""
    if len(updates) != len(weights):
        raise ValueError(f"{len(updates)} updates but {len(weights)} weights")
    return fold_updates(method, shapes, updates, weights)[0]


# -- SecAgg+ encoding and finish ----------------------------------------------------------------------------
@dataclass(frozen=True)
class SecAggLayout:
    """The fixed order and shapes of the arrays every client uploads: the global tensors (sorted by name),
    then the weight mask of length R. Public: the server sends it to every client."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    rank: int

    @classmethod
    def of(cls, state: GlobalState) -> SecAggLayout:
        names = tuple(sorted(state.tensors))
        shapes = tuple(tuple(int(n) for n in state.tensors[k].shape) for k in names)
        a = next((state.tensors[k] for k in names if k.endswith(".lora_A")), None)
        if a is None:
            raise PrivacyError("secure aggregation needs a global state of LoRA factors (lora_A / lora_B)")
        return cls(names, shapes, int(a.shape[0]))

    def to_json(self) -> str:
        return json.dumps({"names": list(self.names), "shapes": [list(s) for s in self.shapes], "rank": self.rank})

    @classmethod
    def from_json(cls, text: str) -> SecAggLayout:
        d = json.loads(text)
        return cls(tuple(d["names"]), tuple(tuple(int(n) for n in s) for s in d["shapes"]), int(d["rank"]))

    def num_values(self) -> int:
        return sum(int(np.prod(s)) for s in self.shapes) + self.rank


def encode_for_secagg(
    method: Method,
    update: ClientUpdate,
    layout: SecAggLayout,
    *,
    clipping_range: float = SECAGG_CLIPPING_RANGE,
    uniform_weight: bool = False,
) -> tuple[list[np.ndarray], float]:
    """What client k uploads through SecAgg+: ``([pad(X_k) per layout name..., 1_{r_k}], w_k)``.

    ``w_k`` is the method's weight (number of examples, or a norm of the update), or 1 with
    ``uniform_weight`` (client-level DP). A value outside [-clipping_range, clipping_range] raises
    :class:`PrivacyError` (SecAgg+ would clip it silently).
    """
    sums = factor_sums(method, dict(zip(layout.names, layout.shapes)), [update], [1.0])
    arrays = [sums[name].num.to(torch.float32).numpy() for name in layout.names]
    mask = sums[layout.names[0]].den.to(torch.float32).numpy()
    for name, arr in zip(layout.names, arrays):
        peak = float(np.abs(arr).max()) if arr.size else 0.0
        if not peak <= clipping_range:
            raise PrivacyError(
                f"client {update.client}: {name} holds a value of magnitude {peak:.4g} outside "
                f"SecAgg+'s clipping range +-{clipping_range:g}; raise the clipping range"
            )
    weight = 1.0 if uniform_weight else client_weight(method, update)
    return [*arrays, mask], weight


def decode_secagg_mean(
    arrays: Sequence[np.ndarray], layout: SecAggLayout
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


def finish_secagg(
    method: Method,
    state: GlobalState,
    arrays: Sequence[np.ndarray],
    layout: SecAggLayout,
    client_meta: Sequence[tuple[int, dict[str, Any]]] = (),
) -> GlobalState:
    """The new global state from SecAgg+'s output. ``client_meta``: (client, meta) sent in the clear (the
    method's ``clear_meta_fields``, e.g. a pruned rank: a rank is public anyway), for the method's bookkeeping."""
    aggregation_rule(method)  # a method without a sum rule fails here, with the reason
    num, den = decode_secagg_mean(arrays, layout)
    out = GlobalState(tensors=method.finish_sums(state, num, den), meta=dict(state.meta))
    method.after_round(out, list(client_meta))
    return out


def weight_units(weight: float, max_weight: float) -> int:
    """The integer SecAgg+ weight of a client: n_k = round(w_k / W * WEIGHT_UNITS), at least 1 for w_k > 0.

    rho_k = n_k / WEIGHT_UNITS is the weight SecAgg+ applies; it differs from w_k / W by at most
    1 / (2 WEIGHT_UNITS) (exact when w_k / W is a multiple of 2**-16)."""
    if not 0 <= weight <= max_weight:
        raise PrivacyError(f"weight {weight:g} outside [0, max_weight={max_weight:g}]")
    n = round(weight / max_weight * WEIGHT_UNITS)
    return max(n, 1) if weight > 0 else 0


def max_weight_bound(method: Method, total_examples: int, max_update_norm: float | None = None) -> float:
    """W, the public bound on every client's weight w_k that SecAgg+ divides by (:func:`weight_units`), from the
    method's ``weight_bound``.

    * Data-size weights (``data_weight``): w_k = n_k <= the federation's number of training
      examples, so W = ``total_examples`` (a client can hold at most all of them).
    * A weight that depends on the update (``weight_depends_on_update``; e.g. a norm ||B_k A_k||_F <=
      ``max_update_norm``^2 / 2) is bounded through ``validation.max_update_norm``, which the client enforces on
      its own update before it encodes it.

    A tighter W keeps more precision in n_k = round(w_k / W * 2**16). A client whose weight exceeds W
    refuses to upload (``weight_units`` raises).
    """
    if not method.weight_depends_on_update and total_examples <= 0:
        raise PrivacyError(f"total_examples must be positive, got {total_examples}")
    bound = method.weight_bound(total_examples, max_update_norm)
    if bound is None:
        raise PrivacyError(
            f"method {method.name!r} weighs a client by its update: secure aggregation needs "
            "validation.max_update_norm to bound the weight (the method's weight_bound derives the "
            "public bound from it)"
        )
    return float(bound)


def quantisation_bound(
    num_clients: int,
    rho_total: float,
    clipping_range: float = SECAGG_CLIPPING_RANGE,
    quantization_range: int = SECAGG_QUANTIZATION_RANGE,
) -> float:
    """Per-entry bound on |recovered N' - exact N'| (module docstring): K * (2c / Q) / sum_k rho_k."""
    return num_clients * (2.0 * clipping_range / quantization_range) / rho_total


__all__ = [
    "PrivacyError",
    "SECAGG_CLIPPING_RANGE",
    "SECAGG_QUANTIZATION_RANGE",
    "WEIGHT_UNITS",
    "SecAggLayout",
    "aggregation_rule",
    "client_weight",
    "decode_secagg_mean",
    "encode_for_secagg",
    "factor_sums",
    "finish_secagg",
    "max_weight_bound",
    "quantisation_bound",
    "weight_units",
]
