"""Shared builders for the method tests: tiny federations and random client updates."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from prelort.methods import ClientUpdate, FederationSpec, key

# Two tiny modules of different shapes, so a mix-up of d_in / d_out or of modules shows.
MODULES = {"layers.0.q_proj": (5, 4), "layers.0.o_proj": (3, 6)}


@pytest.fixture
def make_spec() -> Callable[..., FederationSpec]:
    def build(ranks=(1, 2, 4, 4), alpha: float = 3.0, options=None, modules=None) -> FederationSpec:
        return FederationSpec(
            modules=dict(modules or MODULES), client_ranks=tuple(ranks), alpha=alpha, options=dict(options or {})
        )

    return build


@pytest.fixture
def make_update() -> Callable[..., ClientUpdate]:
    def build(
        spec: FederationSpec, client: int, rank: int, num_examples: int = 10, seed: int = 0, meta=None
    ) -> ClientUpdate:
        g = torch.Generator().manual_seed(1000 + 17 * client + seed)
        tensors = {}
        for module, (d_out, d_in) in spec.modules.items():
            tensors[key(module, "lora_A")] = torch.randn(rank, d_in, generator=g)
            tensors[key(module, "lora_B")] = torch.randn(d_out, rank, generator=g)
        return ClientUpdate(client=client, rank=rank, num_examples=num_examples, tensors=tensors, meta=dict(meta or {}))

    return build
