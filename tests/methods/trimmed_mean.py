"""An extra federated method, written as a user would add one: this one file, nothing else in prelort.

``trimmed``: a segment-wise coordinate-wise trimmed mean. Rank dimension i is averaged over the clients whose
rank covers it (as PreLort's segment rule), but per coordinate the ``trim`` largest and ``trim`` smallest of
their values are dropped first (at most (n - 1) // 2 each way, so one value always remains), unweighted - a
robust rule against a few outlying clients. A dimension no client covered keeps its value. Not a function of
plain sums (no ``sum_rule``), so differential privacy and secure aggregation refuse it.

tests/methods/test_extra_method.py loads this file, which registers the method, and runs it end to end.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from pydantic import Field

from prelort.methods import (
    Broadcast,
    ClientUpdate,
    GlobalState,
    Method,
    MethodOptions,
    TrainPlan,
    key,
    lora_init,
    register,
)


class TrimmedOptions(MethodOptions):
    """Config section ``trimmed``."""

    trim: int = Field(1, ge=0, description="Values dropped at each end of every coordinate before averaging.")


@register
class TrimmedMean(Method):
    name = "trimmed"
    summary = "Segment-wise coordinate-wise trimmed mean of the clients' LoRA prefixes (a test-suite method)."
    reference = "tests/methods/trimmed_mean.py"
    options_model = TrimmedOptions
    options_prefix = "trimmed_"

    def __init__(self, spec):
        super().__init__(spec)
        self.trim = int(self.option("trim"))

    def _rank(self, rank: int) -> int:
        if isinstance(rank, bool) or int(rank) != rank or not 1 <= rank <= self.spec.max_rank:
            raise ValueError(f"rank {rank!r} outside [1, {self.spec.max_rank}]")
        return int(rank)

    def init_state(self, generator: torch.Generator) -> GlobalState:
        return GlobalState(tensors=lora_init(self.spec, self.spec.max_rank, generator))

    def broadcast(self, state: GlobalState, rank: int, generator: torch.Generator | None = None) -> Broadcast:
        rank = self._rank(rank)
        adapter = {}
        for module in self.spec.modules:
            adapter[key(module, "lora_A")] = state.tensors[key(module, "lora_A")][:rank].float().clone()
            adapter[key(module, "lora_B")] = state.tensors[key(module, "lora_B")][:, :rank].float().clone()
        return Broadcast(adapter=adapter)

    def plan(self, rank: int) -> TrainPlan:
        rank = self._rank(rank)
        return TrainPlan(rank=rank, truncations=(rank,), mode="off")

    def aggregate(self, state: GlobalState, updates: Iterable[ClientUpdate]) -> GlobalState:
        updates = list(updates)
        out = GlobalState(tensors={n: t.clone() for n, t in state.tensors.items()}, meta=dict(state.meta))
        for update in updates:
            for name in out.tensors:
                if name not in update.tensors:
                    raise ValueError(f"client {update.client}: update has no tensor {name!r}")
        for name, previous in state.tensors.items():
            dim = 0 if name.endswith(".lora_A") else 1  # rank dimension: rows of A, columns of B
            for i in range(previous.shape[dim]):
                values = [u.tensors[name].select(dim, i) for u in updates if u.rank > i]
                if not values:
                    continue  # no client covered dimension i this round
                stacked, _ = torch.sort(torch.stack(values).to(torch.float64), dim=0)
                cut = min(self.trim, (len(values) - 1) // 2)
                kept = stacked[cut:len(values) - cut]
                out.tensors[name].select(dim, i).copy_(kept.mean(dim=0).to(previous.dtype))
        return out

