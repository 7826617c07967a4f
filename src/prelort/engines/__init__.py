"""Engines: who carries a round's messages between the round loop and the clients - and the one table of them.

An engine implements :class:`prelort.protocol.Engine` (``execute(tasks)``) and imports only the protocol
(:mod:`prelort.protocol`), never the round loop. Each value of the config's ``engine:`` is one
:class:`EngineSpec` in this registry, which says how a run on it starts and what it supports: ``config.py``
validates ``engine:`` against it, :func:`prelort.runner.run` (the one place a config's engine is chosen) starts
the run the entry says, ``privacy.py`` asks it whether the engine runs secure aggregation, and
``tests/test_layering.py`` checks the modules the entries name. (Flower's launcher and ServerApp still tell
``flower-sim`` from ``flower``: which Flower runtime to start, once the table has chosen Flower.) The built-in
entries:

* ``inprocess``: :class:`~.inprocess.InProcessEngine` (:mod:`.inprocess`), the clients in turn in this process;
* ``flower-sim`` and ``flower``: launched by :func:`prelort.apps.launch.run_on_flower`, whose ServerApp
  (:mod:`prelort.apps.serverapp`) runs the rounds on :class:`~.flower.GridEngine` (:mod:`.flower`), the
  clients on Flower SuperNodes; under ``privacy.secure_aggregation`` on its variant
  :class:`~.flower_secagg.SecAggGridEngine` (:mod:`.flower_secagg`, rounds through SecAgg+).

Adding an engine is one module plus its :func:`register` call (``tests/engines/counting_engine.py`` registers
one from the test suite). The table names the built-in engines' code by ``"module:attribute"`` and imports it
only when a run needs it: config validation stays free of torch and flwr, and this module imports nothing of
prelort, so it sits below the config (docs/design.md section 6).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class EngineSpec:
    """One value of ``engine:``.

    Exactly one of ``build`` and ``launch``, each a callable or a ``"module:attribute"`` string:

    * ``build(session, *, progress) -> Engine``: the engine runs the rounds in this process, on the
      :class:`prelort.runner.Session` that :func:`prelort.runner.run` makes;
    * ``launch(cfg, out, *, resume, verbose) -> Path``: the run happens elsewhere (Flower's ServerApp makes its own
      Session there); returns the run directory.

    ``secure_aggregation``: the engine runs rounds under ``privacy.secure_aggregation`` (it returns one
    :class:`prelort.protocol.SecureAggregate` per round).
    """

    name: str
    summary: str
    build: str | Callable[..., Any] | None = None
    launch: str | Callable[..., Any] | None = None
    secure_aggregation: bool = False

    def __post_init__(self) -> None:
        if (self.build is None) == (self.launch is None):
            raise ValueError(f"engine {self.name!r}: give exactly one of build (runs in this process) and launch")

    @property
    def in_process(self) -> bool:
        """Whether the rounds run in this process (on a Session that :func:`prelort.runner.run` makes)."""
        return self.build is not None

    def builder(self) -> Callable[..., Any]:
        """``build``, imported if named by a string."""
        if self.build is None:
            raise ValueError(f"engine {self.name!r} does not run in this process: it is launched")
        return _resolve(self.build)

    def launcher(self) -> Callable[..., Any]:
        """``launch``, imported if named by a string."""
        if self.launch is None:
            raise ValueError(f"engine {self.name!r} runs in this process: it has no launcher")
        return _resolve(self.launch)

    def references(self) -> list[str]:
        """The ``"module:attribute"`` strings this entry names (what tests/test_layering.py checks)."""
        return [ref for ref in (self.build, self.launch) if isinstance(ref, str)]


def _resolve(ref: str | Callable[..., Any]) -> Callable[..., Any]:
    if not isinstance(ref, str):
        return ref
    module, _, attribute = ref.partition(":")
    return getattr(importlib.import_module(module), attribute)


_REGISTRY: dict[str, EngineSpec] = {}


def register(spec: EngineSpec) -> EngineSpec:
    """Make ``spec`` available as ``engine: spec.name``; returns it."""
    if spec.name in _REGISTRY and _REGISTRY[spec.name] != spec:
        raise ValueError(f"engine {spec.name!r} registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def unregister(name: str) -> EngineSpec:
    """Remove the engine called ``name`` from the registry (e.g. an engine a test registered); returns it."""
    if name not in _REGISTRY:
        raise KeyError(f"engine {name!r} is not registered")
    return _REGISTRY.pop(name)


def available() -> dict[str, EngineSpec]:
    """All registered engines, by name, in registration order (the built-in ones first)."""
    return dict(_REGISTRY)


def get(name: str) -> EngineSpec:
    """The engine called ``name``; a clear error lists the known ones."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown engine {name!r}; known: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


register(
    EngineSpec(
        "inprocess",
        "The clients in turn in this process (the embedded default).",
        build="prelort.engines.inprocess:InProcessEngine",
    )
)
register(
    EngineSpec(
        "flower-sim",
        "Flower's simulation runtime on this machine: one SuperNode per client.",
        launch="prelort.apps.launch:run_on_flower",
        secure_aggregation=True,
    )
)
register(
    EngineSpec(
        "flower",
        "A deployed Flower SuperLink with SuperNodes (docs/deployment.md).",
        launch="prelort.apps.launch:run_on_flower",
        secure_aggregation=True,
    )
)

__all__ = ["EngineSpec", "available", "get", "register", "unregister"]
