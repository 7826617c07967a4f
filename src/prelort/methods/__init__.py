"""Federated methods: one file per method, found automatically.

Adding a method is adding one file in this package that defines a :class:`Method` subclass
decorated with :func:`register`.
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import (
    Broadcast,
    ClientUpdate,
    FederationSpec,
    GlobalState,
    Method,
    PrunePlan,
    TrainPlan,
    key,
    lora_init,
    split_key,
)

_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` available under ``cls.name``."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"method {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def _discover() -> None:
    for info in pkgutil.iter_modules(__path__):
        if info.name not in ("base",) and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


_DISCOVERED = False


def available() -> dict[str, type[Method]]:
    """All registered methods, by name, in registration order of discovery."""
    global _DISCOVERED
    # A flag, not "registry empty": importing one method module first must not hide the others.
    if not _DISCOVERED:
        _discover()
        _DISCOVERED = True
    return dict(_REGISTRY)


def get(name: str) -> type[Method]:
    """The method class called ``name``; a clear error lists the known ones."""
    methods = available()
    if name not in methods:
        raise KeyError(f"unknown method {name!r}; known: {', '.join(sorted(methods))}")
    return methods[name]


def build(name: str, spec: FederationSpec) -> Method:
    return get(name)(spec)


__all__ = [
    "Broadcast",
    "ClientUpdate",
    "FederationSpec",
    "GlobalState",
    "Method",
    "PrunePlan",
    "TrainPlan",
    "available",
    "build",
    "get",
    "key",
    "lora_init",
    "register",
    "split_key",
]
