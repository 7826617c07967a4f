"""The toolkit for writing a method: what the built-in methods are made of, public for any method author.

``from prelort.methods.toolkit import ...`` (a method file outside prelort, e.g. tests/methods/trimmed_mean.py,
uses exactly these). Three kinds of thing:

* checks and weights of an update: :func:`check_rank` (a rank in [1, R]), :func:`client_factors` (an update's
  (module, A_k, B_k) after checking names and shapes), :func:`data_weight` (p_k = number of examples);
* the global state: :func:`copy_state`, :func:`state_factor`, :func:`prefix_adapter` (what a rank-r client
  receives of a rank-R LoRA), :func:`lora_init` / :func:`module_lora_init` (PEFT's init),
  :func:`zero_dense_state`, :func:`default_generator`, :func:`key` / :func:`split_key` / :func:`rank_dim`
  (tensor names and rank axes);
* the two padded sums and the templates: :func:`fold_updates` (a round's sums through the method's hooks),
  :func:`empty_factor_sums`, :func:`add_factors`, :func:`lora_shapes`; :class:`PrefixLoRA` (a rank-R LoRA whose prefix a client receives: ``init_state`` and ``broadcast``) and
  :class:`SumRuleMethod` (``aggregate`` from the method's ``sum_rule``: declare the rule, inherit the round).

Registered methods are found by the registry's discovery, which skips this module (it registers none).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ..factor_sums import FactorSums
from ..rank_geometry import adapter_prefix, pad, rank_dim
from ..robust import coordinatewise
from .base import (
    Broadcast,
    ClientUpdate,
    FederationSpec,
    GlobalState,
    Method,
    client_factors,
    data_weight,
    key,
    lora_init,
    split_key,
)

__all__ = [
    "PrefixLoRA",
    "SumRuleMethod",
    "add_factors",
    "check_rank",
    "client_factors",
    "coordinatewise_factors",
    "copy_state",
    "data_weight",
    "default_generator",
    "empty_factor_sums",
    "fold_updates",
    "key",
    "lora_init",
    "lora_shapes",
    "module_lora_init",
    "prefix_adapter",
    "rank_dim",
    "split_key",
    "state_factor",
    "zero_dense_state",
]


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


def state_factor(state: GlobalState, module: str, kind: str) -> Tensor:
    """The global tensor ``<module>.<kind>``; KeyError naming it if the state has none."""
    name = key(module, kind)
    if name not in state.tensors:
        raise KeyError(f"global state has no tensor {name!r}")
    return state.tensors[name]


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


def module_lora_init(spec: FederationSpec, module: str, rank: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
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


def empty_factor_sums(shapes: Mapping[str, Sequence[int]], device=None) -> FactorSums:
    """Zero :class:`~prelort.factor_sums.FactorSums` over the global LoRA factors; ``shapes``: tensor name
    (``<module>.lora_A`` / ``.lora_B``) -> the global factor's shape."""
    dims = {name: rank_dim(split_key(name)[1]) for name in shapes}
    return FactorSums(shapes, dims, device=device)


def add_factors(sums: FactorSums, factors: Iterable[tuple[str, Tensor, Tensor]], weight: float) -> None:
    """Fold one client's (module, A_k, B_k) factors into the sums with weight ``weight``."""
    tensors: dict[str, Tensor] = {}
    for module, a, b in factors:
        tensors[key(module, "lora_A")] = a
        tensors[key(module, "lora_B")] = b
    sums.add(tensors, weight)


def fold_updates(
    method: Method,
    shapes: Mapping[str, Sequence[int]],
    updates: Iterable[ClientUpdate],
    weights: Sequence[float] | None = None,
    *,
    device=None,
) -> tuple[FactorSums, list[tuple[int, dict[str, Any]]]]:
    """A round's two padded sums over the global factors ``shapes`` (name -> shape): each update's
    ``method.contributed_factors`` (which checks it) folded in with weight ``method.client_weight`` - or, given
    ``weights`` (one per update), with those (client-level DP: 1) - and the (client, metadata) pairs
    ``method.after_round`` reads. One pass: an update can be dropped once it is folded in."""
    sums = empty_factor_sums(shapes, device=device)
    seen: list[tuple[int, dict[str, Any]]] = []
    given = iter(weights) if weights is not None else None
    for update in updates:
        factors = method.contributed_factors(update)
        add_factors(sums, factors, method.client_weight(update, factors) if given is None else next(given))
        seen.append((update.client, dict(update.meta)))  # only the small metadata is kept
    return sums, seen


def coordinatewise_factors(
    method: Method, state: GlobalState, updates: Iterable[ClientUpdate], aggregator: str, trim_fraction: float
) -> tuple[dict[str, Tensor], list[tuple[int, dict[str, Any]]]]:
    """The robust counterpart of :func:`fold_updates` and the sum rule's finish: each global factor's new value
    from the updates' ``method.contributed_factors`` by :func:`prelort.robust.coordinatewise` (unweighted, as
    Flower's FedMedian and FedTrimmedAvg), within each segment over the clients the method's rule averages it
    over - ``segment``: per run of dimensions covered by the same clients, those clients (a dimension no client
    covers keeps its value); ``padded``: every client, zero-padded to R. Returns the new LoRA factors and the
    (client, metadata) pairs ``after_round`` reads."""
    collected: dict[str, list[Tensor]] = {}
    seen: list[tuple[int, dict[str, Any]]] = []
    for update in updates:
        for module, a, b in method.contributed_factors(update):
            collected.setdefault(key(module, "lora_A"), []).append(a)
            collected.setdefault(key(module, "lora_B"), []).append(b)
        seen.append((update.client, dict(update.meta)))
    out: dict[str, Tensor] = {}
    for name in lora_shapes(state):
        prev, xs = state.tensors[name], collected.get(name, [])
        dim = rank_dim(split_key(name)[1])
        full = prev.shape[dim]
        new = prev.detach().clone()
        if xs and method.sum_rule == "padded":
            stack = torch.stack([pad(x.to(prev.dtype), full, dim) for x in xs])
            new.copy_(coordinatewise(stack, aggregator, trim_fraction))
        elif xs:
            cuts = sorted({0, *(x.shape[dim] for x in xs)})
            for lo, hi in zip(cuts, cuts[1:]):
                covering = [x.narrow(dim, lo, hi - lo) for x in xs if x.shape[dim] >= hi]
                value = coordinatewise(torch.stack(covering).to(prev.dtype), aggregator, trim_fraction)
                new.narrow(dim, lo, hi - lo).copy_(value)
        out[name] = new
    return out, seen


def lora_shapes(state: GlobalState) -> dict[str, tuple[int, ...]]:
    """name -> shape of the state's LoRA factors."""
    return {name: tuple(t.shape) for name, t in state.tensors.items() if name.endswith((".lora_A", ".lora_B"))}


class PrefixLoRA(Method):
    """A global LoRA of rank R (PEFT init: A random, B = 0) of which a rank-r client receives the prefix."""

    def init_state(self, generator: torch.Generator) -> GlobalState:
        return GlobalState(tensors=lora_init(self.spec, self.spec.max_rank, generator))

    def broadcast(self, state: GlobalState, rank: int, generator: torch.Generator | None = None) -> Broadcast:
        return Broadcast(adapter=prefix_adapter(self.spec, state, check_rank(self.spec, rank)))


class SumRuleMethod(Method):
    """The template of a method whose round is a function of the two padded sums: declare ``sum_rule``
    (``"segment"`` or ``"padded"``) and inherit ``aggregate``:

        fold each update's ``contributed_factors`` with weight ``client_weight`` into the sums,
        finish them with ``finish_sums`` (the rule), then ``after_round`` on the updates' metadata.

    A plain round, client-level DP (``prelort.privacy``) and the SecAgg+ finish (``prelort.secure_sums``) call the
    same hooks, so overriding one (HetLoRA: the factors a pruned client contributes, its norm weight, its pruned
    ranks) changes every path alike. Memory is flat in the number of clients: an update is folded in and dropped.
    """

    def __init__(self, spec: FederationSpec):
        if self.sum_rule is None:
            raise TypeError(f"{type(self).__name__}: a SumRuleMethod declares its sum_rule ('segment' or 'padded')")
        super().__init__(spec)

    def aggregate(self, state: GlobalState, updates: Iterable[ClientUpdate]) -> GlobalState:
        device = next(iter(state.tensors.values())).device
        sums, seen = fold_updates(self, lora_shapes(state), updates, device=device)
        # compact numerators: dimensions beyond the largest rank seen are zero and never built
        num = {name: acc.compact_num for name, acc in sums.items()}
        den = {name: acc.den for name, acc in sums.items()}
        out = copy_state(state, self.finish_sums(state, num, den))
        self.after_round(out, seen)
        return out

    def aggregate_robust(
        self, state: GlobalState, updates: Iterable[ClientUpdate], aggregator: str, trim_fraction: float
    ) -> GlobalState:
        """:meth:`aggregate` with the rule's weighted mean replaced by ``aggregator`` over the same clients
        (:func:`coordinatewise_factors`), then ``after_round`` as in every round."""
        tensors, seen = coordinatewise_factors(self, state, updates, aggregator, trim_fraction)
        out = copy_state(state, tensors)
        self.after_round(out, seen)
        return out
