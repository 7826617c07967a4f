"""An extra engine, written as a user would add one: this one file and its registration, nothing else in prelort.

``counting``: the in-process engine, wrapped so that it keeps, per round, the clients it carried tasks to - the
shape of an engine that reports what it sent. Its clients train exactly as in-process (it hands every task to
:class:`prelort.engines.inprocess.InProcessEngine`), so a run on it equals an ``engine: inprocess`` run.

tests/engines/test_extra_engine.py loads this file, which registers the engine, and runs a federation on it.
"""

from __future__ import annotations

from collections.abc import Sequence

from prelort import engines
from prelort.engines.inprocess import InProcessEngine
from prelort.protocol import ClientTask, EngineResult


class CountingEngine:
    """Runs a round's tasks in this process and records which clients each round's tasks went to."""

    built: list[CountingEngine] = []  # every engine runner.run built, for the test to read

    def __init__(self, session, *, progress: bool = True):
        self.inner = InProcessEngine(session, progress=progress)
        self.clients_by_round: dict[int, list[int]] = {}
        CountingEngine.built.append(self)

    def execute(self, tasks: Sequence[ClientTask]) -> list[EngineResult]:
        for task in tasks:
            self.clients_by_round.setdefault(task.round, []).append(task.client)
        return self.inner.execute(tasks)


SPEC = engines.register(
    engines.EngineSpec(
        "counting", "The in-process engine, counting the tasks it carries (a test-suite engine).", build=CountingEngine
    )
)
