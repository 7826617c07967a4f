"""Federated methods: one file per method, found automatically.

Adding a method is adding one file in this package that defines a :class:`Method` subclass
decorated with :func:`register` (and, if it has options, their :class:`MethodOptions` model:
the config then takes a section named after the method), built from the public toolkit
:mod:`prelort.methods.toolkit` (a method whose round is a function of the two padded sums declares its
``sum_rule`` and inherits ``aggregate`` from ``toolkit.SumRuleMethod``). Everything else - config validation,
privacy, secure aggregation, export, resume - asks the registry and the :class:`Method` interface.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping
from typing import Any

from .base import (
    NESTED_MODES,
    Broadcast,
    ClientUpdate,
    FederationSpec,
    GlobalState,
    LocalTraining,
    Method,
    MethodOptions,
    NestedMode,
    SumRule,
    TrainPlan,
    key,
    lora_init,
    split_key,
)

_REGISTRY: dict[str, type[Method]] = {}
# The one order methods are listed in (`prelort methods`, the README, the benchmarks' tables): PreLort, then the
# baselines as the README presents them; a method not named here follows them in registration order.
LISTING_ORDER: tuple[str, ...] = ("prelort", "fedit", "zeropad", "hetlora", "flexlora", "flora")


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` available under ``cls.name``."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"method {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def unregister(name: str) -> type[Method]:
    """Remove the method called ``name`` from the registry (e.g. a method a test registered); returns it."""
    if name not in _REGISTRY:
        raise KeyError(f"method {name!r} is not registered")
    return _REGISTRY.pop(name)


def _discover() -> None:
    for info in pkgutil.iter_modules(__path__):
        if info.name not in ("base", "toolkit") and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


_DISCOVERED = False


def available() -> dict[str, type[Method]]:
    """All registered methods, by name, in :data:`LISTING_ORDER` (then any other in registration order)."""
    global _DISCOVERED
    # A flag, not "registry empty": importing one method module first must not hide the others.
    if not _DISCOVERED:
        _discover()
        _DISCOVERED = True
    listed = [name for name in LISTING_ORDER if name in _REGISTRY]
    return {name: _REGISTRY[name] for name in [*listed, *(n for n in _REGISTRY if n not in LISTING_ORDER)]}


def get(name: str) -> type[Method]:
    """The method class called ``name``; a clear error lists the known ones."""
    methods = available()
    if name not in methods:
        raise KeyError(f"unknown method {name!r}; known: {', '.join(sorted(methods))}")
    return methods[name]


def build(name: str, spec: FederationSpec) -> Method:
    return get(name)(spec)


def option_sections() -> dict[str, type[MethodOptions]]:
    """Config section -> options model of every registered method that has options, by name (sorted, so a
    config's sections and a checkpoint's options come out in one order whatever was imported first)."""
    return {name: cls.options_model for name, cls in sorted(available().items()) if cls.options_model is not None}


def spec_options(sections: Mapping[str, MethodOptions]) -> dict[str, Any]:
    """``FederationSpec.options`` (what checkpoints record) from the config's method sections: every registered
    method's options, flat, each as the method names them (``nested``, ``hetlora_gamma``, ...); a section
    missing from ``sections`` counts with its defaults."""
    out: dict[str, Any] = {}
    for name, cls in sorted(available().items()):
        out.update(cls.spec_options(sections.get(name)))
    return out


__all__ = [
    "NESTED_MODES",
    "Broadcast",
    "ClientUpdate",
    "FederationSpec",
    "GlobalState",
    "LocalTraining",
    "Method",
    "MethodOptions",
    "NestedMode",
    "SumRule",
    "TrainPlan",
    "available",
    "build",
    "get",
    "key",
    "lora_init",
    "option_sections",
    "register",
    "spec_options",
    "split_key",
    "unregister",
]
