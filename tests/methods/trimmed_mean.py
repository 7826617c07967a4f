"""An extra federated method, written as a user would add one: this one file, nothing else in prelort.

``trimmed``: a segment-wise coordinate-wise trimmed mean. Rank dimension i is averaged over the clients whose
rank covers it (as PreLort's segment rule), but per coordinate the ``trim`` largest and ``trim`` smallest of
their values are dropped first (at most (n - 1) // 2 each way, so one value always remains), unweighted - a
robust rule against a few outlying clients. A dimension no client covered keeps its value. Not a function of
plain sums (no ``sum_rule``), so differential privacy and secure aggregation refuse it.

tests/methods/test_extra_method.py loads this file, which registers the method, and runs it end to end. It
builds only on prelort's public API: the interface (``prelort.methods``) and the method authors' toolkit
(``prelort.methods.toolkit``: the rank check, the prefix a rank-r client receives, the rank axes).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from pydantic import Field

from prelort.methods import ClientUpdate, GlobalState, MethodOptions, TrainPlan, register
from prelort.methods.toolkit import PrefixLoRA, check_rank, copy_state, rank_dim, split_key


class TrimmedOptions(MethodOptions):
    """Config section ``trimmed``."""

    trim: int = Field(1, ge=0, description="Values dropped at each end of every coordinate before averaging.")


@register
class TrimmedMean(PrefixLoRA):  # a rank-R LoRA; a rank-r client receives its prefix
    name = "trimmed"
    summary = "Segment-wise coordinate-wise trimmed mean of the clients' LoRA prefixes (a test-suite method)."
    reference = "tests/methods/trimmed_mean.py"
    options_model = TrimmedOptions
    options_prefix = "trimmed_"

    def __init__(self, spec):
        super().__init__(spec)
        self.trim = int(self.option("trim"))

    def plan(self, rank: int) -> TrainPlan:
        rank = check_rank(self.spec, rank)
        return TrainPlan(rank=rank, truncations=(rank,), mode="off")

    def aggregate(self, state: GlobalState, updates: Iterable[ClientUpdate]) -> GlobalState:
        updates = list(updates)
        for update in updates:  # the interface's check of names, shapes and rank, before anything is averaged
            self.contributed_factors(update)
        out = copy_state(state)
        for name, previous in state.tensors.items():
            dim = rank_dim(split_key(name)[1])  # rows of A, columns of B
            for i in range(previous.shape[dim]):
                values = [u.tensors[name].select(dim, i) for u in updates if u.rank > i]
                if not values:
                    continue  # no client covered dimension i this round
                stacked, _ = torch.sort(torch.stack(values).to(torch.float64), dim=0)
                cut = min(self.trim, (len(values) - 1) // 2)
                kept = stacked[cut : len(values) - cut]
                out.tensors[name].select(dim, i).copy_(kept.mean(dim=0).to(previous.dtype))
        return out
