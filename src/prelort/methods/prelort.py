"""PreLort: prefix-nested LoRA with segment-wise aggregation (docs/design.md section 2)."""

from __future__ import annotations

from pydantic import Field

from ..rank_geometry import nested_truncations
from . import register
from .base import NESTED_MODES, FederationSpec, MethodOptions, NestedMode, TrainPlan
from .toolkit import PrefixLoRA, SumRuleMethod, check_rank


class PreLortOptions(MethodOptions):
    """Config section ``prelort``."""

    nested: NestedMode = Field(
        "all",
        description="Prefix-nested objective: all truncations each step, sample one, sandwich (own rank + one), "
        "or off (plain LoRA; segment-wise aggregation only). A step changes only the dimensions its "
        "truncations reach (AdamW moments included). sample_width (a variant, not one of the quality "
        "study's pre-registered arms): one truncation per step, drawn with probability proportional to its "
        "segment's width (the segment of a uniformly drawn rank dimension), so the top segment trains more "
        "often: a rank-16 client of ranks 2/4/8/16 draws t = 16 on half its steps instead of a quarter. "
        "cycle (a candidate repair of quality study 2, stage B): one truncation per step, deterministic: the "
        "client's rank first, then its truncations ascending, cycling (rank 16 of 2/4/8/16 over 6 steps: 16, 2, 4, "
        "8, 16, 2), so every segment trains every round, the top one first.",
    )


@register
class PreLort(PrefixLoRA, SumRuleMethod):
    """Global adapter A (R x d_in), B (d_out x R); client k trains the prefix of rank r_k.

    Aggregation, per segment seg_j with covering clients C_j = {k : r_k >= r(j)}:

        A_new[seg_j] = sum_{k in C_j} p_k A_k[seg_j] / sum_{k in C_j} p_k       (B: same over columns)

    p_k = number of examples. Computed from two streamed sums (numerator, padded weight masks),
    so server memory does not grow with the number of clients; a dimension no client covered
    this round keeps its previous value. ``aggregate`` is the sum-rule template's (the segment rule).
    """

    name = "prelort"
    summary = "Prefix-nested LoRA: clients train nested truncations; segment-wise weighted mean of the prefixes."
    reference = "PreLort (this project); docs/design.md section 2"
    dense_state = False
    sum_rule = "segment"
    options_model = PreLortOptions

    def __init__(self, spec: FederationSpec):
        super().__init__(spec)
        self.mode = self.option("nested")
        if self.mode not in NESTED_MODES:
            raise ValueError(f"options.nested must be one of {', '.join(NESTED_MODES)}, got {self.mode!r}")

    def plan(self, rank: int) -> TrainPlan:
        rank = check_rank(self.spec, rank)
        if self.mode == "off":
            truncations: tuple[int, ...] = (rank,)
        else:
            truncations = tuple(nested_truncations(rank, self.spec.client_ranks))
        return TrainPlan(rank=rank, truncations=truncations, mode=self.mode)
