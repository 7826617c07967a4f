"""FedIT: homogeneous FedAvg of LoRA at the smallest rank (docs/design.md section 3)."""

from __future__ import annotations

import torch
from torch import Tensor

from . import register
from .base import Broadcast, ClientUpdate, GlobalState, TrainPlan, lora_init
from .toolkit import SumRuleMethod, check_rank, client_factors, prefix_adapter


@register
class FedIT(SumRuleMethod):
    """Every client trains rank r_min = min_k r_k (the rank all of them can run).

        A_new = sum_k p_k A_k / sum_k p_k,   B_new = sum_k p_k B_k / sum_k p_k,   p_k = number of examples

    A and B are averaged separately. The global state is rank r_min; a tier or client of rank t
    gets its first min(t, r_min) dimensions. ``aggregate`` is the sum-rule template's.
    """

    name = "fedit"
    summary = "FedIT: every client at the smallest rank; FedAvg of A and B separately (homogeneous floor)."
    reference = "Zhang et al., Towards Building the Federated GPT: Federated Instruction Tuning, arXiv:2305.05644"
    dense_state = False
    # every rank is r_min: the segment-wise mean is plain FedAvg (and keeps the state if all p_k = 0)
    sum_rule = "segment"

    @property
    def rank(self) -> int:
        return self.spec.min_rank

    @property
    def trains_one_rank(self) -> bool:
        return True

    def client_rank(self, client: int, state: GlobalState) -> int:
        return self.rank

    def init_state(self, generator: torch.Generator) -> GlobalState:
        return GlobalState(tensors=lora_init(self.spec, self.rank, generator))

    def broadcast(self, state: GlobalState, rank: int, generator: torch.Generator | None = None) -> Broadcast:
        return Broadcast(adapter=prefix_adapter(self.spec, state, min(check_rank(self.spec, rank), self.rank)))

    def plan(self, rank: int) -> TrainPlan:
        rank = min(check_rank(self.spec, rank), self.rank)
        return TrainPlan(rank=rank, truncations=(rank,), mode="off")

    def check_update(self, update: ClientUpdate) -> None:
        if update.rank != self.rank:
            raise ValueError(f"FedIT trains every client at rank {self.rank}; the update has rank {update.rank}")

    def contributed_factors(self, update: ClientUpdate) -> list[tuple[str, Tensor, Tensor]]:
        """The whole adapter, which must be at rank r_min."""
        if update.rank != self.rank:
            raise ValueError(f"client {update.client}: FedIT trains rank {self.rank}, update has rank {update.rank}")
        return list(client_factors(self.spec, update, max_rank=self.rank))
