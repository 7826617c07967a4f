"""The interface every federated method implements, and the data it passes around.

A method answers three questions (docs/design.md section 3), with tensors only - no I/O, no engine:
  * what does a client of rank r receive?            ``broadcast``
  * what does that client train?                      ``plan``
  * how does the server turn a round's updates into the new global state?  ``aggregate``
Evaluation at rank tier t uses ``tier`` (by default: what a rank-t client receives).

Tensor naming follows the wire/checkpoint format (docs/design.md section 7):
``<module>.lora_A`` (r x d_in), ``<module>.lora_B`` (d_out x r), ``<module>.delta`` (d_out x d_in),
where <module> is the module's full name in the base model.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

NestedMode = Literal["all", "sample", "sandwich", "off", "sample_width"]


def key(module: str, kind: str) -> str:
    """Tensor name of one factor: ``key("model.layers.0.self_attn.q_proj", "lora_A")``."""
    return f"{module}.{kind}"


def split_key(name: str) -> tuple[str, str]:
    """Inverse of :func:`key`: ``"m.x.lora_A" -> ("m.x", "lora_A")``."""
    module, _, kind = name.rpartition(".")
    return module, kind


@dataclass(frozen=True)
class FederationSpec:
    """What every method needs to know about the federation.

    ``modules`` maps each adapted module's full name to its (d_out, d_in).
    ``client_ranks`` is the rank of each client (index = client id), already cycled to clients.num.
    ``options`` holds method-specific settings from the config (e.g. HetLoRA's pruning).
    """

    modules: dict[str, tuple[int, int]]
    client_ranks: tuple[int, ...]
    alpha: float
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def max_rank(self) -> int:
        """R: the largest rank in the federation, the global adapter's rank."""
        return max(self.client_ranks)

    @property
    def min_rank(self) -> int:
        return min(self.client_ranks)

    @property
    def scale(self) -> float:
        """s = alpha / R: ONE constant for the whole federation (never alpha / t)."""
        return self.alpha / self.max_rank

    @property
    def distinct_ranks(self) -> list[int]:
        return sorted(set(self.client_ranks))


@dataclass
class GlobalState:
    """The server's state: tensors (saved as safetensors) and JSON-able method metadata."""

    tensors: dict[str, Tensor]
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class ClientUpdate:
    """One client's result of a round: its adapter at its rank, plus metadata (docs/design.md section 7)."""

    client: int
    rank: int
    num_examples: int
    tensors: dict[str, Tensor]
    round: int = 0
    method: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Broadcast:
    """What a client of some rank starts the round from.

    ``adapter``: ``<module>.lora_A`` / ``.lora_B`` at the client's rank (its starting LoRA).
    ``base_delta``: ``<module>.delta`` dense matrices added to the frozen base weights (FLoRA), or None.
    """

    adapter: dict[str, Tensor]
    base_delta: dict[str, Tensor] | None = None


@dataclass(frozen=True)
class PrunePlan:
    """HetLoRA self-pruning: regularise the tail dimensions [start, rank) with strength ``lam``;
    if the tail norm product ends the round smaller than it started, shrink the rank to ``start``."""

    start: int
    lam: float


@dataclass(frozen=True)
class TrainPlan:
    """What a client trains: its rank, the truncations its loss is taken at, and how."""

    rank: int
    truncations: tuple[int, ...]
    mode: NestedMode = "off"
    prune: PrunePlan | None = None


def lora_init(spec: FederationSpec, rank: int, generator: torch.Generator) -> dict[str, Tensor]:
    """PEFT's default LoRA init at ``rank``: A ~ kaiming-uniform(a=sqrt(5)) (bound 1/sqrt(d_in)), B = 0."""
    out: dict[str, Tensor] = {}
    for module, (d_out, d_in) in spec.modules.items():
        bound = 1.0 / math.sqrt(d_in)
        a = torch.empty(rank, d_in).uniform_(-bound, bound, generator=generator)
        out[key(module, "lora_A")] = a
        out[key(module, "lora_B")] = torch.zeros(d_out, rank)
    return out


class Method(ABC):
    """Base class of a federated method. Subclass, set the class attributes, implement the three methods."""

    name: ClassVar[str]
    summary: ClassVar[str]  # one line, shown by `prelort methods`
    reference: ClassVar[str] = ""
    # True when the aggregate is a function of plain sums of fixed-shape padded tensors
    # (so secure aggregation can carry it).
    sum_aggregatable: ClassVar[bool] = False
    # True when the global state is dense ``<module>.delta`` matrices rather than LoRA factors.
    dense_state: ClassVar[bool] = False

    def __init__(self, spec: FederationSpec):
        self.spec = spec

    # -- who trains at which rank -------------------------------------------------------------
    def client_rank(self, client: int, state: GlobalState) -> int:
        """The rank client ``client`` trains at this round (default: its configured rank)."""
        return self.spec.client_ranks[client]

    # -- the three questions --------------------------------------------------------------------
    @abstractmethod
    def init_state(self, generator: torch.Generator) -> GlobalState:
        """The round-0 global state."""

    @abstractmethod
    def broadcast(self, state: GlobalState, rank: int, generator: torch.Generator | None = None) -> Broadcast:
        """What a client of ``rank`` receives (``generator`` seeds any fresh init, e.g. FLoRA)."""

    @abstractmethod
    def plan(self, rank: int) -> TrainPlan:
        """What a client of ``rank`` trains."""

    @abstractmethod
    def aggregate(self, state: GlobalState, updates: Iterable[ClientUpdate]) -> GlobalState:
        """The new global state from this round's (validated) updates. Must not modify ``state``."""

    def check_update(self, update: ClientUpdate) -> None:
        """Raise ValueError (a one-line reason) if a method-specific part of an already validated update
        (names, shapes, finite values, rank bounds) cannot be aggregated by this method; the server calls
        it for every update before :meth:`aggregate` (default: nothing method-specific)."""

    # -- evaluation ------------------------------------------------------------------------------
    def tier(self, state: GlobalState, t: int) -> Broadcast:
        """The global model as a client of rank ``t`` would receive it (used by evaluation/export)."""
        return self.broadcast(state, t, generator=torch.Generator().manual_seed(0))
