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
3. finish with the method's sum rule (``Method.sum_rule``, ``Method.finish_sums``) on the noised sums
   (the sums themselves: :mod:`prelort.secure_sums`):

   * ``sum_rule = "segment"`` (segment-wise mean):  new_i = N_i / D_i where D_i > 0, else previous_i
     (per-entry noise std on the new state z C / D_i);
   * ``sum_rule = "padded"`` (padded mean over all K clients):  new = N / K  (noise std z C / K).
     Under DP a norm-based weight becomes uniform (a weight proportional to the update's own norm has
     no bounded sensitivity); a method's ``after_round`` (e.g. pruned ranks) still applies.

Methods without a sum rule are refused (e.g. an aggregate that is a mean of dense products s B_k A_k, whose change
under a clip in factor space depends on the broadcast factors' norms, so no noise calibrated to
C alone protects it; :class:`PrivacyError`).

With z = 0 and C larger than every update's change, :func:`dp_aggregate` equals the method's plain
aggregate with every ``num_examples`` set to 1.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .methods import ClientUpdate, GlobalState, Method, SumRule, split_key
from .methods.toolkit import fold_updates
from .secure_sums import PrivacyError, aggregation_rule

if TYPE_CHECKING:
    from .config import Config, PrivacyConfig

__all__ = [
    "PrivacyError",
    "add_dp_noise",
    "check_dp",
    "check_secure_aggregation",
    "clip_update",
    "dp_aggregate",
    "update_change_norm",
]


# -- which methods ------------------------------------------------------------------------------------------
def check_dp(method: Method) -> SumRule:
    """The method's sum rule (:func:`prelort.secure_sums.aggregation_rule`), with the error phrased for
    ``privacy.dp``."""
    try:
        return aggregation_rule(method)
    except PrivacyError as e:
        raise PrivacyError(f"privacy.dp: {e}") from None


def check_secure_aggregation(cfg: Config) -> None:
    """Refuse ``privacy.secure_aggregation: true`` where it cannot run; a :class:`~prelort.config.ConfigError`.

    Secure aggregation needs (a) a method whose aggregate is a function of plain sums of fixed-shape
    padded tensors (``Method.sum_aggregatable``, the flag the SecAgg+ finish asks too) and (b) an engine whose
    entry in the engine table says ``secure_aggregation`` (Flower's; SecAgg+ is Flower's protocol, and the
    in-process engine has no separate parties to hide updates from). It
    also refuses ``audit`` (stores the individual updates) and a method whose weights depend on the update
    (``Method.weight_depends_on_update``) without ``validation.max_update_norm`` (no public bound on
    its weights) unless ``privacy.dp`` makes every weight 1. With ``privacy.dp`` the clients clip and the server
    noises the secure sums (:meth:`prelort.federation.Federation.end_round_secure`).
    """
    from . import engines, methods
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
    engine = engines.get(cfg.engine)
    if not engine.secure_aggregation:
        able = " or ".join(name for name, e in engines.available().items() if e.secure_aggregation)
        raise ConfigError(
            f"privacy.secure_aggregation: needs engine {able} (Flower's SecAgg+ protocol); engine "
            f"{cfg.engine} "
            + (
                "has no separate parties to hide updates from"
                if engine.in_process
                else "does not run secure aggregation"
            )
        )
    if cfg.clients.per_round < 3:
        raise ConfigError(
            f"privacy.secure_aggregation: SecAgg+ needs at least 3 clients per round to hide one "
            f"client's update (clients.per_round = {cfg.clients.per_round})"
        )
    if cfg.audit:
        raise ConfigError(
            "privacy.secure_aggregation and audit: true cannot be combined: the audit stores every "
            "client's update under updates/, which secure aggregation exists to hide from the server; "
            "turn one of them off"
        )
    # under privacy.dp every weight is 1 (W = 1), so weights that depend on the update need no public bound
    if cls.weight_depends_on_update and cfg.validation.max_update_norm is None and not cfg.privacy.dp:
        raise ConfigError(
            f"privacy.secure_aggregation with method {cfg.method} needs validation.max_update_norm: "
            "SecAgg+ needs a public bound on weights that depend on the update (the method's "
            "weight_bound derives it from max_update_norm, see docs/privacy.md)"
        )


# -- clipping -----------------------------------------------------------------------------------------------
def update_change_norm(update: ClientUpdate, reference: Mapping[str, Tensor]) -> float:
    """||X_k - ref_k||_F over all the update's tensors (float64 accumulation)."""
    total = 0.0
    for name, x in update.tensors.items():
        if name not in reference:
            raise PrivacyError(f"client {update.client}: reference has no tensor {name!r}")
        ref = reference[name]
        if tuple(ref.shape) != tuple(x.shape):
            raise PrivacyError(
                f"client {update.client}: {name} has shape {tuple(x.shape)} but the adapter it "
                f"received has {tuple(ref.shape)}"
            )
        total += float((x.double() - ref.double()).pow(2).sum())
    return math.sqrt(total)


def clip_update(
    update: ClientUpdate, reference: Mapping[str, Tensor], clip_norm: float
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
    tensors = {
        k: (reference[k].to(x.dtype) + (x - reference[k].to(x.dtype)) * f).contiguous()
        for k, x in update.tensors.items()
    }
    return dataclasses.replace(update, tensors=tensors), norm, True


# -- DP aggregation ----------------------------------------------------------------------------------------
def dp_aggregate(
    method: Method,
    state: GlobalState,
    updates: Sequence[ClientUpdate],
    references: Mapping[int, Mapping[str, Tensor]],
    cfg: PrivacyConfig,
    generator: torch.Generator,
) -> tuple[GlobalState, dict[str, Any]]:
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
    # The method's plain round (the sum-rule template) with every weight 1 and noise on N: the same fold (which
    # checks every update), finish and bookkeeping (``after_round``, e.g. pruned ranks).
    shapes = {n: t.shape for n, t in state.tensors.items()}
    sums, seen = fold_updates(method, shapes, clipped, [1.0] * len(clipped))
    num = {k: s.num for k, s in sums.items()}
    den = {k: s.den for k, s in sums.items()}
    out, info = finish_noised(method, state, rule, num, den, seen, clip, z, generator)
    info.update(clients=len(clipped), clients_clipped=n_clipped)
    return out, info


def finish_noised(
    method: Method,
    state: GlobalState,
    rule: SumRule,
    num: Mapping[str, Tensor],
    den: Mapping[str, Tensor],
    client_meta: Sequence[tuple[int, Mapping[str, Any]]],
    clip_norm: float,
    noise_multiplier: float,
    generator: torch.Generator,
) -> tuple[GlobalState, dict[str, Any]]:
    """The end of a DP round, whoever summed the clipped updates (this process, or SecAgg+): noise on N
    (:func:`add_dp_noise`), the method's ``finish_sums``, then its ``after_round`` with the clients' metadata.
    Returns the new state and the noise's info for the round's log."""
    noised, info = add_dp_noise(rule, num, den, clip_norm, noise_multiplier, generator)
    out = GlobalState(tensors=method.finish_sums(state, noised, den), meta=copy.deepcopy(state.meta))
    method.after_round(out, list(client_meta))
    return out, info


def add_dp_noise(
    rule: SumRule,
    num: Mapping[str, Tensor],
    den: Mapping[str, Tensor],
    clip_norm: float,
    noise_multiplier: float,
    generator: torch.Generator,
) -> tuple[dict[str, Tensor], dict[str, Any]]:
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
    info = {
        "clip_norm": float(clip_norm),
        "noise_multiplier": float(noise_multiplier),
        "noise_std": {"lora_A": std, "lora_B": std},
        "noise_std_state": state_std,
        "rule": rule,
    }
    return out, info
