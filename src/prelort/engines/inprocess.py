"""The in-process engine (``engine: inprocess``, the embedded default): clients run in turn on one in-memory model.

Each client's update crosses the same wire format as on Flower (safetensors bytes + JSON metadata,
:func:`prelort.updates.encode_update`): the engine returns :class:`~prelort.protocol.RawUpdate`
replies and the server decodes and validates them (:meth:`prelort.federation.Federation.end_round`),
so an in-process run exercises exactly the server path that untrusted remote clients meet.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence

from tqdm.auto import tqdm

from ..client import ClientRunner, evaluate_on_site
from ..protocol import ClientFailed, ClientTask, EngineResult, EvalSums, EvalTask, RawUpdate
from ..updates import encode_update

log = logging.getLogger("prelort")


class InProcessEngine:
    """Executes a round's tasks sequentially in this process. A client that raises is left out.

    Each client trains and evaluates on the session's model of its own quantisation setting
    (``session.client_models``: a site's ``clients.sites[].quantization``, else ``model.quantization``, whose
    model is the session's own), loaded the first time a client of that setting is asked.

    ``wire=False`` hands the decoded :class:`~prelort.methods.ClientUpdate` objects to the server
    directly (skips the encode/decode round trip; the server validates them all the same).
    """

    def __init__(self, session, progress: bool = True, wire: bool = True):
        self.cfg = session.cfg
        self.models = session.client_models
        self.partitions = session.partitions
        self.progress = progress
        self.wire = wire
        self.site_evals = session.site_evals  # clients.sites: each site's held-out records (None: it keeps none)
        self._runners: dict[str, ClientRunner] = {}  # quantisation setting -> the runner on its model

    def runner(self, client: int) -> ClientRunner:
        """The runner on the model of ``client``'s quantisation setting."""
        quantization = self.cfg.client_quantization(client)
        if quantization not in self._runners:
            if quantization not in self.models.settings():
                log.info("loading a base model at quantization %s for the sites that set it", quantization)
            model, _ = self.models.at(quantization)
            self._runners[quantization] = ClientRunner(self.cfg, model, self.partitions, progress=self.progress)
        return self._runners[quantization]

    def execute(self, tasks: Sequence[ClientTask]) -> list[EngineResult]:
        results: list[EngineResult] = []
        for task in tqdm(
            tasks, desc=f"round {tasks[0].round if tasks else '?'} clients", leave=False, disable=not self.progress
        ):
            try:
                update = self.runner(task.client).run(task)
                if self.wire:
                    payload, meta = encode_update(update)
                    results.append(RawUpdate(task.client, payload, json.dumps(meta, allow_nan=False)))
                else:
                    results.append(update)
            except Exception as e:  # a broken client must not crash the run
                log.exception("client %d raised during training", task.client)
                results.append(ClientFailed(task.client, f"{type(e).__name__}: {e}"))
        return results

    def evaluate(self, tasks: Sequence[EvalTask]) -> list[EvalSums | Exception | None]:
        """On-site evaluation: each site with held-out records evaluates the adapter of its task on them."""
        results: list[EvalSums | Exception | None] = []
        for task in tasks:
            records = self.site_evals[task.client] if task.client < len(self.site_evals) else None
            if records is None or isinstance(records, Exception):
                results.append(records)
                continue
            try:
                model, tokenizer = self.models.of_client(task.client)
                results.append(evaluate_on_site(model, tokenizer, records, self.cfg, task))
            except Exception as e:  # a site's evaluation failing must not stop the run
                log.exception("client %d raised during on-site evaluation", task.client)
                results.append(ClientFailed(task.client, f"{type(e).__name__}: {e}"))
        return results
