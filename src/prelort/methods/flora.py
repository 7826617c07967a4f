"""FLoRA: stack the clients' LoRA factors and merge the stacked product into the base weights.

Wang et al., "FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous Low-Rank
Adaptations", arXiv:2409.05976. Rule read from the official code (ATP-1010/FederatedLLM,
``fed_utils/model_aggregation.py``, ``stacking`` path: A's concatenated along rows, each times its
L1-normalised data size; B's concatenated along columns unweighted, same client order). Not copied:
that repository's FedIT path, whose misspelt accumulator keeps only one client.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from . import register
from .base import Broadcast, ClientUpdate, GlobalState, Method, TrainPlan, key, lora_init
from .toolkit import (
    check_rank,
    client_factors,
    copy_state,
    data_weight,
    default_generator,
    state_factor,
    zero_dense_state,
)


def stack_factors(factors: Sequence[tuple[Tensor, Tensor]], weights: Sequence[float]) -> tuple[Tensor, Tensor]:
    """FLoRA's stacking of one module's client factors (float64).

        A_stack = [p_1 A_1; p_2 A_2; ...]   (rows, sum_k r_k x d_in)
        B_stack = [B_1, B_2, ...]           (columns, d_out x sum_k r_k)

    with p_k = weights normalised to sum 1, so B_stack A_stack = sum_k p_k B_k A_k exactly.
    """
    if len(factors) != len(weights):
        raise ValueError(f"{len(factors)} factor pairs but {len(weights)} weights")
    if not factors:
        raise ValueError("no factors to stack")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("weights sum to zero: nothing to stack")
    a_stack = torch.cat([a.to(torch.float64) * (float(w) / total) for (a, _), w in zip(factors, weights)], dim=0)
    b_stack = torch.cat([b.to(torch.float64) for _, b in factors], dim=1)
    return a_stack, b_stack


@register
class FLoRA(Method):
    """Global state: the accumulated dense delta per module, merged into the base weights.

        delta_new = delta_old + s * B_stack @ A_stack = delta_old + sum_k p_k s B_k A_k

    (p_k normalised data sizes). Every round every client receives the merged delta (its download
    grows with the number of clients' stacked ranks) and a fresh LoRA of its rank with PEFT's
    default init (A random, B = 0). Every tier evaluates the same merged model.
    """

    name = "flora"
    summary = "FLoRA: stack the clients' LoRA factors (weighted A rows, B columns); merge the product into the base."
    reference = (
        "Wang et al., FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous Low-Rank Adaptations, "
        "arXiv:2409.05976"
    )
    sum_rule = None  # stacking needs each client's factors, not a sum of them
    dense_state = True

    def init_state(self, generator: torch.Generator) -> GlobalState:
        return GlobalState(tensors=zero_dense_state(self.spec))

    def broadcast(self, state: GlobalState, rank: int, generator: torch.Generator | None = None) -> Broadcast:
        rank = check_rank(self.spec, rank)
        base_delta = {
            key(module, "delta"): state_factor(state, module, "delta").to(torch.float32).clone()
            for module in self.spec.modules
        }
        return Broadcast(adapter=lora_init(self.spec, rank, default_generator(generator)), base_delta=base_delta)

    def plan(self, rank: int) -> TrainPlan:
        rank = check_rank(self.spec, rank)
        return TrainPlan(rank=rank, truncations=(rank,), mode="off")

    def export_adapter(self, state: GlobalState, t: int) -> dict[str, Tensor]:
        """A client gets the full merged delta, which no rank-t LoRA holds: the export is its best rank-t
        approximation (SVD, Eckart-Young), the factorisation FlexLoRA broadcasts."""
        from .flexlora import FlexLoRA

        merged = self.tier(state, t).base_delta
        return FlexLoRA(self.spec).broadcast(GlobalState(tensors=merged), t).adapter

    def aggregate(self, state: GlobalState, updates: Iterable[ClientUpdate]) -> GlobalState:
        out = copy_state(state)
        per_module: dict[str, list[tuple[Tensor, Tensor]]] = {module: [] for module in self.spec.modules}
        weights: list[float] = []
        for update in updates:
            weights.append(data_weight(update))
            for module, a, b in client_factors(self.spec, update, max_rank=self.spec.max_rank):
                per_module[module].append((a, b))
        if not weights or sum(weights) <= 0:
            return out  # no update, or only zero-weight ones: nothing to merge
        s = self.spec.scale
        for module, factors in per_module.items():
            a_stack, b_stack = stack_factors(factors, weights)
            name = key(module, "delta")
            previous = state.tensors[name]
            merged = previous.to(torch.float64) + s * (b_stack.to(previous.device) @ a_stack.to(previous.device))
            out.tensors[name] = merged.to(previous.dtype)
        return out
