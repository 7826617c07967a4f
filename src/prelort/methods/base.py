"""The interface every federated method implements, and the data it passes around.

A method answers three questions (docs/design.md section 3), with tensors only - no I/O, no engine:
  * what does a client of rank r receive?            ``broadcast``
  * what does that client train?                      ``plan``
  * how does the server turn a round's updates into the new global state?  ``aggregate``
Evaluation at rank tier t uses ``tier`` (by default: what a rank-t client receives).

Everything outside methods/ asks a method through this interface, never by its name or class: its config
options (``options_model``, a pydantic model in the method's own file, read from the YAML section named
after the method), how a client is weighted (``client_weight``), which factors it contributes
(``contributed_factors``), how the two padded sums finish (``sum_rule`` / ``finish_sums``: what
differential privacy and secure aggregation need; ``sum_aggregatable`` follows from it; a method with a sum
rule inherits its ``aggregate`` from :class:`prelort.methods.toolkit.SumRuleMethod`), whether a weight
depends on the update (``weight_depends_on_update``, ``weight_bound``), what happens after a round
(``after_round``), how a tier is exported as a PEFT adapter (``export_adapter``) and whether every client
trains one rank (``trains_one_rank``). The local objective modes are :data:`NESTED_MODES`.

The client side is the method's too: what a client adds to its local training and the metadata it reports
(``local_training``, a :class:`LocalTraining`, from the plan's ``extra``), how the server checks that metadata
(``check_update``; sent in the clear under secure aggregation: ``clear_meta_fields``, ``check_clear_meta``) and
at which rank it counts an update from it (``counted_rank``).

Tensor naming follows the wire/checkpoint format (docs/design.md section 7):
``<module>.lora_A`` (r x d_in), ``<module>.lora_B`` (d_out x r), ``<module>.delta`` (d_out x d_in),
where <module> is the module's full name in the base model.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, get_args

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor

# SumRule (how a method finishes the two padded sums: segment or padded) is defined with the sums
from ..factor_sums import SumRule, finish_from_sums
from ..rank_geometry import factor_shape

# How a client's local loss covers its nested truncations (docs/design.md section 2; train.py runs them):
# the one definition of the modes; config (PreLort's options), methods and the trainer read it from here.
NestedMode = Literal["all", "sample", "sandwich", "off", "sample_width", "cycle"]
NESTED_MODES: tuple[str, ...] = get_args(NestedMode)


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
    ``options`` holds the methods' settings from the config, flat, as each method names them
    (:meth:`Method.spec_options`: ``nested``, ``hetlora_gamma``, ...); checkpoints record them.
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
class TrainPlan:
    """What a client trains: its rank, the truncations its loss is taken at, and how.

    ``extra``: the method's own instructions to its client side (JSON values, read by
    :meth:`Method.local_training`; e.g. HetLoRA's pruning); empty: plain local training."""

    rank: int
    truncations: tuple[int, ...]
    mode: NestedMode = "off"
    extra: dict[str, Any] = field(default_factory=dict)


class LocalTraining:
    """A method's part in one client's local training (:meth:`Method.local_training`; the default adds nothing).

    The trainer calls it with the adapter's trainable factors, ``[(A_m, B_m)]`` per adapted module (A: r x d_in,
    B: d_out x r, r the plan's rank): ``round_starts`` before the first step, ``penalty`` at every optimizer
    step (its gradient is added to the step's), ``round_ends`` after the last step, then ``finish``, which
    decides the rank the update is sent at and adds the method's fields to the update's metadata."""

    # Whether ``penalty`` reaches dimensions above a step's truncations, so those move on every step: the
    # trainer's lazy-Adam guard (which restores dimensions outside a step's objective) then stays off.
    penalty_moves_all_dims: bool = False

    def round_starts(self, factors: list[tuple[Tensor, Tensor]]) -> None:
        """Before the first optimizer step."""

    def penalty(self, factors: list[tuple[Tensor, Tensor]]) -> Tensor | None:
        """A differentiable term added to every step's objective, or None (nothing to add)."""
        return None

    def round_ends(self, factors: list[tuple[Tensor, Tensor]]) -> None:
        """After the last optimizer step."""

    def finish(self, rank: int, meta: dict[str, Any]) -> int:
        """The rank (at most ``rank``, the rank trained) the update is sent at; adds the method's fields to the
        update's metadata ``meta`` (in place; the server checks them with :meth:`Method.check_update`)."""
        return rank


class MethodOptions(BaseModel):
    """Base of a method's config options: the YAML section named after the method (``hetlora: {gamma: 0.9}``).

    Every field carries a default and its help text (docs/configuration.md is generated from them); unknown
    keys and non-finite numbers are refused, as everywhere in the config."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def lora_init(spec: FederationSpec, rank: int, generator: torch.Generator) -> dict[str, Tensor]:
    """PEFT's default LoRA init at ``rank``: A ~ kaiming-uniform(a=sqrt(5)) (bound 1/sqrt(d_in)), B = 0."""
    out: dict[str, Tensor] = {}
    for module, (d_out, d_in) in spec.modules.items():
        bound = 1.0 / math.sqrt(d_in)
        a = torch.empty(rank, d_in).uniform_(-bound, bound, generator=generator)
        out[key(module, "lora_A")] = a
        out[key(module, "lora_B")] = torch.zeros(d_out, rank)
    return out


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


def data_weight(update: ClientUpdate) -> float:
    """p_k = the client's number of training examples (>= 0)."""
    n = update.num_examples
    if isinstance(n, bool) or not isinstance(n, (int, float)) or not math.isfinite(n) or n < 0:
        raise ValueError(f"client {update.client}: num_examples must be a number >= 0, got {n!r}")
    return float(n)


class Method(ABC):
    """Base class of a federated method. Subclass, set the class attributes, implement the three methods."""

    name: ClassVar[str]
    summary: ClassVar[str]  # one line, shown by `prelort methods`
    reference: ClassVar[str] = ""
    # True when the global state is dense ``<module>.delta`` matrices rather than LoRA factors.
    dense_state: ClassVar[bool] = False
    # The method's config options (a MethodOptions model declared in its file), the YAML section named after
    # the method; None: it has none. ``spec.options`` carries them flat as ``options_prefix + field``.
    options_model: ClassVar[type[MethodOptions] | None] = None
    options_prefix: ClassVar[str] = ""
    # How the two padded sums finish (module docstring); None: the aggregate is not a function of plain sums
    # of fixed-shape padded factors (it needs each client's own tensors), so neither client-level DP on the
    # sums nor secure aggregation can carry it.
    sum_rule: ClassVar[SumRule | None] = None
    # Set from sum_rule (never declared by a method): the one flag the config check, DP and the SecAgg+ finish ask.
    sum_aggregatable: ClassVar[bool] = False
    # True when a client's weight depends on its own update (HetLoRA's ||B A||_F), not only on public counts:
    # secure aggregation then needs a public bound on it (``weight_bound``) and DP replaces it with 1.
    weight_depends_on_update: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        declared = cls.__dict__.get("sum_aggregatable")
        if declared is not None and bool(declared) != (cls.sum_rule is not None):
            raise TypeError(
                f"{cls.__name__}: sum_aggregatable follows from sum_rule; set sum_rule "
                "('segment' or 'padded') instead of declaring it"
            )
        if cls.sum_rule is not None and cls.sum_rule not in get_args(SumRule):
            raise TypeError(
                f"{cls.__name__}: sum_rule must be one of {', '.join(get_args(SumRule))} or None, got {cls.sum_rule!r}"
            )
        cls.sum_aggregatable = cls.sum_rule is not None

    def __init__(self, spec: FederationSpec):
        self.spec = spec

    # -- config options --------------------------------------------------------------------------------
    @classmethod
    def spec_options(cls, section: MethodOptions | None = None) -> dict[str, Any]:
        """The method's options as ``FederationSpec.options`` and checkpoints carry them: ``options_prefix + field
        -> value`` (JSON values) from its validated config ``section`` (None: the defaults)."""
        if cls.options_model is None:
            return {}
        section = section if section is not None else cls.options_model()
        return {cls.options_prefix + k: v for k, v in section.model_dump(mode="json").items()}

    def option(self, field: str) -> Any:
        """Option ``field`` from ``spec.options`` (key ``options_prefix + field``); its default when absent."""
        if self.options_model is None or field not in self.options_model.model_fields:
            raise KeyError(f"method {self.name!r} has no option {field!r}")
        flat = self.options_prefix + field
        if flat in self.spec.options:
            return self.spec.options[flat]
        return self.options_model.model_fields[field].get_default(call_default_factory=True)

    # -- who trains at which rank -------------------------------------------------------------
    def client_rank(self, client: int, state: GlobalState) -> int:
        """The rank client ``client`` trains at this round (default: its configured rank)."""
        return self.spec.client_ranks[client]

    @property
    def trains_one_rank(self) -> bool:
        """Whether every client trains the same rank (default: all configured ranks are equal), so a round's
        new state does not show which rank tiers were sampled (privacy accounting)."""
        return len(set(self.spec.client_ranks)) == 1

    # -- the client side: local training and the metadata it reports ------------------------------------
    # Fields of an update's metadata a client sends in the clear with a secure-aggregation upload (besides its
    # loss), for the method's bookkeeping (``after_round``); the update itself is never seen.
    clear_meta_fields: ClassVar[tuple[str, ...]] = ()

    def local_training(self, plan: TrainPlan) -> LocalTraining:
        """What a client adds to its local training under ``plan`` (the plan the server sent, ``plan.extra``
        included), built on the client from the run's config; ValueError for an ``extra`` it cannot carry out
        (default: nothing, and ``extra`` must be empty)."""
        if plan.extra:
            raise ValueError(f"method {self.name!r} takes no plan extra, got {sorted(plan.extra)}")
        return LocalTraining()

    def check_clear_meta(self, meta: Mapping[str, Any], rank: int) -> dict[str, str]:
        """The fields of the clear metadata ``meta`` of a client that trained at ``rank`` that the method's
        bookkeeping must ignore, each with a one-line reason (the server logs it and drops the field; default:
        none)."""
        return {}

    def counted_rank(self, meta: Mapping[str, Any], rank: int) -> int:
        """The rank an update counts at, from the (checked) metadata of a client that trained at ``rank``
        (default: ``rank``)."""
        return rank

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

    def aggregate_robust(
        self, state: GlobalState, updates: Iterable[ClientUpdate], aggregator: str, trim_fraction: float
    ) -> GlobalState:
        """The new global state with the mean of :meth:`aggregate` replaced by a coordinate-wise ``aggregator``
        (``robust.aggregator``: trimmed_mean or median, :func:`prelort.robust.coordinatewise`). Only a method whose
        rule is a mean of its clients' factors has one (:class:`prelort.methods.toolkit.SumRuleMethod`); the
        default refuses."""
        raise ValueError(
            f"robust.aggregator={aggregator}: method {self.name!r} has no sum rule, so its aggregate is not a mean "
            "of the clients' factors that a coordinate-wise statistic could replace"
        )

    def check_update(self, update: ClientUpdate) -> None:
        """Raise ValueError (a one-line reason) if a method-specific part of an already validated update
        (names, shapes, finite values, rank bounds) cannot be aggregated by this method; the server calls
        it for every update before :meth:`aggregate` (default: nothing method-specific)."""

    def after_round(self, state: GlobalState, clients: list[tuple[int, dict[str, Any]]]) -> None:
        """Method bookkeeping on a round's new ``state`` (in place) from the (client, update metadata) pairs it
        aggregated; also called after a round finished from sums (DP, secure aggregation), where only the
        metadata a client sent in the clear is known (default: nothing)."""

    # -- the two padded sums (differential privacy, secure aggregation) ----------------------------------
    def contributed_factors(self, update: ClientUpdate) -> list[tuple[str, Tensor, Tensor]]:
        """(module, A_k, B_k) of one update as they enter the sums, checked against the federation's modules
        (default: the whole adapter, rank at most R)."""
        return list(client_factors(self.spec, update, max_rank=self.spec.max_rank))

    def client_weight(self, update: ClientUpdate, factors: list[tuple[str, Tensor, Tensor]]) -> float:
        """The client's unnormalised aggregation weight w_k, given its :meth:`contributed_factors` (default: its
        number of training examples). A client computes it itself before secure aggregation."""
        return data_weight(update)

    def weight_bound(self, total_examples: int, max_update_norm: float | None) -> float | None:
        """A public bound W on every client's weight (SecAgg+ quantises w_k / W), or None when the config gives
        none. Default (weights = numbers of examples): a client holds at most ``total_examples``."""
        return float(total_examples)

    def finish_sums(
        self, state: GlobalState, num: Mapping[str, Tensor], den: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        """The new global tensors from the (plain, noised or securely aggregated) sums, by :attr:`sum_rule`
        (:func:`prelort.factor_sums.finish_from_sums`, the one finish of a plain round, DP and SecAgg+):
        ``segment``: N_i / D_i where D_i > 0, else the previous value; ``padded``: N / D_0 (previous if D_0 = 0).
        ``num[name]`` may stop early on the rank axis (zeros beyond). Invariant to a common factor of N and D.
        ValueError for a method without a sum rule."""
        if self.sum_rule is None:
            raise ValueError(f"method {self.name!r} has no sum rule: its aggregate is not a function of the sums")
        return finish_from_sums(self.sum_rule, state.tensors, num, den)

    # -- evaluation and export --------------------------------------------------------------------------
    def tier(self, state: GlobalState, t: int) -> Broadcast:
        """The global model as a client of rank ``t`` would receive it (used by evaluation/export)."""
        return self.broadcast(state, t, generator=torch.Generator().manual_seed(0))

    def export_adapter(self, state: GlobalState, t: int) -> dict[str, Tensor]:
        """The LoRA factors (``<module>.lora_A`` / ``.lora_B``, rank at most ``t``) of the rank-``t`` PEFT adapter
        exported from the global state (default: what a rank-t client receives, :meth:`tier`). A method whose
        tier changes base weights must override it: a PEFT adapter holds no base-weight delta."""
        b = self.tier(state, t)
        if b.base_delta:
            raise ValueError(
                f"method {self.name!r}: tier {t} changes the base weights, which a LoRA adapter cannot "
                "hold; the method must define export_adapter"
            )
        return b.adapter
