"""Zero-padding FedAvg for heterogeneous ranks (docs/design.md section 3): the dilution PreLort removes."""

from __future__ import annotations

from collections.abc import Iterable

from . import register
from ._common import PrefixLoRA, add_factors, check_rank, copy_state, empty_factor_sums, lora_shapes
from .base import ClientUpdate, GlobalState, TrainPlan


@register
class ZeroPadding(PrefixLoRA):
    """Pad every client's A and B to rank R with zeros and average over ALL the round's clients:

        A_new = sum_k w_k pad(A_k, R),   B_new = sum_k w_k pad(B_k, R),   w_k = p_k / sum_j p_j

    with p_k = number of examples. Dimension i of a rank-r_k client with r_k <= i counts as zero,
    so a dimension covered by clients holding a fraction f of the weight shrinks to f times their
    mean (the dilution). Clients receive the truncation to their rank.
    """

    name = "zeropad"
    summary = "Zero-padding FedAvg: pad every client's LoRA to rank R with zeros, average over all clients."
    reference = "Zero-padding baseline as in Cho et al., HetLoRA, arXiv:2401.06432 and FLoRA, arXiv:2409.05976"
    dense_state = False
    sum_rule = "padded"

    def plan(self, rank: int) -> TrainPlan:
        rank = check_rank(self.spec, rank)
        return TrainPlan(rank=rank, truncations=(rank,), mode="off")

    # -- the interface's hooks HetLoRA overrides (contributed_factors, client_weight, after_round) ----------
    def aggregate(self, state: GlobalState, updates: Iterable[ClientUpdate]) -> GlobalState:
        sums = empty_factor_sums(lora_shapes(state), device=next(iter(state.tensors.values())).device)
        seen: list[tuple[int, dict]] = []
        for update in updates:
            factors = self.contributed_factors(update)
            w = self.client_weight(update, factors)
            add_factors(sums, factors, w)
            # Keep only the small metadata; the tensors are folded into the sums and can be freed.
            seen.append((update.client, dict(update.meta)))
        # num / total: dimensions beyond a client's rank count as zeros for it (the dilution).
        out = copy_state(state, {name: acc.padded_mean(state.tensors[name]) for name, acc in sums.items()})
        self.after_round(out, seen)
        return out
