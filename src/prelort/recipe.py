"""The model and data recipe of a federation: what the server and every client build from one config.

The in-process runner (:class:`prelort.runner.Session`) and each Flower ClientApp
(:mod:`prelort.apps.clientapp`) follow it, so for the same config they hold the same base model with the
same rank-R LoRA attached, the same per-client split of the training records and the same tokenized examples.
"""

from __future__ import annotations

from typing import Any

import torch

from . import adapters
from .config import Config
from .data import load_records, partition, tokenize_for_training
from .data.sites import load_site_records
from .models import enable_gradient_checkpointing, load_model


def quiet_libraries() -> None:
    """Keep the console for prelort's own bars and lines: library progress bars (datasets' index
    flattening, transformers' weight loading) and a transformers-5 deprecation warning PEFT triggers
    on every forward say nothing a user can act on."""
    import warnings

    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def load_federation_model(cfg: Config, quantization: str | None = None):
    """``(base_model, tokenizer, model)``: the base model with the federation's rank-R LoRA attached.

    The one recipe for the server and for every client process (Flower ClientApps call it too), so all
    of them hold the same weights for the same config. ``quantization`` (None: ``model.quantization``) is how
    the base is held (a client's own setting, :meth:`Config.client_quantization`); the LoRA factors are drawn
    from ``seed`` after the base has loaded, so they are the same float32 factors at every setting.
    """
    quiet_libraries()
    torch.manual_seed(cfg.seed)
    base_model, tokenizer = load_model(cfg.model, quantization)
    if cfg.train.gradient_checkpointing:
        enable_gradient_checkpointing(base_model)  # active in training mode only: evaluation is unchanged
    torch.manual_seed(cfg.seed)  # however the base loaded (quantised or not), the same LoRA initialisation
    model = adapters.attach_lora(
        base_model, cfg.model.target_modules, max(cfg.clients.ranks), cfg.lora.alpha, cfg.lora.dropout
    )
    return base_model, tokenizer, model


class ClientModels:
    """The models a process's clients train on: one per quantisation setting (:func:`load_federation_model` at
    that setting), each loaded the first time a client of that setting needs it. ``loaded``: models already
    held, by setting (the runner's own, at ``model.quantization``, serves its clients of that setting)."""

    def __init__(self, cfg: Config, loaded: dict[str, tuple[Any, Any]] | None = None):
        self.cfg = cfg
        self._models: dict[str, tuple[Any, Any]] = dict(loaded or {})  # setting -> (model, tokenizer)

    def at(self, quantization: str) -> tuple[Any, Any]:
        """``(model, tokenizer)`` with the base held as ``quantization`` says."""
        if quantization not in self._models:
            _, tokenizer, model = load_federation_model(self.cfg, quantization)
            self._models[quantization] = (model, tokenizer)
        return self._models[quantization]

    def of_client(self, client: int, declared: str | None = None) -> tuple[Any, Any]:
        """``(model, tokenizer)`` of ``client``: at its own setting (:meth:`Config.client_quantization`)."""
        return self.at(self.cfg.client_quantization(client, declared))

    def settings(self) -> list[str]:
        """The settings loaded so far."""
        return list(self._models)


def load_data(cfg: Config) -> tuple[Any, Any, list[Any]]:
    """``(train, test, partitions)``: the record datasets and the per-client split (partitions[k] = client k's;
    none with ``clients.sites``, whose clients train on their own files: :func:`site_examples`)."""
    train, test = load_records(cfg.data, cfg.seed)
    if cfg.clients.sites:
        return train, test, []
    parts = partition(train, cfg.data.partition, cfg.clients.num, cfg.seed)
    return train, test, parts


def client_examples(cfg: Config, tokenizer: Any, records: Any) -> list[dict]:
    """One client's training examples: its partition of the records, tokenized as local training reads them."""
    return tokenize_for_training(records, tokenizer, cfg.data.max_length)


def site_examples(cfg: Config, tokenizer: Any, path: str) -> list[dict]:
    """A site's training examples: the records of its own file (``data-path``), tokenized as local training
    reads them; :class:`prelort.data.sites.SiteDataError` when the file cannot be used."""
    return client_examples(cfg, tokenizer, load_site_records(path, cfg.data))


def site_eval_records(cfg: Config, path: str) -> Any:
    """A site's held-out records (``eval-path``), for its on-site evaluation."""
    return load_site_records(path, cfg.data, role="eval-path")


def site_data(cfg: Config, tokenizer: Any) -> tuple[list[Any], list[Any]]:
    """For one process that plays every site of ``clients.sites``: per site, its training examples and its
    held-out records (None without ``eval_path``). A site whose file cannot be used holds its
    :class:`~prelort.data.sites.SiteDataError` instead, so that client fails when asked and the run goes on."""
    from .data.sites import SiteDataError

    def loaded(load: Any, *args: Any) -> Any:
        try:
            return load(*args)
        except SiteDataError as e:
            return e

    sites = cfg.clients.sites or []
    examples = [loaded(site_examples, cfg, tokenizer, s.data_path) for s in sites]
    held_out = [loaded(site_eval_records, cfg, s.eval_path) if s.eval_path else None for s in sites]
    return examples, held_out
