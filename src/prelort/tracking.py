"""Experiment tracking (config ``tracking: [tensorboard, mlflow]``): every record written to metrics.jsonl is
mirrored, as scalars at step = round, into TensorBoard and MLflow while the run writes it.

The scalar names (:func:`scalars`): ``<group>/<field>`` for every numeric field of a record, where the group is
the record's kind and rank tier: ``tier_4/accuracy``, ``curve_1/rougeL``, ``base/perplexity`` (round 0),
``train/train_loss``, ``train/rejected``, ``train/dp_epsilon``, ``federated_eval/...``; a kind prelort does not
know yet is mirrored the same way. Nested mappings become dotted names; text, lists and nulls are skipped.

* TensorBoard writes event files under the run directory (``tb/``, :attr:`prelort.rundir.RunDir.tb_dir`):
  ``tensorboard --logdir RUN_DIR/tb``. The resolved config is logged as hyper-parameters (the HPARAMS tab) and
  as text, with the run directory.
* MLflow logs into ``tracking_uri`` (default: a SQLite store in the run directory, ``RUN_DIR/mlflow.db``;
  MLflow's file store is in maintenance mode), experiment ``prelort``, one MLflow run per run directory named
  after it, tagged with its path (``prelort.run_dir``); the resolved config's keys are its parameters.

``--resume`` logs no step twice: TensorBoard's writer purges the steps after the resumed checkpoint (a round
recomputed because its checkpoint was damaged), and MLflow continues the run directory's MLflow run, logging
only the (name, step) pairs it lacks. A backend that is not installed, or that fails, costs one warning line
and is off for the rest of the run; it never fails the run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from .config import Config
from .rundir import RECORD_KEYS, RunDir, flatten_dict

log = logging.getLogger("prelort")

BACKENDS = ("tensorboard", "mlflow")
EXPERIMENT = "prelort"  # the MLflow experiment prelort's runs are logged under
RUN_DIR_TAG = "prelort.run_dir"
RUN_DIR_ID_TAG = (
    "prelort.run_dir_id"  # a hash of the path: searchable in MLflow's filter syntax whatever the path holds
)
INSTALL_HINT = "pip install 'prelort[tracking]'"


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")


def group(record: dict[str, Any]) -> str:
    """The scalar group of a metrics.jsonl record: its kind, with its rank tier when it has one (``tier_4``)."""
    kind, rank = record.get("kind") or "record", record.get("rank")
    return kind if rank is None or rank == kind else f"{kind}_{rank}"


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """``{"<group>/<field>": value}``: every finite number of a metrics.jsonl record but the keys that say which
    record it is (round, rank, kind, method, seed); nested mappings as dotted fields."""
    fields = {k: v for k, v in record.items() if k not in RECORD_KEYS}
    prefix = group(record)
    return {f"{prefix}/{k}": float(v) for k, v in flatten_dict(fields).items() if _number(v)}


def config_params(cfg: Config) -> dict[str, str | int | float | bool]:
    """The resolved config as flat parameters: dotted keys; lists and nulls as JSON text."""
    return {
        k: v if isinstance(v, (str, int, float, bool)) else json.dumps(v)
        for k, v in flatten_dict(cfg.to_dict()).items()
    }


def _one_line(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())[:300]


class _TensorBoard:
    name = "tensorboard"

    def __init__(self, cfg: Config, directory: RunDir, resumed_round: int | None):
        from torch.utils.tensorboard import SummaryWriter

        tb = directory.tb_dir
        # events of an earlier process of this run: kept, the steps after the resumed checkpoint purged (this
        # process logs them again); without any, the records already in metrics.jsonl are logged first
        continues = any(tb.glob("events.out.tfevents.*"))
        self.backfills = not continues
        purge = resumed_round + 1 if continues and resumed_round is not None else None
        self.writer = SummaryWriter(log_dir=str(tb), purge_step=purge)
        if not continues:
            from torch.utils.tensorboard.summary import hparams

            params = config_params(cfg)
            for summary in hparams(params, {}):
                self.writer.file_writer.add_summary(summary)
            self.writer.add_text("run_dir", str(directory.path.resolve()), 0)
            self.writer.add_text("config", "```yaml\n" + cfg.to_yaml() + "\n```", 0)

    def log(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()  # a killed run keeps every record it wrote

    def close(self, status: str) -> None:
        self.writer.close()


class _MLflow:
    name = "mlflow"
    backfills = True  # log() skips the (name, step) pairs the MLflow run already has

    def __init__(self, cfg: Config, directory: RunDir, resumed_round: int | None):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        for name in ("mlflow", "alembic"):  # their INFO lines (database migrations) are not the run's
            logging.getLogger(name).setLevel(logging.WARNING)
        uri = cfg.tracking_uri or f"sqlite:///{directory.mlflow_db.resolve()}"
        self.client = client = MlflowClient(tracking_uri=uri)
        experiment = client.get_experiment_by_name(EXPERIMENT)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(EXPERIMENT)
        path = str(directory.path.resolve())
        path_id = hashlib.sha256(path.encode()).hexdigest()[:32]
        found = (
            client.search_runs(
                [experiment_id],
                filter_string=f"tags.`{RUN_DIR_ID_TAG}` = '{path_id}'",
                order_by=["attributes.start_time DESC"],
                max_results=1,
            )
            if resumed_round is not None
            else []
        )
        if found:
            run = found[0]
            self.run_id = run.info.run_id
            client.update_run(self.run_id, status="RUNNING")
            self.have = {(key, m.step) for key in run.data.metrics for m in client.get_metric_history(self.run_id, key)}
            old_params = run.data.params
        else:
            tags = {
                RUN_DIR_TAG: path,
                RUN_DIR_ID_TAG: path_id,
                "prelort.method": cfg.method,
                "mlflow.note.content": f"prelort run directory: {directory.path.resolve().as_uri()}",
            }
            run = client.create_run(experiment_id, tags=tags, run_name=directory.path.resolve().name)
            self.run_id, self.have, old_params = run.info.run_id, set(), {}
        # a resumed run may change a few keys (rounds, eval, ...): a parameter keeps its first value (MLflow
        # refuses to change one); the run directory's config.yaml holds the current config
        params = [Param(k, str(v)[:6000]) for k, v in config_params(cfg).items() if k not in old_params]
        client.log_batch(self.run_id, params=params)

    def log(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        new = {k: v for k, v in values.items() if (k, step) not in self.have}
        if new:
            self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in new.items()])
            self.have.update((k, step) for k in new)

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)


_BUILDERS = {"tensorboard": _TensorBoard, "mlflow": _MLflow}


class Tracking:
    """The tracking backends of one run (``cfg.tracking``), fed each metrics.jsonl record by :meth:`record`.

    Every backend call is guarded: a failure is one warning naming the backend, which is then off."""

    def __init__(self, backends: list[Any]):
        self.backends = backends

    @classmethod
    def open(cls, cfg: Config, directory: RunDir, resumed_round: int | None) -> Tracking:
        """The backends of ``cfg.tracking`` on ``directory``; ``resumed_round``: the checkpoint a resumed run
        continues from (None: a new run). Those not installed are named in one warning and left out."""
        missing, backends = [], []
        for name in dict.fromkeys(cfg.tracking):
            try:
                backends.append(_BUILDERS[name](cfg, directory, resumed_round))
            except ImportError:
                missing.append(name)
            except Exception as e:  # noqa: BLE001 - tracking never fails a run
                log.warning("tracking: %s could not start (%s); the run goes on without it", name, _one_line(e))
        if missing:
            log.warning(
                "tracking: %s not installed (%s); the run goes on without %s",
                " and ".join(missing),
                INSTALL_HINT,
                "them" if len(missing) > 1 else "it",
            )
        return cls(backends)

    def _call(self, backend: Any, what: Callable[[Any], None]) -> None:
        if backend not in self.backends:  # failed earlier
            return
        try:
            what(backend)
        except Exception as e:  # noqa: BLE001 - tracking never fails a run
            self.backends.remove(backend)
            log.warning("tracking: %s failed (%s); the run goes on without it", backend.name, _one_line(e))

    def _log(self, backends: list[Any], record: dict[str, Any]) -> None:
        step, values = record.get("round"), scalars(record)
        if isinstance(step, int) and not isinstance(step, bool) and values:
            for backend in backends:
                self._call(backend, lambda b: b.log(step, values))

    def record(self, record: dict[str, Any]) -> None:
        """Mirror one metrics.jsonl record at step = its round."""
        self._log(list(self.backends), record)

    def backfill(self, records: list[dict[str, Any]]) -> None:
        """The records already in metrics.jsonl, for the backends that start without them (tracking turned on
        by a resume, a deleted tb/, a record an earlier process wrote but did not get to log)."""
        backends = [b for b in self.backends if b.backfills]
        for rec in records:
            self._log(backends, rec)

    def close(self, status: str) -> None:
        for backend in list(self.backends):
            self._call(backend, lambda b: b.close(status))
        self.backends = []


@contextmanager
def mirror(
    cfg: Config,
    directory: RunDir,
    resumed_round: int | None,
    interrupted: tuple[type[BaseException], ...] = (KeyboardInterrupt,),
) -> Iterator[Tracking]:
    """Mirror every record ``directory``'s metrics.jsonl gets while the block runs (nothing without
    ``cfg.tracking``); the backends' run ends FINISHED, KILLED when the block raises one of ``interrupted``
    (the run stopped, to be resumed), else FAILED."""
    tracking = Tracking.open(cfg, directory, resumed_round) if cfg.tracking else Tracking([])
    if not tracking.backends:
        yield tracking
        return
    tracking.backfill(directory.metrics.records())
    directory.record_observers.append(tracking.record)
    status = "FAILED"
    try:
        yield tracking
        status = "FINISHED"
    except interrupted:
        status = "KILLED"
        raise
    finally:
        directory.record_observers.remove(tracking.record)
        tracking.close(status)
