"""The client side of a round, shared by every engine: receive, train locally, return an update."""

from __future__ import annotations

from collections.abc import Sequence

from .adapters import apply_broadcast
from .config import Config
from .protocol import ClientTask
from .methods import ClientUpdate
from .train import train_client


def broadcast_rank(task: ClientTask) -> int:
    """The rank of the adapter a client received (FedIT sends r_min even to larger clients)."""
    a = next(v for k, v in task.broadcast.adapter.items() if k.endswith(".lora_A"))
    return int(a.shape[0])


class ClientRunner:
    """Trains clients on one in-memory model (a PeftModel with the federation's rank-R LoRA attached).

    ``partitions[k]`` holds client k's tokenized training examples. Only adapter state is swapped
    between clients; the base model is never reloaded.
    """

    def __init__(self, cfg: Config, model, partitions: Sequence[Sequence[dict]], progress: bool = False):
        self.cfg = cfg
        self.model = model
        self.partitions = partitions
        self.progress = progress

    def run(self, task: ClientTask) -> ClientUpdate:
        examples = self.partitions[task.client]
        if not examples:
            raise ValueError(f"client {task.client} has no training examples")
        apply_broadcast(self.model, task.broadcast, broadcast_rank(task))
        result = train_client(self.model, examples, task.plan, self.cfg.train, task.seed, progress=self.progress)
        return ClientUpdate(
            client=task.client,
            rank=result.rank,
            num_examples=result.num_examples,
            tensors=result.tensors,
            round=task.round,
            method=self.cfg.method,
            meta=dict(result.meta),
        )
