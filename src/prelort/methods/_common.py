"""Helpers shared by the method files: state copies, update checks, prefix adapters.

Private (leading underscore): the registry's auto-discovery skips this module.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..factor_sums import FactorSums

import torch
from torch import Tensor

from ..rank_geometry import adapter_prefix, factor_shape
from .base import Broadcast, ClientUpdate, FederationSpec, GlobalState, Method, SumRule, key, lora_init, split_key


def copy_state(state: GlobalState, replaced: Mapping[str, Tensor] | None = None) -> GlobalState:
    """A deep copy (cloned tensors, copied meta): aggregate never hands back the caller's objects.

    ``replaced``: new tensors (already the caller's own) that take the place of those names
    instead of clones, so a round does not copy tensors it is about to overwrite.
    """
    replaced = replaced or {}
    return GlobalState(
        tensors={name: replaced[name] if name in replaced else t.detach().clone() for name, t in state.tensors.items()},
        meta=copy.deepcopy(state.meta),
    )


def check_rank(spec: FederationSpec, rank: int) -> int:
    """``rank`` as an int in [1, R]; a clear error otherwise."""
    if isinstance(rank, bool) or int(rank) != rank:
        raise ValueError(f"rank must be an integer, got {rank!r}")
    rank = int(rank)
    if not 1 <= rank <= spec.max_rank:
        raise ValueError(f"rank {rank} outside [1, {spec.max_rank}] (R = the largest client rank)")
    return rank


def data_weight(update: ClientUpdate) -> float:
    """p_k = the client's number of training examples (>= 0)."""
    n = update.num_examples
    if isinstance(n, bool) or not isinstance(n, (int, float)) or not math.isfinite(n) or n < 0:
        raise ValueError(f"client {update.client}: num_examples must be a number >= 0, got {n!r}")
    return float(n)


def state_factor(state: GlobalState, module: str, kind: str) -> Tensor:
    name = key(module, kind)
    if name not in state.tensors:
        raise KeyError(f"global state has no tensor {name!r}")
    return state.tensors[name]


def client_factors(
    spec: FederationSpec, update: ClientUpdate, *, max_rank: int
) -> Iterator[tuple[str, Tensor, Tensor]]:
    """(module, A_k, B_k) for every adapted module, after checking names and shapes.

    A_k is (r_k x d_in), B_k is (d_out x r_k) with r_k = ``update.rank`` in [1, max_rank].
    """
    rank = update.rank
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= max_rank:
        raise ValueError(f"client {update.client}: rank {rank!r} outside [1, {max_rank}]")
    for module, (d_out, d_in) in spec.modules.items():
        name_a, name_b = key(module, "lora_A"), key(module, "lora_B")
        for name in (name_a, name_b):
            if name not in update.tensors:
                raise ValueError(f"client {update.client}: update has no tensor {name!r}")
        for name, kind in ((name_a, "lora_A"), (name_b, "lora_B")):
            shape, expected = tuple(update.tensors[name].shape), factor_shape(kind, rank, d_out, d_in)
            if shape != expected:
                raise ValueError(f"client {update.client}: {name} has shape {shape}, expected {expected}")
        yield module, update.tensors[name_a], update.tensors[name_b]


def prefix_adapter(spec: FederationSpec, state: GlobalState, rank: int) -> dict[str, Tensor]:
    """The first ``rank`` dimensions of the global factors (copies: the client may train them in place)."""
    factors: dict[str, Tensor] = {}
    for module in spec.modules:
        a = state_factor(state, module, "lora_A")
        b = state_factor(state, module, "lora_B")
        if rank > a.shape[0]:
            raise ValueError(f"cannot take rank {rank} from a global adapter of rank {a.shape[0]}")
        factors[key(module, "lora_A")], factors[key(module, "lora_B")] = a, b
    return {name: x.to(torch.float32).clone() for name, x in adapter_prefix(factors, rank).items()}


def module_lora_init(
    spec: FederationSpec, module: str, rank: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """PEFT's default init (A kaiming-uniform, B = 0) for one module, via :func:`lora_init`."""
    one = FederationSpec(modules={module: spec.modules[module]}, client_ranks=spec.client_ranks, alpha=spec.alpha)
    init = lora_init(one, rank, generator)
    return init[key(module, "lora_A")], init[key(module, "lora_B")]


def default_generator(generator: torch.Generator | None) -> torch.Generator:
    """The caller's generator, or a fixed-seed one so a fresh init stays reproducible."""
    return generator if generator is not None else torch.Generator().manual_seed(0)


def zero_dense_state(spec: FederationSpec) -> dict[str, Tensor]:
    """``<module>.delta`` = zeros (d_out x d_in) for every module: the dense methods' round-0 state."""
    return {key(module, "delta"): torch.zeros(d_out, d_in) for module, (d_out, d_in) in spec.modules.items()}


def empty_factor_sums(shapes: "Mapping[str, Sequence[int]]", device=None) -> "FactorSums":
    """Zero :class:`~prelort.factor_sums.FactorSums` over the global LoRA factors; ``shapes``: tensor name
    (``<module>.lora_A`` / ``.lora_B``) -> the global factor's shape."""
    from ..factor_sums import FactorSums
    from ..rank_geometry import rank_dim

    dims = {name: rank_dim(name.rpartition(".")[2]) for name in shapes}
    return FactorSums(shapes, dims, device=device)


def add_factors(sums: "FactorSums", factors: "Iterable[tuple[str, Tensor, Tensor]]", weight: float) -> None:
    """Fold one client's (module, A_k, B_k) factors into the sums with weight ``weight``."""
    tensors: dict[str, Tensor] = {}
    for module, a, b in factors:
        tensors[key(module, "lora_A")] = a
        tensors[key(module, "lora_B")] = b
    sums.add(tensors, weight)


def finish_from_sums(rule: SumRule, state: GlobalState, num: Mapping[str, Tensor], den: Mapping[str, Tensor]
                     ) -> dict[str, Tensor]:
    """The new global tensors from the (possibly noised or securely aggregated) sums.

    ``segment``: mean_from_sums(N, D) (uncovered dimensions keep their previous value);
    ``padded``:  N / D_0 (every client covers dimension 0, so D_0 = sum_k p_k); previous if D_0 = 0.
    """
    from ..factor_sums import mean_from_sums
    from ..rank_geometry import rank_dim

    out: dict[str, Tensor] = {}
    for name, previous in state.tensors.items():
        if name not in num or name not in den:
            raise ValueError(f"sums lack global tensor {name!r}")
        n, d = num[name].to(torch.float64), den[name].to(torch.float64)
        _, kind = split_key(name)
        if tuple(n.shape) != tuple(previous.shape) or d.shape != (previous.shape[rank_dim(kind)],):
            raise ValueError(f"sums of {name!r} have shapes {tuple(n.shape)}, {tuple(d.shape)}; the global tensor "
                             f"has {tuple(previous.shape)}")
        if rule == "segment":
            out[name] = mean_from_sums(n, d, previous, rank_dim(kind))
        elif float(d[0]) > 0:
            out[name] = (n / d[0]).to(previous.dtype)
        else:
            out[name] = previous.clone()
    return out


def lora_shapes(state: GlobalState) -> dict[str, tuple[int, ...]]:
    """name -> shape of the state's LoRA factors."""
    return {name: tuple(t.shape) for name, t in state.tensors.items() if name.endswith((".lora_A", ".lora_B"))}


class PrefixLoRA(Method):
    """A global LoRA of rank R (PEFT init: A random, B = 0) of which a rank-r client receives the prefix."""

    def init_state(self, generator: torch.Generator) -> GlobalState:
        return GlobalState(tensors=lora_init(self.spec, self.spec.max_rank, generator))

    def broadcast(self, state: GlobalState, rank: int, generator: torch.Generator | None = None) -> Broadcast:
        return Broadcast(adapter=prefix_adapter(self.spec, state, check_rank(self.spec, rank)))
