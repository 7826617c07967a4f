"""HetLoRA: zero-padding with norm-based aggregation weights and optional rank self-pruning.

Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation Models",
arXiv:2401.06432 (no official code; the rule below is the paper's, docs/design.md section 3).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import Field
from torch import Tensor

from . import register
from .toolkit import client_factors
from .base import ClientUpdate, FederationSpec, GlobalState, MethodOptions, PrunePlan, TrainPlan
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


@register
class HetLoRA(ZeroPadding):
    """Zero-pad every client's A, B to rank R and average with

        w_k = ||B_k A_k||_F / sum_{j in round} ||B_j A_j||_F      (no data-size weight)

    where ||B_k A_k||_F is taken over the whole adapter (sqrt of the sum of squares over modules).
    If every norm is zero the round carries no signal and the state is kept.

    Self-pruning (option ``prune``, ``spec.options["hetlora_prune"]``): a client of rank r regularises its
    tail dimensions [ceil(gamma r), r) with lam * ||B[:, tail]|| * ||A[tail, :]|| (done by the trainer, from the
    plan's PrunePlan); an update whose meta says ``"pruned_to": r'`` counts at rank r' and that
    client trains at rank r' from then on (``state.meta["client_ranks"]``, keys = client ids as str).
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
        prune = PrunePlan(start=start, lam=self.lam)
        return TrainPlan(rank=base.rank, truncations=base.truncations, mode="off", prune=prune)

    def check_update(self, update: ClientUpdate) -> None:
        pruned = update.meta.get("pruned_to")
        if pruned is not None and (isinstance(pruned, bool) or not isinstance(pruned, int)
                                   or not 1 <= pruned <= update.rank):
            raise ValueError(f"extra.pruned_to = {pruned!r}: HetLoRA needs an integer in [1, {update.rank}] "
                             "(the update's rank)")

    def contributed_factors(self, update: ClientUpdate) -> list[tuple[str, Tensor, Tensor]]:
        factors = list(client_factors(self.spec, update, max_rank=self.spec.max_rank))
        pruned = update.meta.get("pruned_to")
        if pruned is None:
            return factors
        if isinstance(pruned, bool) or not isinstance(pruned, int) or not 1 <= pruned <= update.rank:
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
