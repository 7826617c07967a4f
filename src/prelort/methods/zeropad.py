"""Zero-padding FedAvg for heterogeneous ranks (DESIGN section 3): the dilution PreLort removes."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from ..nested import PaddedSums, rank_dim
from . import register
from ._common import check_rank, client_factors, copy_state, data_weight, prefix_adapter, state_factor
from .base import Broadcast, ClientUpdate, GlobalState, Method, TrainPlan, key, lora_init


@register
class ZeroPadding(Method):
    """Pad every client's A and B to rank R with zeros and average over ALL the round's clients:

        A_new = sum_k w_k pad(A_k, R),   B_new = sum_k w_k pad(B_k, R),   w_k = p_k / sum_j p_j

    with p_k = number of examples. Dimension i of a rank-r_k client with r_k <= i counts as zero,
    so a dimension covered by clients holding a fraction f of the weight shrinks to f times their
    mean (the dilution). Clients receive the truncation to their rank.
    """

    name = "zeropad"
    summary = "Zero-padding FedAvg: pad every client's LoRA to rank R with zeros, average over all clients."
    reference = "Zero-padding baseline as in Cho et al., HetLoRA, arXiv:2401.06432 and FLoRA, arXiv:2409.05976"
    sum_aggregatable = True
    dense_state = False

    def init_state(self, generator: torch.Generator) -> GlobalState:
        return GlobalState(tensors=lora_init(self.spec, self.spec.max_rank, generator))

    def broadcast(self, state: GlobalState, rank: int, generator: torch.Generator | None = None) -> Broadcast:
        return Broadcast(adapter=prefix_adapter(self.spec, state, check_rank(self.spec, rank)))

    def plan(self, rank: int) -> TrainPlan:
        rank = check_rank(self.spec, rank)
        return TrainPlan(rank=rank, truncations=(rank,), mode="off")

    # -- hooks HetLoRA overrides ---------------------------------------------------------------
    def _factors(self, update: ClientUpdate) -> list[tuple[str, Tensor, Tensor]]:
        """(module, A_k, B_k) of one update, checked, as they enter the average."""
        return list(client_factors(self.spec, update, max_rank=self.spec.max_rank))

    def _weight(self, update: ClientUpdate, factors: list[tuple[str, Tensor, Tensor]]) -> float:
        """Unnormalised weight of one client (normalised by the sum over the round)."""
        return data_weight(update)

    def _after(self, out: GlobalState, seen: list[tuple[int, dict]]) -> None:
        """Method-specific bookkeeping on the new state from (client, update meta) pairs (none here)."""

    def aggregate(self, state: GlobalState, updates: Iterable[ClientUpdate]) -> GlobalState:
        out = copy_state(state)
        sums: dict[str, PaddedSums] = {}
        for module in self.spec.modules:
            for kind in ("lora_A", "lora_B"):
                previous = state_factor(state, module, kind)
                sums[key(module, kind)] = PaddedSums(previous.shape, rank_dim(kind), device=previous.device)
        seen: list[tuple[int, dict]] = []
        for update in updates:
            factors = self._factors(update)
            w = self._weight(update, factors)
            for module, a, b in factors:
                sums[key(module, "lora_A")].add(a, w)
                sums[key(module, "lora_B")].add(b, w)
            # Keep only the small metadata; the tensors are folded into the sums and can be freed.
            seen.append((update.client, dict(update.meta)))
        for name, acc in sums.items():
            # num / total: dimensions beyond a client's rank count as zeros for it (the dilution).
            out.tensors[name] = acc.padded_mean(state.tensors[name])
        self._after(out, seen)
        return out
