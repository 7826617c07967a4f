"""lm-evaluation-harness (the ``lm_eval`` package, extra ``prelort[lm-eval]``) on a model already in memory: what
``prelort eval RUN_DIR --lm-eval TASKS`` runs on the base model and on the global adapter at each rank tier.

The model is handed to lm_eval's ``HFLM`` as a model object with its tokenizer (no second copy is loaded, no
hub look-up). Tasks are lm_eval task names; ``include_path`` adds a folder of task YAMLs, e.g. an offline task
over a local file (``examples/lm-eval/capitals.yaml``). Names found in ``include_path`` need no index of
lm_eval's built-in tasks (indexing them takes ~20 s), so an offline task starts at once.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

INSTALL_HINT = "pip install 'prelort[lm-eval]'"


class HarnessError(ValueError):
    """lm-evaluation-harness cannot run as asked (not installed, unknown task, bad include path): one line."""


def _lm_eval() -> Any:
    try:
        import lm_eval
    except ImportError:
        raise HarnessError(f"--lm-eval needs lm-evaluation-harness: {INSTALL_HINT}") from None
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its notes on being handed a model object
    return lm_eval


def task_manager(tasks: Sequence[str], include_path: str | Path | None) -> Any:
    """lm_eval's TaskManager that knows every task in ``tasks``: the ``include_path`` tasks alone when they are
    all there, else with lm_eval's built-in tasks; :class:`HarnessError` names the tasks found nowhere."""
    _lm_eval()
    from lm_eval.tasks import TaskManager

    if include_path is not None and not Path(include_path).is_dir():
        raise HarnessError(f"--include-path {include_path} is not a directory of lm-eval task YAMLs")
    path = None if include_path is None else str(include_path)
    manager = None
    if path is not None:
        manager = TaskManager(include_path=path, include_defaults=False)
        if set(manager.match_tasks(list(tasks))) != set(tasks):
            manager = None
    if manager is None:
        manager = TaskManager(include_path=path)
    unknown = [t for t in tasks if t not in set(manager.match_tasks(list(tasks)))]
    if unknown:
        where = f" in {include_path} nor" if include_path is not None else ""
        raise HarnessError(
            f"--lm-eval: no task {', '.join(map(repr, unknown))}{where} among lm-eval's tasks (`lm-eval ls tasks` "
            "lists them; give a folder of task YAMLs with --include-path)"
        )
    return manager


def score(
    model: Any, tokenizer: Any, tasks: Sequence[str], manager: Any, *, limit: int | None, batch_size: int
) -> dict[str, Any]:
    """lm_eval's ``simple_evaluate`` of ``model`` (a transformers or PEFT model, as it is now) on ``tasks``:
    its results dictionary (``results``: per task ``{"<metric>,<filter>": value}``, ``n-samples``, ...)."""
    lm_eval = _lm_eval()
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    return lm_eval.simple_evaluate(
        model=lm, tasks=list(tasks), task_manager=manager, limit=limit, log_samples=False, verbosity="ERROR"
    )


def summary(results: dict[str, Any]) -> dict[str, Any]:
    """The part of lm_eval's results a run keeps: scores per task, the examples scored, task versions, shots."""
    from lm_eval import __version__

    return {
        "lm_eval_version": __version__,
        "results": results.get("results", {}),
        "n_samples": results.get("n-samples", {}),
        "versions": results.get("versions", {}),
        "n_shot": results.get("n-shot", {}),
        "higher_is_better": results.get("higher_is_better", {}),
    }


def table(results: dict[str, Any]) -> str:
    """lm_eval's own markdown table of the scores."""
    from lm_eval.utils import make_table

    return make_table(results)
