"""FlexLoRA: average the clients' full LoRA products, redistribute by truncated SVD (docs/design.md section 3).

Bai et al., "Federated Fine-tuning of Large Language Models under Heterogeneous Tasks and Client
Resources", arXiv:2402.11505. Rules read from the official code (alibaba/FederatedScope, branch
FlexLoRA: ``fed_utils/model_aggregation.py::FlexLoRA`` averages ``B @ A * merge_rate`` with
L1-normalised data sizes; ``fed_utils/adaptive_peft.py::distribute_weight_fast`` takes
``U, S, V = svd(W)``, ``lora_B = U_r diag(S_r) / merge_rate``, ``lora_A = V_r^T``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from . import register
from .base import Broadcast, ClientUpdate, FederationSpec, GlobalState, Method, TrainPlan, key
from .toolkit import (
    check_rank,
    client_factors,
    copy_state,
    data_weight,
    default_generator,
    module_lora_init,
    state_factor,
    zero_dense_state,
)


@register
class FlexLoRA(Method):
    """Global state: one dense matrix per module, the weighted mean of the clients' products

        W = sum_k w_k s B_k A_k,      w_k = p_k / sum_j p_j,   p_k = number of examples

    A client (or tier) of rank r receives the best rank-r factorisation (Eckart-Young): with
    W = U S V^T, B = U_r S_r / s and A = V_r^T (all of S in B, as the official code), so
    s B A = U_r S_r V_r^T; the residual beyond rank r is dropped; base weights never change.
    Round 0 (W = 0, no SVD direction): PEFT's default init at rank r (A random, B = 0).
    """

    name = "flexlora"
    summary = "FlexLoRA: weighted mean of the clients' full products s*B_k A_k, redistributed by truncated SVD."
    reference = (
        "Bai et al., Federated Fine-tuning of Large Language Models under Heterogeneous Tasks and Client Resources, "
        "arXiv:2402.11505"
    )
    # No sum rule: the mean needs each client's product B_k A_k, which is not a sum of its padded factors
    # (clients would have to upload dense d_out x d_in products instead).
    sum_rule = None
    dense_state = True

    def __init__(self, spec: FederationSpec):
        super().__init__(spec)
        # module -> (the delta tensor it was computed from, its version counter, U, S, Vh):
        # broadcasting to many clients of one round reuses one SVD per module.
        self._svd_cache: dict[str, tuple[Tensor, int, Tensor, Tensor, Tensor]] = {}

    def init_state(self, generator: torch.Generator) -> GlobalState:
        return GlobalState(tensors=zero_dense_state(self.spec))

    def _svd(self, module: str, delta: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        hit = self._svd_cache.get(module)
        if hit is not None and hit[0] is delta and hit[1] == delta._version:
            return hit[2], hit[3], hit[4]
        u, s, vh = torch.linalg.svd(delta.to(torch.float64), full_matrices=False)
        self._svd_cache[module] = (delta, delta._version, u, s, vh)
        return u, s, vh

    def factorise(self, state: GlobalState, module: str, rank: int) -> tuple[Tensor, Tensor]:
        """(A, B) of rank ``rank`` with s * B A = the rank-``rank`` SVD truncation of the module's W.

        If rank exceeds min(d_out, d_in), the extra dimensions carry nothing (B columns zero) and
        are left for later use; A's extra rows are zero too.
        """
        delta = state_factor(state, module, "delta")
        u, sv, vh = self._svd(module, delta)
        k = min(rank, sv.numel())
        b = u[:, :k] * sv[:k] / self.spec.scale
        a = vh[:k]
        if k < rank:
            a = torch.cat([a, a.new_zeros(rank - k, a.shape[1])], dim=0)
            b = torch.cat([b, b.new_zeros(b.shape[0], rank - k)], dim=1)
        return a.to(torch.float32).contiguous(), b.to(torch.float32).contiguous()

    def broadcast(self, state: GlobalState, rank: int, generator: torch.Generator | None = None) -> Broadcast:
        rank = check_rank(self.spec, rank)
        adapter: dict[str, Tensor] = {}
        gen = None
        for module in self.spec.modules:
            delta = state_factor(state, module, "delta")
            if not torch.any(delta):
                # SVD of zero has no direction to train along: start from PEFT's default init instead.
                if gen is None:
                    gen = default_generator(generator)
                a, b = module_lora_init(self.spec, module, rank, gen)
            else:
                a, b = self.factorise(state, module, rank)
            adapter[key(module, "lora_A")] = a
            adapter[key(module, "lora_B")] = b
        return Broadcast(adapter=adapter)

    def plan(self, rank: int) -> TrainPlan:
        rank = check_rank(self.spec, rank)
        return TrainPlan(rank=rank, truncations=(rank,), mode="off")

    def aggregate(self, state: GlobalState, updates: Iterable[ClientUpdate]) -> GlobalState:
        out = copy_state(state)
        s = self.spec.scale
        sums: dict[str, Tensor] = {}
        total = 0.0
        for update in updates:  # streamed: one dense float64 sum per module, flat in the number of clients
            p = data_weight(update)
            for module, a, b in client_factors(self.spec, update, max_rank=self.spec.max_rank):
                if module not in sums:
                    delta = state_factor(state, module, "delta")
                    sums[module] = torch.zeros(delta.shape, dtype=torch.float64, device=delta.device)
                prod = b.to(device=sums[module].device, dtype=torch.float64) @ a.to(
                    device=sums[module].device, dtype=torch.float64
                )
                sums[module].add_(prod, alpha=p * s)
            total += p
        if total <= 0:
            return out  # no update, or only zero-weight ones: nothing to average
        for module, acc in sums.items():
            name = key(module, "delta")
            out.tensors[name] = (acc / total).to(state.tensors[name].dtype)
        return out
