"""The in-process engine (the embedded default): clients run in turn on one in-memory model."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from tqdm.auto import tqdm

from .client import ClientRunner
from .federation import ClientTask
from .methods import ClientUpdate

log = logging.getLogger("prelort")


class ClientFailed(RuntimeError):
    """A client raised during local training; the round goes on without it."""

    def __init__(self, client: int, message: str):
        super().__init__(message)
        self.client = client


class InProcessEngine:
    """Executes a round's tasks sequentially in this process. A client that raises is left out."""

    def __init__(self, session, progress: bool = True):
        self.runner = ClientRunner(session.cfg, session.model, session.partitions, progress=progress)
        self.progress = progress

    def execute(self, tasks: Sequence[ClientTask]) -> list[ClientUpdate | Exception]:
        results: list[ClientUpdate | Exception] = []
        for task in tqdm(tasks, desc=f"round {tasks[0].round if tasks else '?'} clients", leave=False,
                         disable=not self.progress):
            try:
                results.append(self.runner.run(task))
            except Exception as e:  # a broken client must not crash the run
                log.exception("client %d raised during training", task.client)
                results.append(ClientFailed(task.client, f"{type(e).__name__}: {e}"))
        return results
