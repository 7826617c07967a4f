"""One validated configuration object (pydantic), loadable from YAML/TOML, overridable with ``--set``.

Every key carries its help text. Unknown keys, bad values and a key given twice in the file are rejected
with the dotted path and the reason (:class:`ConfigError`). ``engine`` names an entry of the engine table
(:mod:`prelort.engines`).
``method`` names a registered method (:mod:`prelort.methods`); each
registered method with options has a section named after it (``METHOD: {OPTION: value}``),
validated by the options model declared in the method's own file.
"""

from __future__ import annotations

import json
import re
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import tomllib
import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

if TYPE_CHECKING:
    from .methods import FederationSpec


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key and the reason."""


# Largest LoRA rank a client may have (a rank beyond any layer's width would only allocate memory).
MAX_RANK = 65536

# How a base model's linear layers may be held (model.quantization, a site's quantization)
Quantization = Literal["none", "int8", "nf4"]
QUANTIZATIONS: tuple[str, ...] = get_args(Quantization)
# A config expands to at most this many nodes + string characters once YAML aliases are resolved: real
# configs are ~1000; a "billion laughs" alias bomb claims billions and is refused before it is expanded.
MAX_EXPANDED_SIZE = 1_000_000


def expanded_size(data: Any, limit: int = MAX_EXPANDED_SIZE) -> int:
    """Size of ``data`` with every shared (aliased) node counted each time it is referenced: nodes plus
    characters of strings. Computed per distinct node (memoised), so an alias bomb costs as little to
    measure as to parse. Raises :class:`ConfigError` above ``limit`` or for a self-referencing structure."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: Any) -> int:
        if isinstance(node, str):
            return 1 + len(node)
        if not isinstance(node, (dict, list, tuple)):
            return 1
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise ConfigError("config refers to itself (a recursive YAML alias)")
        active.add(key)
        total = 1
        items = [x for kv in node.items() for x in kv] if isinstance(node, dict) else node
        for child in items:
            total += size(child)
            if total > limit:
                raise ConfigError(
                    f"config expands to more than {limit} nodes and characters once its YAML "
                    "aliases are resolved (an alias bomb?); refusing it"
                )
        active.discard(key)
        sizes[key] = total
        return total

    try:
        return size(data)
    except RecursionError:
        raise ConfigError("config is nested too deeply") from None


class _Section(BaseModel):
    # allow_inf_nan=False: every float must be finite (an infinite lr or noise is refused at load time)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelConfig(_Section):
    name: str = Field(
        "tiny-llama",
        description="Base model: an alias (smollm2-135m-instruct, qwen2.5-coder-0.5b-instruct, tiny-llama), "
        "a Hugging Face hub id, a local directory, or a .gguf file.",
    )
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="Names (suffixes) of the nn.Linear modules that get LoRA adapters.",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Compute dtype of the base model.")
    device: str = Field("auto", description="torch device: auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    gguf_file: str | None = Field(None, description="GGUF file name inside model.name when it is a directory.")
    quantization: Quantization = Field(
        "none",
        description="Hold the base model's linear layers (all but the output layer) quantised with bitsandbytes "
        "(pip install 'prelort[quant]'): none (model.dtype), int8 (LLM.int8) or nf4 (4-bit NormalFloat, QLoRA). "
        "A checkpoint is quantised tensor by tensor while it loads (a hub id with model.gguf_file: after "
        "transformers dequantises it). The LoRA factors, updates and exports stay float32. "
        "Memory and speed measured in the README (Quantised base). The server evaluates the global model on a base "
        "held this way; a site may set its own (clients.sites[].quantization, node-config quantization).",
    )


class LoraConfig(_Section):
    alpha: float = Field(
        16.0, gt=0, description="lora_alpha of the global adapter; the scale is alpha / R for every rank."
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout during local training.")


def site_rank_problem(value: Any, cap: int | None) -> str | None:
    """Why ``value`` is not a rank a site may declare (an int in [1, cap]; cap None: [1, MAX_RANK]), or None.

    The one check of a declared rank: ``clients.sites`` in a config and a SuperNode's node-config ``rank``."""
    limit = MAX_RANK if cap is None else min(cap, MAX_RANK)
    if isinstance(value, bool) or not isinstance(value, int):
        return f"rank {value!r} is not an integer"
    if value <= 0:
        return f"rank {value} is not positive"
    if value > limit:
        what = "clients.max_rank" if cap is not None and cap <= MAX_RANK else "the largest rank prelort allows"
        return f"rank {value} is above {what} ({limit})"
    return None


def site_quantization_problem(value: Any) -> str | None:
    """Why ``value`` is not a quantisation a site may declare (one of :data:`QUANTIZATIONS`), or None: the check
    of a SuperNode's node-config ``quantization`` (``clients.sites`` entries are checked by their type)."""
    if not isinstance(value, str) or value not in QUANTIZATIONS:
        return f"quantization {value!r} is not one of {', '.join(QUANTIZATIONS)}"
    return None


class SiteConfig(_Section):
    data_path: str = Field(
        ...,
        min_length=1,
        description="The site's training records: a json/jsonl/csv/parquet file, a directory of them, or a saved "
        "Hugging Face dataset (data.template and data.max_length apply).",
    )
    rank: int = Field(..., description="The LoRA rank the site trains (at most clients.max_rank).")
    eval_path: str | None = Field(
        None,
        description="The site's held-out records (same formats): after the rounds named by eval.every the site "
        "evaluates the global adapter at its rank on them and reports only counts and sums.",
    )
    quantization: Quantization | None = Field(
        None,
        description="How the site holds its base model while it trains and evaluates on its own records: none, "
        "int8 or nf4, as model.quantization (docs/small-devices.md). Its updates keep the float32 shapes; the "
        "server still evaluates on a base held as model.quantization says. null: model.quantization.",
    )


class ClientsConfig(_Section):
    num: int = Field(4, ge=1, le=1_000_000, description="Number of clients in the federation.")
    per_round: int = Field(4, ge=1, description="Clients sampled (without replacement, seeded) each round.")
    ranks: list[int] = Field(
        default_factory=lambda: [1, 2, 4, 8],
        description="Client LoRA ranks, cycled over clients (client k: ranks[k % len]).",
    )
    sampling: Literal["uniform", "stratified"] = Field(
        "uniform",
        description="How each round's clients are drawn (seeded by seed, round and attempt): uniform (any per_round "
        "of the num clients) or stratified (from every rank tier in proportion to its number of clients, largest "
        "remainders first, so with per_round >= the number of tiers every tier trains every round).",
    )
    min_per_round: int = Field(1, ge=1, description="A round needs at least this many accepted updates.")
    max_round_retries: int = Field(
        0,
        ge=0,
        description="Retry a round with too few accepted updates this many times (clients resampled with a "
        "seed derived from seed, round and attempt) before the run stops; 0 stops at once.",
    )
    max_rank: int | None = Field(
        None,
        ge=1,
        le=MAX_RANK,
        description="The largest rank a site may declare (clients.sites, or a SuperNode's node-config rank); a larger "
        "one is refused. The global adapter's rank R is the largest rank present. null: the largest of "
        "clients.ranks (with clients.sites: no cap).",
    )
    sites: list[SiteConfig] | None = Field(
        None,
        description="Per-client declarations, one per client, for engines inprocess and flower-sim: "
        "{data_path, rank, eval_path, quantization}. Each client trains on its own file at its own rank (docs/deployment.md); "
        "clients.num is the list's length and clients.ranks is not used. null: the clients split data.source.",
    )

    @model_validator(mode="before")
    @classmethod
    def _from_sites(cls, data: Any) -> Any:
        """With ``sites``: ``num`` is their number, ``ranks`` their ranks, ``per_round`` at most ``num``; a ``num``
        or ``ranks`` given alongside that says otherwise is a conflict (a resolved config, which repeats them,
        is not)."""
        if not isinstance(data, dict) or not isinstance(data.get("sites"), list) or not data["sites"]:
            return data
        sites = data["sites"]
        data = dict(data)
        ranks = [s.get("rank") if isinstance(s, dict) else getattr(s, "rank", None) for s in sites]
        if "num" in data and data["num"] != len(sites):
            raise ValueError(f"num ({data['num']}) differs from the {len(sites)} clients.sites: leave num out")
        if "ranks" in data and list(data["ranks"]) != ranks:
            raise ValueError(
                f"ranks {data['ranks']} differ from the ranks of clients.sites {ranks}: leave ranks out "
                "(each site declares its own)"
            )
        data["num"] = len(sites)
        if all(site_rank_problem(r, None) is None for r in ranks):
            data["ranks"] = ranks  # an invalid rank is reported by the site check below
        data.setdefault("per_round", min(len(sites), cls.model_fields["per_round"].default))
        return data

    @field_validator("ranks")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("at least one rank is needed")
        if any(r <= 0 for r in v):
            raise ValueError(f"ranks must be positive, got {v}")
        if max(v) > MAX_RANK:
            raise ValueError(f"ranks must be at most {MAX_RANK}, got {max(v)}")
        return v

    @model_validator(mode="after")
    def _fits(self) -> ClientsConfig:
        if self.sites == []:
            raise ValueError("sites is empty: list one {data_path, rank} per client, or leave sites out")
        for k, site in enumerate(self.sites or []):
            problem = site_rank_problem(site.rank, self.max_rank)
            if problem:
                raise ValueError(f"sites[{k}]: {problem}")
        if self.per_round > self.num:
            raise ValueError(f"per_round ({self.per_round}) exceeds num ({self.num})")
        if self.min_per_round > self.per_round:
            raise ValueError(f"min_per_round ({self.min_per_round}) exceeds per_round ({self.per_round})")
        return self

    def rank_of(self, client: int) -> int:
        return self.ranks[client % len(self.ranks)]

    def all_ranks(self) -> list[int]:
        return [self.rank_of(k) for k in range(self.num)]

    def rank_cap(self) -> int:
        """The largest rank a site may declare: ``max_rank``, else the largest configured rank."""
        return self.max_rank if self.max_rank is not None else max(self.ranks)


class PartitionConfig(_Section):
    kind: Literal["iid", "dirichlet", "pathological"] = Field("iid", description="flwr-datasets partitioner.")
    by: str = Field("category", description="Column the non-IID partitioners split on.")
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration (smaller = more skewed).")
    classes_per_client: int = Field(2, ge=1, description="Pathological: categories per client.")
    min_partition_size: int = Field(4, ge=0, description="Dirichlet: resample until every client has this many.")


class FactsConfig(_Section):
    num_entities: int = Field(
        100,
        ge=1,
        le=5000,
        description="data.suite facts: fictional entities; each gets one fact per attribute, so the number of "
        "facts (num_entities x attributes) is the capacity knob.",
    )
    attributes: int = Field(
        3, ge=1, le=6, description="data.suite facts: attributes per entity (the record's category)."
    )
    train_phrasings: int = Field(
        3,
        ge=1,
        le=3,
        description="data.suite facts: phrasings of each fact in the training split; the held-out split asks every "
        "fact once in a further phrasing that training never uses.",
    )
    groups: int = Field(
        8,
        ge=1,
        description="data.suite facts: entity groups (the record's group column, for data.partition.by: group); "
        "entity k belongs to group k mod groups.",
    )


class DataConfig(_Section):
    source: str = Field(
        "builtin",
        description="builtin (offline multi-task suite), a hub dataset id, or a local json/jsonl/csv/parquet file or dir.",
    )
    template: Literal["auto", "alpaca", "dolly", "natural-instructions", "builtin"] = Field(
        "auto", description="How records map to instruction/input/output/category."
    )
    split: str = Field("train", description="Split of a hub/local dataset to read.")
    test_fraction: float = Field(0.1, gt=0, lt=1, description="Held-out fraction when the source has no test split.")
    num_train: int = Field(2000, ge=1, description="Builtin suite: training examples (all clients together).")
    num_test: int = Field(300, ge=1, description="Builtin suite: held-out examples.")
    max_length: int = Field(128, ge=8, description="Token limit of prompt + response.")
    partition: PartitionConfig = Field(default_factory=PartitionConfig)
    suite: Literal["multitask", "facts"] = Field(
        "multitask",
        description="data.source builtin: multitask (short answers over 8 task categories) or facts (fictional "
        "entities' attributes, asked in a held-out phrasing; needs capacity, see data.facts).",
    )
    facts: FactsConfig = Field(default_factory=FactsConfig)


class TrainConfig(_Section):
    local_steps: int = Field(10, ge=1, description="Optimizer steps per client per round.")
    batch_size: int = Field(8, ge=1, description="Examples per micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    lr: float = Field(3e-4, gt=0, description="AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0)
    schedule: Literal["constant", "cosine"] = Field(
        "constant", description="constant, or linear warmup + cosine decay."
    )
    warmup_steps: int = Field(0, ge=0)
    dim_warmup_steps: int = Field(
        0,
        ge=0,
        description="Warm-up per rank dimension in each round's local training: a dimension's j-th step of the round "
        "(counting only the steps whose objective reaches it) moves it by j / (w + 1) of AdamW's step for j <= w. "
        "AdamW starts fresh every round, so a dimension's first steps are full-lr sign steps; under nested sample a "
        "top dimension gets one or two steps a round and would be fed sign noise (issue 25). 0: off. For a method "
        "that trains every dimension at every step it is the same as warmup_steps.",
    )
    lr_rank_scaling: Literal["none", "sqrt"] = Field(
        "none",
        description="A learning rate per client rank: none (every client uses train.lr) or sqrt (a client training "
        "rank r uses lr * sqrt(lr_reference_rank / r)). With one scale alpha / R for every rank, a rank-r update "
        "grows with r (the rsLoRA argument), so one lr cannot fit ranks 2 to 16 alike. Every method can use it.",
    )
    lr_reference_rank: int = Field(
        1,
        ge=1,
        description="The rank that trains at exactly train.lr under lr_rank_scaling: sqrt (set it to your smallest "
        "client rank to keep train.lr for it).",
    )
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping bound, > 0 (null: off).")
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute each decoder layer's activations during the backward pass instead of keeping them "
        "(less memory, about one more forward pass per step); the update is the same. Models whose "
        "transformers class does not support it are refused.",
    )


class EvalConfig(_Section):
    every: int = Field(1, ge=1, description="Evaluate every k rounds (and always after the last).")
    max_examples: int = Field(64, ge=1, description="Held-out examples used per evaluation.")
    batch_size: int = Field(16, ge=1)
    max_new_tokens: int = Field(16, ge=1)
    truncation_curve: bool = Field(True, description="Also evaluate t = 1, 2, 4, ..., R at the end.")
    base: bool = Field(True, description="Evaluate the zero-shot base model once.")
    mode: Literal["auto", "teacher_forced", "generate"] = Field(
        "auto",
        description="How exact match is computed. teacher_forced: one forward pass per batch; an example is correct "
        "when the argmax at every reference answer position, then at the end-of-answer token, is the reference "
        "token (greedy decoding's exact match up to normalize_answer's case/punctuation folding; rougeL is then "
        "null: there is no prediction text). generate: greedy generation, normalised exact match and ROUGE-L. "
        "auto: teacher_forced when every evaluated reference has at most 8 tokens, else generate. See "
        "docs/evaluation.md.",
    )


class ValidationConfig(_Section):
    max_update_norm: float | None = Field(None, gt=0, description="Reject updates whose Frobenius norm exceeds this.")
    max_change_entry: float | None = Field(
        0.5,
        gt=0,
        description="Reject updates with an entry that differs from what the client received by more than this "
        "(a bound on the change, not on the file: genuine changes are at most ~3.2 x train.lr per optimizer step, "
        "docs/security.md); null: off.",
    )
    max_update_rms: float | None = Field(
        10.0,
        gt=0,
        description="Reject updates whose root-mean-square entry (Frobenius norm / sqrt(number of entries)) "
        "exceeds this: a norm bound derived from the model's layer shapes that genuine updates stay far below "
        "(see docs/security.md); null: off.",
    )


class RobustConfig(_Section):
    clip_norm: float | None = Field(
        None, gt=0, description="Clip each accepted update's norm to this before aggregating."
    )
    clip_to_median: float | None = Field(
        4.0,
        ge=1,
        description="Per round and per segment of the rank dimensions, scale each accepted client's change (its "
        "update minus what it received) down to at most this many times the segment's median change norm over "
        "the clients that cover it (genuine changes stay within 2x of it, docs/security.md); null: off. Not "
        "under privacy.dp (its clip bounds every change) or secure aggregation (the server sees no change).",
    )
    max_examples_ratio: float | None = Field(
        4.0,
        ge=1,
        description="Cap each accepted client's num_examples (its weight in a data-weighted mean) at this many times "
        "the round's median, so no client outweighs the rest by claiming more data; null: off. Not under "
        "privacy.dp (every weight is 1) or secure aggregation (weights are bounded there: docs/security.md).",
    )
    aggregator: Literal["mean", "trimmed_mean", "median"] = Field(
        "mean",
        description="How a round combines its clients' values of each entry, within each segment over the clients "
        "that cover it: mean (the method's weighted mean), or the coordinate-wise trimmed_mean or median "
        "(unweighted). Only for methods whose rule is a mean of the factors (a sum rule); not with privacy.dp "
        "or secure aggregation.",
    )
    trim_fraction: float = Field(
        0.2,
        ge=0,
        lt=0.5,
        description="trimmed_mean: drop ceil(trim_fraction x n) of each entry's n values at each end (at most "
        "(n-1)//2).",
    )


class PrivacyConfig(_Section):
    dp: bool = Field(False, description="Client-level differential privacy (clip + Gaussian noise on the sums).")
    clip_norm: float = Field(1.0, gt=0)
    noise_multiplier: float = Field(0.0, ge=0)
    delta: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="delta of the (epsilon, delta) guarantee the run reports; null: min(1e-5, clients.num**-1.1) "
        "(docs/privacy.md).",
    )
    neighbouring: Literal["add_or_remove", "replace_one"] = Field(
        "add_or_remove",
        description="What epsilon protects: add_or_remove (a client's participation: any one client in or out) or "
        "replace_one (one client's data, clients.num public; allows amplification by the fixed-size client "
        "sampling where the release hides the sample). docs/privacy.md.",
    )
    target_epsilon: float | None = Field(
        None,
        gt=0,
        description="Privacy budget: calibrate the noise multiplier before the run so that epsilon after `rounds` "
        "rounds is at most this (needs privacy.dp; leave noise_multiplier at 0). A budget that needs a noise "
        "multiplier above 100 is refused.",
    )
    secure_aggregation: bool = Field(
        False, description="Aggregate with Flower SecAgg+ (sum-aggregatable methods only)."
    )


class FlowerConfig(_Section):
    superlink: str = Field("127.0.0.1:9093", description="Control API address of the SuperLink (engine: flower).")
    root_certificates: str | None = Field(None, description="CA certificate for TLS to the SuperLink.")
    insecure: bool = Field(False, description="Connect without TLS (testing only).")
    supernode_auth: bool = Field(
        False,
        description="engine flower: the SuperLink runs with --enable-supernode-auth, so only registered SuperNode "
        "keys can connect (prelort cannot query this: you declare it). Without it a run is refused unless "
        "allow_insecure.",
    )
    allow_insecure: bool = Field(
        False,
        description="engine flower: run even without TLS (insecure) or without SuperNode authentication "
        "(supernode_auth false), with a loud warning. Testing only: any machine that reaches the SuperLink can "
        "then claim a client's partition (docs/deployment.md).",
    )
    round_timeout: float = Field(600.0, gt=0, description="Seconds to wait for client replies each round.")
    connection: str | None = Field(
        None,
        description="engine flower: name of a SuperLink connection in your Flower config ($FLWR_HOME/config.toml) "
        "to use instead of superlink / root_certificates / insecure.",
    )
    node_wait: float = Field(
        300.0,
        gt=0,
        description="Seconds the ServerApp waits for SuperNodes holding the sampled clients' partitions before a "
        "round; a client still without a node then counts as failed.",
    )
    client_cpus: int = Field(1, ge=1, description="engine flower-sim: CPU cores reserved per simulated client (Ray).")
    client_gpus: float = Field(
        0.0, ge=0, description="engine flower-sim: GPU share per simulated client (Ray; 0 = clients train on CPU)."
    )


# The methods' option sections come right after this key in to_dict / config.yaml and docs/configuration.md.
METHOD_SECTIONS_AFTER = "clients"


def method_sections() -> dict[str, type[BaseModel]]:
    """Section name -> options model of every registered method that has options (the registry's)."""
    from . import methods

    sections = methods.option_sections()
    clash = sorted(set(sections) & set(Config.model_fields))
    if clash:
        raise TypeError(f"method(s) {', '.join(clash)} have options but share their name with a config key")
    return sections


def _check_method(name: str) -> None:
    """A ValidationError at ``method`` unless ``name`` is a registered method (the message lists them)."""
    from . import methods

    known = methods.available()
    if name not in known:
        error = ValueError(f"unknown method {name!r}; registered methods: {', '.join(sorted(known))}")
        raise ValidationError.from_exception_data(
            "Config", [{"type": "value_error", "loc": ("method",), "input": name, "ctx": {"error": error}}]
        )


def _error_details(errors: list[dict[str, Any]], prefix: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    """pydantic's error dicts as ValidationError.from_exception_data takes them, their paths under ``prefix``."""
    return [
        {
            "type": e["type"],
            "loc": (*prefix, *e["loc"]),
            "input": e.get("input"),
            **({"ctx": e["ctx"]} if "ctx" in e else {}),
        }
        for e in errors
    ]


class Config(_Section):
    method: str = Field(
        "prelort",
        description="Federated method (`prelort methods` lists them).",
        json_schema_extra={"choices": "registered methods"},
    )
    seed: int = Field(
        0, ge=0, le=2**63 - 1, description="Seeds sampling, init, data order and partitioning (0 .. 2**63-1)."
    )
    rounds: int = Field(3, ge=1, le=1_000_000, description="Federated rounds.")
    audit: bool = Field(False, description="Keep every accepted update under updates/round-N/.")
    engine: str = Field(
        "inprocess", description="Who runs the rounds.", json_schema_extra={"choices": "registered engines"}
    )
    tracking: list[Literal["tensorboard", "mlflow"]] = Field(
        [],
        description="Experiment trackers that mirror every metrics.jsonl record at step = round (names like "
        "`tier_4/accuracy`; docs/cli.md): `tensorboard` writes RUN_DIR/tb/, `mlflow` logs to `tracking_uri`. "
        "One not installed (`pip install 'prelort[tracking]'`) or failing is a warning, never a failed run.",
    )
    tracking_uri: str | None = Field(
        None,
        description="MLflow tracking URI for `tracking: [mlflow]` (experiment `prelort`); default: a SQLite store "
        "in the run directory, `sqlite:///RUN_DIR/mlflow.db`. Give one store (e.g. `sqlite:///runs/mlflow.db`) "
        "to compare runs in one MLflow UI.",
    )
    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    clients: ClientsConfig = Field(default_factory=ClientsConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    robust: RobustConfig = Field(default_factory=RobustConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    flower: FlowerConfig = Field(default_factory=FlowerConfig)
    # the registered methods' option sections (method_sections()), validated; read as cfg.<method name>
    _method_options: dict[str, BaseModel] = PrivateAttr(default_factory=dict)

    @field_validator("engine", mode="before")
    @classmethod
    def _registered_engine(cls, name: Any) -> str:
        """``engine`` names an entry of the engine table (:mod:`prelort.engines`; light, so it is checked with
        the other declared keys), with pydantic's wording for a choice: "Input should be 'a', 'b' or 'c'"."""
        from . import engines

        known = list(engines.available())
        if not isinstance(name, str) or name not in known:
            choices = [repr(n) for n in known]
            expected = " or ".join([", ".join(choices[:-1]), choices[-1]] if len(choices) > 1 else choices)
            raise PydanticCustomError("literal_error", "Input should be {expected}", {"expected": expected})
        return name

    @model_validator(mode="wrap")
    @classmethod
    def _with_method_sections(cls, data: Any, handler: Any) -> Config:
        """The declared keys first, then ``method`` against the registry and each registered method's section
        (validated by its options model; its defaults when absent); any other top-level key is unknown.

        The registry imports the method modules, and with them torch: only a config whose declared keys are
        valid asks it, so a mistyped or out-of-range declared key fails fast (no model library imported).
        """
        if not isinstance(data, dict):
            cfg = handler(data)  # an existing Config (validate_assignment): its sections stay
            _check_method(cfg.method)
            return cfg
        cfg = handler({k: v for k, v in data.items() if k in cls.model_fields})
        models = method_sections()
        errors: list[dict[str, Any]] = []
        try:
            _check_method(cfg.method)
        except ValidationError as e:
            errors += _error_details(e.errors())
        errors += [
            {"type": "extra_forbidden", "loc": (k,), "input": v}
            for k, v in data.items()
            if k not in cls.model_fields and k not in models
        ]
        sections: dict[str, BaseModel] = {}
        for name, model in models.items():
            try:
                sections[name] = model.model_validate(data.get(name, {}))
            except ValidationError as e:
                errors += _error_details(e.errors(), (name,))
        if errors:
            raise ValidationError.from_exception_data(cls.__name__, errors)
        cfg._method_options = sections
        return cfg

    def __getattr__(self, name: str) -> Any:
        # cfg.METHOD: a registered method's options section
        try:
            return object.__getattribute__(self, "__pydantic_private__")["_method_options"][name]
        except (AttributeError, KeyError, TypeError):
            return super().__getattr__(name)  # type: ignore[misc]

    @property
    def method_options(self) -> dict[str, BaseModel]:
        """Every registered method's validated options section, by method name."""
        return dict(self._method_options)

    def client_quantization(self, client: int, declared: str | None = None) -> str:
        """How ``client`` holds its base model: ``declared`` (its SuperNode's node-config ``quantization``, already
        checked with :func:`site_quantization_problem`), else its ``clients.sites`` entry's, else
        ``model.quantization``. The one rule for the ClientApp, the in-process engine and the training records."""
        if declared is not None:
            return declared
        sites = self.clients.sites or []
        if 0 <= client < len(sites) and sites[client].quantization is not None:
            return sites[client].quantization
        return self.model.quantization

    def federation_spec(self, modules: dict[str, tuple[int, int]]) -> FederationSpec:
        """What every method is built from: the adapted modules' (d_out, d_in), the client ranks, alpha and
        the methods' options (each method names its own, :func:`prelort.methods.spec_options`)."""
        from .methods import FederationSpec, spec_options

        return FederationSpec(
            modules=dict(modules),
            client_ranks=tuple(self.clients.all_ranks()),
            alpha=self.lora.alpha,
            options=spec_options(self.method_options),
        )

    def to_dict(self) -> dict[str, Any]:
        plain = self.model_dump(mode="json")
        out: dict[str, Any] = {}
        for key, value in plain.items():
            out[key] = value
            if key == METHOD_SECTIONS_AFTER:
                out.update({name: section.model_dump(mode="json") for name, section in self._method_options.items()})
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _format_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{path}: {msg}")
    return "invalid config: " + "; ".join(lines)


# -- parsing --------------------------------------------------------------------------------------------
_YAML_MERGE_TAG = "tag:yaml.org,2002:merge"


class DuplicateKeyError(yaml.YAMLError):
    """A key given twice in one YAML mapping (PyYAML alone keeps the last occurrence without a word)."""

    def __init__(self, dotted: str, first_line: int, line: int) -> None:
        super().__init__(f"{dotted} is given twice (lines {first_line} and {line}); a key may appear only once")
        self.dotted, self.first_line, self.line = dotted, first_line, line


class StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping, at any depth, naming its dotted
    path and both lines. A merge (``<<: *base``) is no duplicate: a key written beside it overrides the
    merged one, as YAML defines."""

    def construct_document(self, node: yaml.Node) -> Any:
        self._refuse_duplicate_keys(node)
        return super().construct_document(node)

    def _refuse_duplicate_keys(self, root: yaml.Node) -> None:
        # Iterative (a deeply nested file must not overflow the stack here) and once per node: an aliased
        # node is checked where it is defined, so an alias bomb costs as little to check as to parse.
        checked: set[int] = set()
        pending: list[tuple[yaml.Node, tuple[Any, ...]]] = [(root, ())]
        while pending:
            node, path = pending.pop()
            if id(node) in checked:
                continue
            checked.add(id(node))
            children: list[tuple[yaml.Node, tuple[Any, ...]]] = []
            if isinstance(node, yaml.SequenceNode):
                children = [(item, (*path, i)) for i, item in enumerate(node.value)]
            elif isinstance(node, yaml.MappingNode):
                first_line: dict[Any, int] = {}
                for key_node, value_node in node.value:
                    if key_node.tag == _YAML_MERGE_TAG:
                        children.append((value_node, path))
                        continue
                    if not isinstance(key_node, yaml.ScalarNode):
                        continue  # a list or mapping as a key: the construction refuses it (unhashable)
                    key = self.construct_object(key_node)  # as constructed: `seed` and "seed", 1 and 0x1 are one
                    line = key_node.start_mark.line + 1
                    if key in first_line:
                        dotted = ".".join(str(part) for part in (*path, key))
                        raise DuplicateKeyError(dotted, first_line[key], line)
                    first_line[key] = line
                    children.append((value_node, (*path, key)))
            pending.extend(reversed(children))  # depth first in the file's order: the first duplicate is named


def parse_yaml(text: str) -> Any:
    """A YAML document as plain data, safely (no Python objects), with a key given twice refused
    (:class:`DuplicateKeyError`, a ``yaml.YAMLError``). For config files and a run's config.yaml."""
    return yaml.load(text, Loader=StrictLoader)  # safe: StrictLoader is a SafeLoader


# tomllib refuses a key given twice but does not name it: "Cannot overwrite a value (at line 3, column 5)".
_TOML_AT = re.compile(r"^(?P<what>.*) \(at line (?P<line>\d+), column \d+\)$")
_TOML_TABLE = re.compile(r"^\s*\[\[?\s*(?P<name>[^\[\]]+?)\s*\]\]?\s*(#.*)?$")
_TOML_DECLARED = re.compile(r"^Cannot declare \((?P<parts>.*?),?\) twice$")
_TOML_INLINE = re.compile(r"^Duplicate inline table key (?P<key>.+)$")


def _toml_duplicate(message: str, text: str) -> str | None:
    """``"KEY is given twice (line N)"`` for tomllib's duplicate-key errors (None for any other error). KEY
    is dotted under the table the line is in, as written in the file."""
    at = _TOML_AT.match(message)
    if not at:
        return None
    what, line = at["what"], int(at["line"])
    lines = text.splitlines()
    if declared := _TOML_DECLARED.match(what):
        key = "[" + ".".join(part.strip().strip("'\"") for part in declared["parts"].split(",")) + "]"
    elif inline := _TOML_INLINE.match(what):
        key = inline["key"].strip("'\"")
    elif what == "Cannot overwrite a value" and 0 < line <= len(lines) and "=" in lines[line - 1]:
        key = lines[line - 1].split("=", 1)[0].strip()
        table = next((m["name"] for m in map(_TOML_TABLE.match, reversed(lines[: line - 1])) if m), None)
        if table:
            key = f"{table}.{key}"
    else:
        return None
    return f"{key} is given twice (line {line}); a key may appear only once"


def _parse_toml(text: str, p: Path) -> Any:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        message = " ".join(str(e).split())
        duplicate = _toml_duplicate(message, text)
        raise ConfigError(f"{p}: {duplicate}" if duplicate else f"{p}: not valid TOML: {message}") from None
    except RecursionError as e:
        raise ConfigError(f"{p}: not valid TOML: {e}") from None


def parse_value(text: str) -> Any:
    """A ``--set`` value: YAML scalar/list syntax (``3``, ``1e-4``, ``[2, 4]``, ``true``, ``null``, ``abc``)."""
    try:
        return parse_yaml(text)
    except DuplicateKeyError:
        raise  # a mapping value with a key given twice: refused (apply_override says where), not taken as text
    except (yaml.YAMLError, ValueError, RecursionError):  # ValueError: e.g. an impossible date 2001-02-30
        return text


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one ``key.path=value`` to a raw config dict (in place)."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} is not key.path=value")
    path, _, raw = assignment.partition("=")
    parts = [p for p in path.strip().split(".")]
    if not all(parts):
        raise ConfigError(f"override {assignment!r}: empty key in {path!r}")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(parts[: i + 1])}: is a value, cannot set {path}")
        node = child
    try:
        node[parts[-1]] = parse_value(raw)
    except DuplicateKeyError as e:
        raise ConfigError(f"override {assignment!r}: {path.strip()}.{e.dotted} is given twice") from None


def from_dict(data: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> Config:
    if not isinstance(data, dict):
        raise ConfigError(f"config must be a mapping of keys, got {type(data).__name__}")
    expanded_size(data)  # before the deep copy below, which would expand every alias
    try:
        data = json.loads(json.dumps(data))  # deep copy of plain data
    except (TypeError, ValueError, RecursionError) as e:  # e.g. YAML dates, sets, binary
        raise ConfigError(f"config holds a value that is not text, number, bool, null, list or mapping: {e}") from None
    for assignment in overrides:
        apply_override(data, assignment)
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_error(e)) from None


class ConfigFileError(ConfigError):
    """The config path is not a readable regular file (missing, a directory, a FIFO, a device, ...)."""


def file_kind(mode: int) -> str:
    """What a file of this ``st_mode`` is, in words ("a regular file", "a directory", "a FIFO", ...): for the
    one-line refusals of a path that is not the kind of file prelort expects (a config, a lock)."""
    for is_kind, kind in (
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a device"),
        (stat.S_ISBLK, "a device"),
    ):
        if is_kind(mode):
            return kind
    return "not a regular file"


def _not_a_config_file(p: Path) -> str | None:
    """Why ``p`` cannot be a config file, said as what it is (None: a regular file). Only stats it: opening a
    FIFO would block until something writes to it, and opening a device can have effects."""
    try:
        mode = p.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        return "is a broken symbolic link" if p.is_symlink() else "does not exist"
    except OSError as e:  # permission denied on a parent, a symbolic link loop, a name too long
        return f"cannot be reached: {e.strerror or e}"
    kind = file_kind(mode)
    if kind == "a regular file":
        return None
    return f"is {kind}, not a config file" if kind != "not a regular file" else "is not a regular file"


def load(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML (or TOML) config file, apply ``key.path=value`` overrides, validate."""
    data: Any = {}
    if path is not None:
        p = Path(path)
        problem = _not_a_config_file(p)
        if problem:
            raise ConfigFileError(f"config file {p} {problem}")
        try:
            text = p.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {p} cannot be read as text: {e}") from None
        if p.suffix == ".toml":
            data = _parse_toml(text, p)
        else:
            try:
                data = parse_yaml(text)
            except DuplicateKeyError as e:
                raise ConfigError(f"{p}: {e}") from None
            except (yaml.YAMLError, ValueError, RecursionError) as e:  # ValueError: e.g. a date 2001-02-30
                raise ConfigError(f"{p}: not valid YAML: {e}") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: top level must be a mapping of keys, got {type(data).__name__}")
    return from_dict(data, overrides)
