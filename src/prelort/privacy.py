"""Client-level differential privacy on the aggregation sums (DP-FedAvg style), engine-agnostic.

Pure functions on tensors; docs/privacy.md gives the derivation. For a round with clients k = 1..K,
client k received ``ref_k`` (its broadcast adapter) and sent ``X_k``; its update (change) is
``Delta_k = X_k - ref_k`` over all its tensors. With clip norm C and noise multiplier z:

1. clip:      X~_k = ref_k + Delta_k * min(1, C / ||Delta_k||_F)       (||.||_F over ALL the client's tensors)
2. sum, with UNIFORM weights p_k = 1 (data sizes would let one client's weight grow without bound):

       N = sum_k pad(X~_k, R) + xi,     xi ~ N(0, (z C)^2) i.i.d. per entry of every factor
       D_i = #{k : r_k > i}              (public: who took part and at which rank)

   Adding or removing one client changes ``sum_k pad(X~_k) - sum_k pad(ref_k)`` by at most C in L2
   over all tensors, and ``sum_k pad(ref_k)`` is public (the server sent the refs), so C is the
   sensitivity of the numerator sum and z C the noise std that gives the Gaussian mechanism its
   noise multiplier z (privacy accounting over rounds: docs/privacy.md).
3. finish with the method's rule on the noised sums:

   * prelort, fedit (segment-wise mean):  new_i = N_i / D_i where D_i > 0, else previous_i
     (per-entry noise std on the new state z C / D_i);
   * zeropad, hetlora (padded mean over all K clients):  new = N / K  (noise std z C / K).
     Under DP HetLoRA's norm-based weights become uniform (a weight proportional to the update's
     own norm has no bounded sensitivity); its rank self-pruning still applies.

FlexLoRA and FLoRA are refused: their aggregate is a mean of dense products s B_k A_k, whose change
under a clip in factor space depends on the broadcast factors' norms, so no noise calibrated to
C alone protects it (:class:`PrivacyError`).

With z = 0 and C larger than every update's change, :func:`dp_aggregate` equals the method's plain
aggregate with every ``num_examples`` set to 1.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from .factor_sums import FactorSums, mean_from_sums
from .methods import ClientUpdate, GlobalState, Method, split_key
from .methods._common import add_factors, client_factors, copy_state, data_weight, empty_factor_sums
from .rank_geometry import rank_dim

if TYPE_CHECKING:
    from .config import Config, PrivacyConfig

Rule = Literal["segment", "padded"]

# SecAgg+'s clipping range c and quantisation range Q as prelort runs them (Flower's defaults). Defined here,
# with no Flower import, so the engine-independent federation code and prelort.flower share one value.
SECAGG_CLIPPING_RANGE = 8.0
SECAGG_QUANTIZATION_RANGE = 2**22

__all__ = [
    "PrivacyError",
    "SECAGG_CLIPPING_RANGE",
    "SECAGG_QUANTIZATION_RANGE",
    "add_dp_noise",
    "aggregation_rule",
    "check_dp",
    "check_secure_aggregation",
    "client_weight",
    "clip_update",
    "dp_aggregate",
    "factor_sums",
    "finish_from_sums",
    "update_change_norm",
]


class PrivacyError(ValueError):
    """A privacy setting cannot be honoured for this method or input (the message says why)."""


# -- which methods ------------------------------------------------------------------------------------------
def aggregation_rule(method: Method) -> Rule:
    """How ``method`` turns the two padded sums (N, D) into its new state.

    ``segment``: dimension i = N_i / D_i (PreLort; FedIT, where every rank is r_min);
    ``padded``: every dimension = N / D_0 = N / sum_k p_k (zero-padding FedAvg, HetLoRA).
    Raises :class:`PrivacyError` for a method whose aggregate is not a function of these sums.
    """
    from .methods.fedit import FedIT
    from .methods.prelort import PreLort
    from .methods.zeropad import ZeroPadding

    if isinstance(method, ZeroPadding):  # HetLoRA subclasses it
        return "padded"
    if isinstance(method, (PreLort, FedIT)):
        return "segment"
    raise PrivacyError(
        f"method {method.name!r} does not aggregate plain sums of padded LoRA factors "
        f"(sum_aggregatable={method.sum_aggregatable}, dense_state={method.dense_state}): its aggregate needs "
        "each client's own tensors (flexlora: the SVD of a mean of dense products s*B_k A_k; flora: stacked "
        "factors), so neither client-level DP on the sums nor secure aggregation applies; use prelort, fedit, "
        "zeropad or hetlora"
    )


def check_dp(method: Method) -> Rule:
    """:func:`aggregation_rule`, with the error phrased for ``privacy.dp``."""
    try:
        return aggregation_rule(method)
    except PrivacyError as e:
        raise PrivacyError(f"privacy.dp: {e}") from None


def check_secure_aggregation(cfg: "Config") -> None:
    """Refuse ``privacy.secure_aggregation: true`` where it cannot run; a :class:`~prelort.config.ConfigError`.

    Secure aggregation needs (a) a method whose aggregate is a function of plain sums of fixed-shape
    padded tensors (``Method.sum_aggregatable``) and (b) a Flower engine (SecAgg+ is Flower's protocol;
    the in-process engine has no separate parties to hide updates from). It also refuses ``audit``
    (stores the individual updates) and HetLoRA without ``validation.max_update_norm`` (no public bound on its
    weights) unless ``privacy.dp`` makes every weight 1. With ``privacy.dp`` the clients clip and the server
    noises the secure sums (:meth:`prelort.federation.Federation.end_round_secure`).
    """
    from . import methods
    from .config import ConfigError

    if not cfg.privacy.secure_aggregation:
        return
    cls = methods.get(cfg.method)
    if not cls.sum_aggregatable:
        raise ConfigError(
            f"privacy.secure_aggregation: method {cfg.method!r} cannot run under secure aggregation: its aggregate "
            "needs each client's own tensors, not sums of padded ones; methods that can: "
            + ", ".join(sorted(n for n, c in methods.available().items() if c.sum_aggregatable))
        )
    if cfg.engine == "inprocess":
        raise ConfigError("privacy.secure_aggregation: needs engine flower-sim or flower (Flower's SecAgg+ protocol); "
                          "engine inprocess has no separate parties to hide updates from")
    if cfg.clients.per_round < 3:
        raise ConfigError(f"privacy.secure_aggregation: SecAgg+ needs at least 3 clients per round to hide one "
                          f"client's update (clients.per_round = {cfg.clients.per_round})")
    if cfg.audit:
        raise ConfigError("privacy.secure_aggregation and audit: true cannot be combined: the audit stores every "
                          "client's update under updates/, which secure aggregation exists to hide from the server; "
                          "turn one of them off")
    # under privacy.dp every weight is 1 (W = 1), so HetLoRA's norm weights need no public bound
    if cfg.method == "hetlora" and cfg.validation.max_update_norm is None and not cfg.privacy.dp:
        raise ConfigError("privacy.secure_aggregation with method hetlora needs validation.max_update_norm: SecAgg+ "
                          "needs a public bound on HetLoRA's norm weights ||B A||_F, and ||B A||_F <= "
                          "max_update_norm**2 / 2 is the one prelort uses (see docs/privacy.md)")


# -- clipping -----------------------------------------------------------------------------------------------
def update_change_norm(update: ClientUpdate, reference: Mapping[str, Tensor]) -> float:
    """||X_k - ref_k||_F over all the update's tensors (float64 accumulation)."""
    total = 0.0
    for name, x in update.tensors.items():
        if name not in reference:
            raise PrivacyError(f"client {update.client}: reference has no tensor {name!r}")
        ref = reference[name]
        if tuple(ref.shape) != tuple(x.shape):
            raise PrivacyError(f"client {update.client}: {name} has shape {tuple(x.shape)} but the adapter it "
                               f"received has {tuple(ref.shape)}")
        total += float((x.double() - ref.double()).pow(2).sum())
    return math.sqrt(total)


def clip_update(update: ClientUpdate, reference: Mapping[str, Tensor], clip_norm: float
                ) -> tuple[ClientUpdate, float, bool]:
    """``(clipped update, ||Delta||_F before clipping, whether it was scaled)``.

        X~ = ref + (X - ref) * min(1, C / ||X - ref||_F)

    Also what a client runs itself before secure aggregation (the server never sees its update).
    """
    if not (math.isfinite(clip_norm) and clip_norm > 0):
        raise PrivacyError(f"clip_norm must be a positive number, got {clip_norm}")
    norm = update_change_norm(update, reference)
    if norm <= clip_norm:
        return update, norm, False
    f = clip_norm / norm
    tensors = {k: (reference[k].to(x.dtype) + (x - reference[k].to(x.dtype)) * f).contiguous()
               for k, x in update.tensors.items()}
    return dataclasses.replace(update, tensors=tensors), norm, True


# -- the two sums and the rule --------------------------------------------------------------------------------
def client_weight(method: Method, update: ClientUpdate) -> float:
    """The client's unnormalised aggregation weight p_k as the method defines it (HetLoRA: ||B_k A_k||_F;
    the others: number of examples). A client computes it itself before secure aggregation."""
    hook = getattr(method, "_weight", None)
    if hook is not None:
        return float(hook(update, _factors(method, update)))
    return data_weight(update)


def _factors(method: Method, update: ClientUpdate) -> list[tuple[str, Tensor, Tensor]]:
    """(module, A_k, B_k) as they enter the method's sums (HetLoRA drops a pruned tail)."""
    hook = getattr(method, "_factors", None)
    if hook is not None:
        return list(hook(update))
    return list(client_factors(method.spec, update, max_rank=method.spec.max_rank))


def factor_sums(method: Method, shapes: Mapping[str, Sequence[int]], updates: Sequence[ClientUpdate],
                weights: Sequence[float]) -> FactorSums:
    """Per global tensor name (``shapes``: name -> the global tensor's shape), the padded sums
    N = sum_k w_k pad(X_k) and D_i = sum_{k: r_k > i} w_k."""
    if len(updates) != len(weights):
        raise ValueError(f"{len(updates)} updates but {len(weights)} weights")
    sums = empty_factor_sums(shapes)
    for update, w in zip(updates, weights):
        add_factors(sums, _factors(method, update), w)
    return sums


def finish_from_sums(rule: Rule, state: GlobalState, num: Mapping[str, Tensor], den: Mapping[str, Tensor]
                     ) -> dict[str, Tensor]:
    """The new global tensors from the (possibly noised or securely aggregated) sums.

    ``segment``: mean_from_sums(N, D) (uncovered dimensions keep their previous value);
    ``padded``:  N / D_0 (every client covers dimension 0, so D_0 = sum_k p_k); previous if D_0 = 0.
    """
    out: dict[str, Tensor] = {}
    for name, previous in state.tensors.items():
        if name not in num or name not in den:
            raise ValueError(f"sums lack global tensor {name!r}")
        n, d = num[name].to(torch.float64), den[name].to(torch.float64)
        _, kind = split_key(name)
        if tuple(n.shape) != tuple(previous.shape) or d.shape != (previous.shape[rank_dim(kind)],):
            raise ValueError(f"sums of {name!r} have shapes {tuple(n.shape)}, {tuple(d.shape)}; the global tensor "
                             f"has {tuple(previous.shape)}")
        if rule == "segment":
            out[name] = mean_from_sums(n, d, previous, rank_dim(kind))
        elif float(d[0]) > 0:
            out[name] = (n / d[0]).to(previous.dtype)
        else:
            out[name] = previous.clone()
    return out


# -- DP aggregation ----------------------------------------------------------------------------------------
def dp_aggregate(method: Method, state: GlobalState, updates: Sequence[ClientUpdate],
                 references: Mapping[int, Mapping[str, Tensor]], cfg: "PrivacyConfig",
                 generator: torch.Generator) -> tuple[GlobalState, dict[str, Any]]:
    """Clip, sum with uniform weights, add Gaussian noise to the numerator sums, finish (module docstring).

    ``references[client]``: the adapter that client received this round (``Broadcast.adapter``).
    ``generator`` draws the noise (seed it from (seed, round) for a reproducible run).
    Returns the new state and an info dict for the round's log::

        {"clip_norm": C, "noise_multiplier": z, "noise_std": {"lora_A": z C, "lora_B": z C} (on the sums),
         "noise_std_state": {"lora_A": max over covered dims of z C / D_i, ...}, "rule": "segment"|"padded",
         "clients": K, "clients_clipped": number of updates scaled down}
    """
    rule = check_dp(method)
    if not updates:
        raise PrivacyError("dp_aggregate needs at least one update")
    clip, z = float(cfg.clip_norm), float(cfg.noise_multiplier)
    if not (math.isfinite(z) and z >= 0):
        raise PrivacyError(f"noise_multiplier must be >= 0, got {z}")
    clipped: list[ClientUpdate] = []
    n_clipped = 0
    for update in updates:
        if update.client not in references:
            raise PrivacyError(f"no reference (broadcast adapter) for client {update.client}")
        upd, _, was = clip_update(update, references[update.client], clip)
        n_clipped += int(was)
        clipped.append(dataclasses.replace(upd, num_examples=1))
    # Validation and method bookkeeping (HetLoRA's pruned ranks) from the method itself; tensors from the sums.
    out = copy_state(method.aggregate(state, clipped))
    sums = factor_sums(method, {n: t.shape for n, t in state.tensors.items()}, clipped, [1.0] * len(clipped))
    den = {k: s.den for k, s in sums.items()}
    num, info = add_dp_noise(rule, {k: s.num for k, s in sums.items()}, den, clip, z, generator)
    out.tensors.update(finish_from_sums(rule, state, num, den))
    info.update(clients=len(clipped), clients_clipped=n_clipped)
    return out, info


def add_dp_noise(rule: Rule, num: Mapping[str, Tensor], den: Mapping[str, Tensor], clip_norm: float,
                 noise_multiplier: float, generator: torch.Generator) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The numerator sums N (uniform weights: N = sum_k pad(X~_k)) plus xi ~ N(0, (z C)^2) per entry, drawn from
    ``generator`` tensor by tensor in sorted name order (central DP and DP under secure aggregation draw the
    same noise from the same generator). Returns the noised sums (float64) and the log's info: ``clip_norm``,
    ``noise_multiplier``, ``noise_std`` (on the sums), ``noise_std_state`` (per kind, the largest std an entry of
    the new state gets: z C / D_i for the segment rule, z C / D_0 for the padded one), ``rule``."""
    std = float(noise_multiplier) * float(clip_norm)
    out: dict[str, Tensor] = {}
    state_std: dict[str, float] = {}
    for name in sorted(num):  # sorted: the noise a tensor gets does not depend on dict order
        n, d = num[name].to(torch.float64), den[name].to(torch.float64)
        noise = torch.randn(n.shape, generator=generator, dtype=torch.float64) * std if std > 0 else 0.0
        out[name] = n + noise
        _, kind = split_key(name)
        covered = d[d > 0]
        divisor = float(covered.min()) if rule == "segment" and covered.numel() else float(d[0])
        state_std[kind] = max(state_std.get(kind, 0.0), std / divisor if divisor > 0 else 0.0)
    info = {"clip_norm": float(clip_norm), "noise_multiplier": float(noise_multiplier),
            "noise_std": {"lora_A": std, "lora_B": std}, "noise_std_state": state_std, "rule": rule}
    return out, info
