"""Zero-padding FedAvg for heterogeneous ranks (docs/design.md section 3): the dilution PreLort removes."""

from __future__ import annotations

from . import register
from .base import TrainPlan
from .toolkit import PrefixLoRA, SumRuleMethod, check_rank


@register
class ZeroPadding(PrefixLoRA, SumRuleMethod):
    """Pad every client's A and B to rank R with zeros and average over ALL the round's clients:

        A_new = sum_k w_k pad(A_k, R),   B_new = sum_k w_k pad(B_k, R),   w_k = p_k / sum_j p_j

    with p_k = number of examples. Dimension i of a rank-r_k client with r_k <= i counts as zero,
    so a dimension covered by clients holding a fraction f of the weight shrinks to f times their
    mean (the dilution). Clients receive the truncation to their rank. ``aggregate`` is the sum-rule
    template's (the padded rule: dimensions beyond a client's rank count as zeros for it); HetLoRA overrides
    the template's hooks (``contributed_factors``, ``client_weight``, ``after_round``).
    """

    name = "zeropad"
    summary = "Zero-padding FedAvg: pad every client's LoRA to rank R with zeros, average over all clients."
    reference = "Zero-padding baseline as in Cho et al., HetLoRA, arXiv:2401.06432 and FLoRA, arXiv:2409.05976"
    dense_state = False
    sum_rule = "padded"

    def plan(self, rank: int) -> TrainPlan:
        rank = check_rank(self.spec, rank)
        return TrainPlan(rank=rank, truncations=(rank,), mode="off")
