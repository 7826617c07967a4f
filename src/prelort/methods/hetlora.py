"""HetLoRA: zero-padding with norm-based aggregation weights and optional rank self-pruning.

Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation Models",
arXiv:2401.06432 (no official code; the rule below is the paper's, docs/design.md section 3).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from pydantic import Field
from torch import Tensor

from . import register
from .base import ClientUpdate, FederationSpec, GlobalState, LocalTraining, MethodOptions, TrainPlan
from .toolkit import client_factors
from .zeropad import ZeroPadding


class HetLoRAOptions(MethodOptions):
    """Config section ``hetlora``; ``spec.options`` carries them as ``hetlora_<field>``."""

    prune: bool = Field(False, description="HetLoRA rank self-pruning.")
    gamma: float = Field(0.99, gt=0, le=1, description="Pruning keeps ceil(gamma * r) dimensions.")
    lam: float = Field(1e-3, ge=0, description="Strength of the tail-norm regulariser.")


def lora_product_norm(factors: list[tuple[str, Tensor, Tensor]]) -> float:
    """||B A||_F of a whole adapter: sqrt(sum over modules of ||B_m A_m||_F^2).

    Per module ||B A||_F^2 = trace(A^T B^T B A) = sum((B^T B) * (A A^T)), two r x r products,
    so the d_out x d_in product is never formed. The scale s is the same for every client and
    cancels in the normalised weights, so it is left out.
    """
    total = 0.0
    for _, a, b in factors:
        a64, b64 = a.to(torch.float64), b.to(torch.float64)
        total += float(((b64.T @ b64) * (a64 @ a64.T)).sum().clamp_min(0.0))
    return math.sqrt(total)


def tail_norm_product(factors: list[tuple[Tensor, Tensor]], start: int, rank: int) -> Tensor:
    """sum over modules of ||B[:, start:rank]||_F * ||A[start:rank, :]||_F (differentiable)."""
    total = None
    for a, b in factors:
        term = torch.linalg.vector_norm(b[:, start:rank].float()) * torch.linalg.vector_norm(a[start:rank].float())
        total = term if total is None else total + term
    return total


def _is_rank_within(value: Any, rank: int) -> bool:
    """Whether ``value`` (a ``pruned_to`` a client reports) is an integer in [1, rank]."""
    return not isinstance(value, bool) and isinstance(value, int) and 1 <= value <= rank


class SelfPruning(LocalTraining):
    """HetLoRA's client side: the tail norm product sum_modules ||B[:, start:r]||_F * ||A[start:r, :]||_F is
    measured when the round starts and ends, ``lam`` times it is added to every step's objective, and at the
    end the update is truncated to rank ``start`` (metadata ``pruned_to``) when the product ended smaller than
    it started. The metadata records both norms (``tail_norm_start``, ``tail_norm_end``)."""

    def __init__(self, start: int, lam: float, rank: int):
        self.start, self.lam, self.rank = start, lam, rank
        self.tail_start: float | None = None
        self.tail_end: float | None = None
        # the penalty puts the tail dimensions in every step's objective, whatever truncation was drawn
        self.penalty_moves_all_dims = lam > 0

    def _tail_norm(self, factors: list[tuple[Tensor, Tensor]]) -> float:
        with torch.no_grad():
            return float(tail_norm_product(factors, self.start, self.rank))

    def round_starts(self, factors: list[tuple[Tensor, Tensor]]) -> None:
        self.tail_start = self._tail_norm(factors)

    def penalty(self, factors: list[tuple[Tensor, Tensor]]) -> Tensor | None:
        return self.lam * tail_norm_product(factors, self.start, self.rank) if self.lam > 0 else None

    def round_ends(self, factors: list[tuple[Tensor, Tensor]]) -> None:
        self.tail_end = self._tail_norm(factors)

    def finish(self, rank: int, meta: dict[str, Any]) -> int:
        meta["tail_norm_start"] = self.tail_start
        meta["tail_norm_end"] = self.tail_end
        if self.tail_end < self.tail_start:
            meta["pruned_to"] = self.start
            return self.start
        return rank


@register
class HetLoRA(ZeroPadding):
    """Zero-pad every client's A, B to rank R and average with

        w_k = ||B_k A_k||_F / sum_{j in round} ||B_j A_j||_F      (no data-size weight)

    where ||B_k A_k||_F is taken over the whole adapter (sqrt of the sum of squares over modules).
    If every norm is zero the round carries no signal and the state is kept.

    Self-pruning (option ``prune``, ``spec.options["hetlora_prune"]``): a client of rank r regularises its
    tail dimensions [ceil(gamma r), r) with lam * ||B[:, tail]|| * ||A[tail, :]|| (the plan's ``extra`` says
    ``prune_start``, ``prune_lam``; the client's :class:`SelfPruning` does it); an update whose meta says
    ``"pruned_to": r'`` counts at rank r' and that client trains at rank r' from then on
    (``state.meta["client_ranks"]``, keys = client ids as str). ``pruned_to`` is the one metadata field a
    client sends in the clear under secure aggregation.
    """

    name = "hetlora"
    summary = "HetLoRA: zero-padding averaged with weights proportional to ||B_k A_k||_F; optional rank self-pruning."
    reference = (
        "Cho et al., Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation Models, arXiv:2401.06432"
    )
    dense_state = False
    sum_rule = "padded"
    weight_depends_on_update = True  # ||B_k A_k||_F
    options_model = HetLoRAOptions
    options_prefix = "hetlora_"
    clear_meta_fields = ("pruned_to",)

    def __init__(self, spec: FederationSpec):
        super().__init__(spec)
        self.prune = bool(self.option("prune"))
        self.gamma = float(self.option("gamma"))
        self.lam = float(self.option("lam"))
        if not 0 < self.gamma <= 1:
            raise ValueError(f"options.hetlora_gamma must be in (0, 1], got {self.gamma}")
        if not (math.isfinite(self.lam) and self.lam >= 0):
            raise ValueError(f"options.hetlora_lam must be >= 0, got {self.lam}")

    def init_state(self, generator: torch.Generator) -> GlobalState:
        state = super().init_state(generator)
        state.meta["client_ranks"] = {str(k): int(r) for k, r in enumerate(self.spec.client_ranks)}
        return state

    def client_rank(self, client: int, state: GlobalState) -> int:
        configured = self.spec.client_ranks[client]
        current = state.meta.get("client_ranks", {}).get(str(client), configured)
        return int(current)

    def plan(self, rank: int) -> TrainPlan:
        base = super().plan(rank)
        if not self.prune:
            return base
        # ceil(gamma r), at least 1; the small epsilon keeps 0.5 * 8 = 4.000000000000001 at 4.
        start = max(1, math.ceil(self.gamma * base.rank - 1e-9))
        if start >= base.rank:
            return base  # empty tail: nothing to regularise or prune at this rank
        return TrainPlan(
            rank=base.rank,
            truncations=base.truncations,
            mode="off",
            extra={"prune_start": start, "prune_lam": self.lam},
        )

    # -- the client side: self-pruning and its pruned_to -------------------------------------------------
    def local_training(self, plan: TrainPlan) -> LocalTraining:
        if not plan.extra:
            return LocalTraining()
        if set(plan.extra) != {"prune_start", "prune_lam"}:
            raise ValueError(f"HetLoRA's plan extra needs prune_start and prune_lam, got {sorted(plan.extra)}")
        start, lam = plan.extra["prune_start"], plan.extra["prune_lam"]
        if isinstance(start, bool) or not isinstance(start, int) or not 0 < start < plan.rank:
            raise ValueError(f"prune.start {start} must lie in (0, {plan.rank})")
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not (math.isfinite(lam) and lam >= 0):
            raise ValueError(f"prune.lam {lam!r} must be a number >= 0")
        return SelfPruning(start=start, lam=float(lam), rank=plan.rank)

    def check_update(self, update: ClientUpdate) -> None:
        pruned = update.meta.get("pruned_to")
        if pruned is not None and not _is_rank_within(pruned, update.rank):
            raise ValueError(
                f"extra.pruned_to = {pruned!r}: HetLoRA needs an integer in [1, {update.rank}] (the update's rank)"
            )

    def check_clear_meta(self, meta: Mapping[str, Any], rank: int) -> dict[str, str]:
        pruned = meta.get("pruned_to")
        if pruned is None or _is_rank_within(pruned, rank):
            return {}
        return {"pruned_to": f"pruned_to {pruned!r} (outside [1, {rank}])"}

    def counted_rank(self, meta: Mapping[str, Any], rank: int) -> int:
        return meta.get("pruned_to") or rank

    # -- the server side ------------------------------------------------------------------------------------
    def contributed_factors(self, update: ClientUpdate) -> list[tuple[str, Tensor, Tensor]]:
        factors = list(client_factors(self.spec, update, max_rank=self.spec.max_rank))
        pruned = update.meta.get("pruned_to")
        if pruned is None:
            return factors
        if not _is_rank_within(pruned, update.rank):
            raise ValueError(f"client {update.client}: pruned_to {pruned!r} outside [1, {update.rank}]")
        # The pruned tail is gone: the client's adapter counts at rank r' in the average.
        return [(m, a[:pruned], b[:, :pruned]) for m, a, b in factors]

    def client_weight(self, update: ClientUpdate, factors: list[tuple[str, Tensor, Tensor]]) -> float:
        return lora_product_norm(factors)

    def weight_bound(self, total_examples: int, max_update_norm: float | None) -> float | None:
        """w_k = sqrt(sum_m ||B_m A_m||_F^2) <= sum_m ||B_m||_F ||A_m||_F <= sum_m (||A_m||_F^2 + ||B_m||_F^2) / 2
        = ||update||^2 / 2 <= ``max_update_norm``^2 / 2, which the client enforces on its own update
        (``validation.max_update_norm``) before it encodes it; None without that bound."""
        return None if max_update_norm is None else float(max_update_norm) ** 2 / 2.0

    def after_round(self, out: GlobalState, seen: list[tuple[int, dict[str, Any]]]) -> None:
        ranks = dict(out.meta.get("client_ranks", {}))
        for client, meta in seen:
            if meta.get("pruned_to") is not None:
                ranks[str(client)] = int(meta["pruned_to"])
        if ranks or "client_ranks" in out.meta:
            out.meta["client_ranks"] = ranks
