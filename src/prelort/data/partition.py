"""Split the training records over clients with flwr-datasets partitioners (IID, Dirichlet, pathological)."""

from __future__ import annotations

import warnings

import datasets
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, Partitioner, PathologicalPartitioner

from ..config import PartitionConfig
from .templates import DataError


def make_partitioner(cfg: PartitionConfig, num_clients: int, seed: int) -> Partitioner:
    """The flwr-datasets partitioner for ``cfg`` (not yet given a dataset)."""
    if cfg.kind == "iid":
        return IidPartitioner(num_partitions=num_clients)
    if cfg.kind == "dirichlet":
        return DirichletPartitioner(
            num_partitions=num_clients,
            partition_by=cfg.by,
            alpha=float(cfg.alpha),
            min_partition_size=cfg.min_partition_size,
            self_balancing=False,
            shuffle=True,
            seed=seed,
        )
    if cfg.kind == "pathological":
        # first-deterministic (the setting of the paper flwr cites): client k gets category k mod C first,
        # so every category is used when there are at least as many clients as categories
        return PathologicalPartitioner(
            num_partitions=num_clients,
            partition_by=cfg.by,
            num_classes_per_partition=cfg.classes_per_client,
            class_assignment_mode="first-deterministic",
            shuffle=True,
            seed=seed,
        )
    raise DataError(f"unknown partition kind {cfg.kind!r}; choose iid, dirichlet or pathological")


def partition(train: datasets.Dataset, cfg: PartitionConfig, num_clients: int, seed: int) -> list[datasets.Dataset]:
    """One dataset per client. The records are shuffled with ``seed`` first (IidPartitioner cuts contiguous
    shards, so an ordered dataset would otherwise give non-IID shards)."""
    if num_clients < 1:
        raise DataError(f"num_clients must be positive, got {num_clients}")
    if len(train) < num_clients:
        raise DataError(f"{len(train)} training records cannot be split over {num_clients} clients")
    if cfg.kind != "iid" and cfg.by not in train.column_names:
        raise DataError(
            f"data.partition.by={cfg.by!r} is not a column of the training data; it has {', '.join(train.column_names)}"
        )
    if cfg.kind == "pathological":
        num_classes = len(train.unique(cfg.by))
        if cfg.classes_per_client > num_classes:
            raise DataError(
                f"data.partition.classes_per_client={cfg.classes_per_client} exceeds the {num_classes} distinct "
                f"values of column {cfg.by!r}"
            )
    partitioner = make_partitioner(cfg, num_clients, seed)
    partitioner.dataset = train.shuffle(seed=seed).flatten_indices()
    try:
        with warnings.catch_warnings():
            # Dirichlet warns on every resampling try; its final failure becomes the DataError below
            warnings.filterwarnings("ignore", message="The specified min_partition_size")
            parts = [partitioner.load_partition(k) for k in range(num_clients)]
    except ValueError as e:  # e.g. Dirichlet gave up reaching min_partition_size, too few records per category
        raise DataError(f"{cfg.kind} partitioning over {num_clients} clients failed: {e}") from None
    empty = [k for k, p in enumerate(parts) if len(p) == 0]
    if empty:
        raise DataError(
            f"{cfg.kind} partitioning left client(s) {empty} without data "
            f"({len(train)} records over {num_clients} clients); use fewer clients, a larger alpha or more data"
        )
    return parts
