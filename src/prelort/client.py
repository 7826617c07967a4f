"""The client side of a round, shared by every engine: receive, train locally, return an update."""

from __future__ import annotations

from collections.abc import Sequence

from . import methods
from .adapters import LoraAdapter
from .config import Config
from .methods import ClientUpdate, Method
from .protocol import ClientTask, EvalSums, EvalTask
from .rank_geometry import adapter_rank
from .train import train_client


class ClientRunner:
    """Trains clients on one in-memory model (a PeftModel with the federation's rank-R LoRA attached).

    ``partitions[k]`` holds client k's tokenized training examples, or the exception that kept its site's file
    from loading (:class:`prelort.data.sites.SiteDataError`), raised when it is asked to train: the client
    fails, the round goes on. Only adapter state is swapped
    between clients; the base model is never reloaded. The method (built from the same config as the
    server's) adds its part to the local training (:meth:`Method.local_training` of the task's plan).
    """

    def __init__(self, cfg: Config, model, partitions: Sequence[Sequence[dict]], progress: bool = False):
        self.cfg = cfg
        self.model = model
        self.adapter = LoraAdapter(model)
        self.partitions = partitions
        self.progress = progress
        self.method: Method = methods.build(cfg.method, cfg.federation_spec(self.adapter.modules))

    def run(self, task: ClientTask) -> ClientUpdate:
        examples = self.partitions[task.client]
        if isinstance(examples, Exception):
            raise examples
        if not examples:
            raise ValueError(f"client {task.client} has no training examples")
        # the rank of the adapter received, not task.rank: a method may send a smaller one (a common rank)
        self.adapter.apply_broadcast(task.broadcast, adapter_rank(task.broadcast.adapter))
        local = self.method.local_training(task.plan)
        result = train_client(
            self.model, examples, task.plan, self.cfg.train, task.seed, progress=self.progress, local=local
        )
        return ClientUpdate(
            client=task.client,
            rank=result.rank,
            num_examples=result.num_examples,
            tensors=result.tensors,
            round=task.round,
            method=self.cfg.method,
            meta=dict(result.meta),
        )


def evaluate_on_site(model, tokenizer, records, cfg: Config, task: EvalTask) -> EvalSums:
    """A site's evaluation of the global adapter it received (``task.broadcast``) on its held-out ``records``
    (``eval.max_examples`` of them, as on the server), reduced to counts and sums: the per-example verdicts
    never leave this function."""
    from .evaluate import evaluate_examples

    LoraAdapter(model).apply_broadcast(task.broadcast, adapter_rank(task.broadcast.adapter))
    _, examples = evaluate_examples(model, tokenizer, records, cfg.eval, cfg.data.max_length)
    return EvalSums(
        client=task.client,
        n=len(examples),
        correct=sum(int(ex["correct"]) for ex in examples),
        loglik_sum=float(sum(ex["loglik"] for ex in examples)),
        tokens=sum(int(ex["n_tokens"]) for ex in examples),
    )
