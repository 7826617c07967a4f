"""A run directory from start to finish, for any engine.

``Session`` loads the base model and data, writes its run directory through :class:`~prelort.rundir.RunDir`
(config.yaml, run.log, metrics.jsonl, eval/, checkpoints, adapters, report) and evaluates the global model per
rank tier. An engine only has to turn a round's :class:`~prelort.protocol.ClientTask` list into updates (or
exceptions). The model and data come from :mod:`prelort.recipe`, the same recipe every Flower ClientApp follows.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from . import export, tracking
from .adapters import LoraAdapter, export_peft_adapter, truncated_factors
from .config import Config
from .evaluate import evaluate_examples, truncation_tiers
from .federation import Federation, RoundFailed, check_privacy
from .methods import Broadcast
from .metrics import available as available_metrics
from .model_names import hub_id
from .models import load_model
from .protocol import Engine
from .rank_geometry import adapter_rank
from .recipe import ClientModels, client_examples, load_data, load_federation_model, quiet_libraries, site_data
from .rundir import RECORD_KEYS, RunDir, federated_eval_record, train_record
from .train import rank_lr

log = logging.getLogger("prelort")


def setup_logging(run_dir: Path | None, verbose: bool = True) -> None:
    """run.log gets everything (every rejection with its reason); the console gets INFO.

    ``run_dir`` None: the console only (before the run directory may be created)."""
    logger = logging.getLogger("prelort")
    logger.setLevel(logging.INFO)
    _detach_handlers(logging.Handler)
    if run_dir is not None:
        fh = logging.FileHandler(RunDir(run_dir).log_file)
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        fh._prelort = True  # type: ignore[attr-defined]
        logger.addHandler(fh)
    if verbose:
        sh = _TqdmHandler()
        sh.setFormatter(logging.Formatter("%(message)s"))
        sh._prelort = True  # type: ignore[attr-defined]
        logger.addHandler(sh)
    logger.propagate = False


def close_run_log() -> None:
    """Detach and close run.log's handler: the run is over, so what this process logs next (another run, an
    evaluation in the same Python session) must not be appended to this run's log."""
    _detach_handlers(logging.FileHandler)


def _detach_handlers(kind: type[logging.Handler]) -> None:
    """Remove and close the handlers of type ``kind`` that prelort attached (never a user's own)."""
    logger = logging.getLogger("prelort")
    for h in list(logger.handlers):
        if getattr(h, "_prelort", False) and isinstance(h, kind):
            logger.removeHandler(h)
            h.close()


class _TqdmHandler(logging.StreamHandler):
    """Console lines written through tqdm, so a progress bar on the terminal is not printed a second time
    below each line."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


class RunInterrupted(Exception):
    """The run stopped on Ctrl-C (SIGINT); ``completed`` is the last round on disk, where --resume continues."""

    def __init__(self, completed: int):
        super().__init__(f"interrupted after round {completed}")
        self.completed = completed


class _GracefulStop:
    """SIGINT handling for a run: the first Ctrl-C asks the run to stop after the round under way (its
    records written), a second one stops at once (KeyboardInterrupt). Only in the main thread."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("Ctrl-C: stopping after the round under way (press Ctrl-C again to stop at once)")

    def __enter__(self) -> _GracefulStop:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


# AdamW moves an entry by at most about (1 - beta1) / sqrt(1 - beta2) ~ 3.2 x lr per step (docs/security.md)
ADAMW_STEP_BOUND = 3.2


def change_bound_warning(cfg: Config) -> str | None:
    """A warning when validation.max_change_entry is below what an honest client may move an entry in one
    round (about 3.2 x its lr x train.local_steps): such a client's update would be refused as an attack."""
    bound = cfg.validation.max_change_entry
    if bound is None:
        return None
    lr = max(rank_lr(cfg.train, r) for r in cfg.clients.all_ranks())
    reach = ADAMW_STEP_BOUND * lr * cfg.train.local_steps
    if reach <= bound:
        return None
    return (
        f"validation.max_change_entry ({bound:g}) is below what an honest client can move an entry in one round "
        f"(up to about 3.2 x lr {lr:g} x {cfg.train.local_steps} local steps = {reach:.3g}); honest updates may "
        "be refused as change_too_large: raise it or set it to null (docs/security.md)"
    )


class Session:
    """Model, data and run directory of one run. Engines call :meth:`run` with their executor."""

    def __init__(
        self, cfg: Config, run_dir: str | Path, *, resume: bool = False, verbose: bool = True, read_only: bool = False
    ):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.dir = RunDir(run_dir)
        self.resume = resume or read_only
        self.verbose = verbose
        check_privacy(cfg)  # a refused setting must not leave a half-made run directory behind
        # Nothing goes into the run directory before the data and the model have loaded: a mistyped source
        # or model leaves no half-made run behind.
        if not read_only:
            setup_logging(None, verbose)
        quiet_libraries()
        train, test, parts = load_data(cfg)
        t0 = time.perf_counter()
        if verbose:
            log.info("loading model %s ...", cfg.model.name)
        self.base_model, self.tokenizer, self.model = load_federation_model(cfg)
        model_seconds = time.perf_counter() - t0
        # the clients' models: this one for the clients at model.quantization, another per setting a site sets
        self.client_models = ClientModels(cfg, {cfg.model.quantization: (self.model, self.tokenizer)})
        self.modules = LoraAdapter(self.model).modules
        self.test_records = test
        self.partitions = [client_examples(cfg, self.tokenizer, p) for p in parts]
        # clients.sites: each client's own file (or why it cannot be used) and its held-out records, if any
        self.site_evals: list[Any] = []
        if cfg.clients.sites:
            self.partitions, self.site_evals = site_data(cfg, self.tokenizer)
        if not read_only:
            self._prepare_dir()
            setup_logging(self.run_dir, verbose)
        log.info(
            "prelort run: method=%s engine=%s model=%s ranks=%s rounds=%d -> %s",
            cfg.method,
            cfg.engine,
            cfg.model.name,
            cfg.clients.ranks,
            cfg.rounds,
            self.run_dir,
        )
        tight = change_bound_warning(cfg)
        if tight and not read_only:
            log.warning(tight)
        log.info(
            "model %s loaded in %.1f s; data: %d train / %d test records; client sizes %s",
            cfg.model.name,
            model_seconds,
            len(train),
            len(test),
            [len(p) if isinstance(p, list) else "unusable" for p in self.partitions],
        )
        self.federation = Federation(cfg, self.run_dir, self.modules)
        self.metrics = self.dir.metrics

    @classmethod
    def open(cls, run_dir: str | Path, verbose: bool = False) -> Session:
        """An existing run, at its latest checkpoint, for evaluation (nothing in the run directory changes)."""
        directory = RunDir(run_dir)
        cfg = directory.load_config()
        if not directory.checkpoint_rounds():  # start() would write an initial checkpoint
            raise FileNotFoundError(
                f"{run_dir} has no checkpoints/round-N yet: nothing to evaluate (start the run with prelort run first)"
            )
        s = cls(cfg, run_dir, read_only=True, verbose=verbose)
        s.federation.start(resume=True)
        return s

    # -- run directory ------------------------------------------------------------------------------------
    def _prepare_dir(self) -> None:
        self.dir.prepare(self.cfg, self.resume)  # checks, marker, lock, resume comparison, config.yaml

    # -- evaluation ---------------------------------------------------------------------------------------
    def _load_tier(self, broadcast: Broadcast) -> None:
        LoraAdapter(self.model).apply_broadcast(broadcast, adapter_rank(broadcast.adapter))

    def _evaluate(self, desc: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        return evaluate_examples(
            self.model,
            self.tokenizer,
            self.test_records,
            self.cfg.eval,
            self.cfg.data.max_length,
            progress=self.verbose,
            desc=desc,
        )

    @contextmanager
    def serving(self, rank: int | str) -> Iterator[Any]:
        """The session's model serving the global model at rank tier ``rank`` (``"base"``: the untrained base
        model, adapters off) while the block runs: what evaluation, and ``prelort eval --lm-eval``, score."""
        if rank == "base":
            LoraAdapter(self.model).set_base_delta(None)
            with self.model.disable_adapter():
                yield self.model
        else:
            fed = self.federation
            self._load_tier(fed.method.tier(fed.state, rank))
            yield self.model

    def evaluate_tier_examples(self, t: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """``(metrics, per-example records)`` of the global model served at rank ``t``."""
        with self.serving(t):
            return self._evaluate(f"eval rank {t}")

    def evaluate_base_examples(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """``(metrics, per-example records)`` of the untrained base model (adapters off)."""
        with self.serving("base"):
            return self._evaluate("eval base")

    def evaluate_tier(self, t: int) -> dict[str, Any]:
        return self.evaluate_tier_examples(t)[0]

    def _record(
        self, round_: int, rank: Any, kind: str, result: tuple[dict[str, Any], list[dict[str, Any]]]
    ) -> dict[str, Any]:
        metrics, examples = result
        return self.dir.write_evaluation(round_, rank, kind, metrics, examples, self.cfg.method, self.cfg.seed)

    def evaluate_round(self, round_: int, skip: Sequence[int] = ()) -> list[dict[str, Any]]:
        """Tier records of ``round_`` (the tiers in ``skip`` are already in metrics.jsonl)."""
        return [
            self._record(round_, t, "tier", self.evaluate_tier_examples(t))
            for t in self.federation.tiers()
            if t not in skip
        ]

    def evaluate_on_sites(self, engine: Any, round_: int) -> list[dict[str, Any]]:
        """The round's sampled sites evaluate the new global model on their own held-out records; one
        ``federated_eval`` record per rank tier that any site reported on (none when no site keeps one)."""
        fed = self.federation
        tasks = fed.site_eval_tasks(round_)
        sums = fed.site_eval_sums(round_, tasks, engine.evaluate(tasks))
        records = [federated_eval_record(self.cfg, round_, t, s) for t, s in sums.items()]
        for rec in records:
            self.metrics.write(rec)
        return records

    def _record_base(self) -> None:
        r = self._record(0, "base", "base", self.evaluate_base_examples())
        log.info("round 0 base model: %s", " ".join(f"{m.short}={m.format(r[m.name])}" for m in available_metrics()))

    def _complete_round(self, round_: int) -> None:
        """On resume: write the records the last completed round lacks (an interruption after its checkpoint
        and before its last record), in the order an uninterrupted run writes them."""
        have = self.metrics.records_by_key(round_)
        if round_ == 0:
            if self.cfg.eval.base and ("base", "base") not in have:
                self._record_base()
            return
        if ("train", None) not in have:
            _, doc = self.dir.checkpoint_state(round_)
            if isinstance(doc.get("outcome"), dict):
                self.metrics.write(
                    train_record(self.cfg, round_, doc["outcome"], self.federation.privacy_record(round_))
                )
            else:  # a checkpoint written before round outcomes were kept in state.json
                log.warning("round %d: its training record is missing and its checkpoint does not hold it", round_)
        if self.federation.eval_due(round_):
            done = [t for t in self.federation.tiers() if ("tier", t) in have]
            if len(done) < len(self.federation.tiers()):
                log.info("round %d: evaluating the rank tiers the interrupted run did not record", round_)
                self.evaluate_round(round_, skip=done)

    # -- the loop -----------------------------------------------------------------------------------------
    def run(self, engine: Engine) -> Path:
        cfg, fed = self.cfg, self.federation
        # an engine that knows how each client holds its base (protocol.QuantizationReporter) tells the records
        if hasattr(engine, "quantization_of"):
            fed.quantization_of = engine.quantization_of
        first = fed.start(resume=self.resume)
        with _GracefulStop() as stop:
            try:
                if self.resume:
                    self.metrics.truncate_after(fed.round)
                    self.dir.drop_eval_after(fed.round)
                # every record from here on is mirrored to the trackers of cfg.tracking (prelort.tracking)
                with tracking.mirror(
                    cfg, self.dir, fed.round if self.resume else None, (KeyboardInterrupt, RunInterrupted)
                ):
                    if self.resume:
                        self._complete_round(fed.round)
                    elif cfg.eval.base:
                        self._record_base()
                    self._rounds(engine, first, stop)
                    self.finish()
            except KeyboardInterrupt:
                raise RunInterrupted(fed.round) from None
        return self.run_dir

    def _rounds(self, engine: Engine, first: int, stop: _GracefulStop) -> None:
        cfg, fed = self.cfg, self.federation
        if first > cfg.rounds:
            return
        bar = tqdm(
            range(first, cfg.rounds + 1), desc="rounds", disable=not self.verbose, initial=first - 1, total=cfg.rounds
        )
        try:
            for round_ in bar:
                try:
                    outcome = fed.run_round(round_, engine.execute)  # begin, execute, end; retried if it fails
                except RoundFailed as e:
                    log.error("%s", e)
                    raise
                self.metrics.write(train_record(cfg, round_, outcome.summary(), fed.privacy_record(round_)))
                log_privacy(fed, round_)
                line = (
                    f"round {round_}/{cfg.rounds}: train_loss={_fmt(outcome.train_loss)} accepted="
                    f"{len(outcome.accepted)} rejected={len(outcome.rejected)} failed={len(outcome.failed)}"
                )
                if fed.eval_due(round_):
                    recs = self.evaluate_round(round_)
                    line += " | " + " ".join(
                        f"r{r['rank']}: " + " ".join(f"{m.short}={m.format(r[m.name])}" for m in available_metrics())
                        for r in recs
                    )
                    if hasattr(engine, "evaluate"):  # an engine that reaches the sites (protocol.SiteEvaluator)
                        line += "".join(
                            f" | on-site r{r['rank']}: {r['correct']}/{r['n']} correct ({r['sites']} site(s))"
                            for r in self.evaluate_on_sites(engine, round_)
                        )
                log.info("%s", line)
                if stop.requested and round_ < cfg.rounds:  # a safe point: the round and its records are on disk
                    raise RunInterrupted(round_)
        finally:
            bar.close()

    def finish(self) -> None:
        """Truncation curve, per-tier PEFT adapters, summary.csv and plots.

        The curve's t that are rank tiers take the tier records of the same round (the same model, the same
        examples: the same numbers), so only the other t are evaluated; curve records already written (a
        resumed run) are kept.
        """
        cfg, fed = self.cfg, self.federation
        if cfg.eval.truncation_curve:
            have = self.metrics.records_by_key(fed.round)
            for t in truncation_tiers(fed.spec.max_rank):
                if ("curve", t) in have:
                    continue
                tier = have.get(("tier", t))
                result = (
                    (
                        ({k: v for k, v in tier.items() if k not in RECORD_KEYS}),
                        self.dir.read_eval_examples(fed.round, "tier", t),
                    )
                    if tier is not None
                    else self.evaluate_tier_examples(t)
                )
                self._record(fed.round, t, "curve", result)
        write_outputs(fed, cfg, self.dir)


def write_outputs(fed: Federation, cfg: Config, directory: RunDir) -> None:
    """What a run writes from its last checkpoint and metrics.jsonl once every record is in: the per-tier PEFT
    adapters, summary.csv and the plots."""
    for t in fed.tiers():
        export_tier(fed, t, cfg, directory.adapter_dir(t))
    from .report import write_run_report

    write_run_report(directory.path)
    log.info("done: %s (metrics.jsonl, summary.csv, plots/, checkpoints/, adapters/)", directory.path)


def finish_from_disk(cfg: Config, out: str | Path, *, verbose: bool = True) -> Path:
    """--resume of a run whose rounds and records are all on disk but not every file written from them (the disk
    filled up, or the process died, after the last record): write the adapters and the report again from the
    last checkpoint and metrics.jsonl, without loading the model or the data and without running a round."""
    check_privacy(cfg)
    directory = RunDir(out)
    missing = directory.missing_outputs(cfg)  # before config.yaml and run.log are written again
    directory.prepare(cfg, resume=True)  # checks, lock, resume comparison, config.yaml
    setup_logging(directory.path, verbose)
    log.info(
        "--resume: every round and record of %s is written; writing what the run lacks: %s",
        directory.path,
        ", ".join(str(p.relative_to(directory.path)) for p in missing) or "nothing",
    )
    spec, _ = directory.checkpoint_spec()
    fed = Federation(cfg, directory.path, spec.modules)
    fed.start(resume=True)
    write_outputs(fed, cfg, directory)
    return directory.path


def export_adapters(session: Session, tiers: Sequence[int] | None = None) -> list[Path]:
    """adapters/rank-T/ for every tier: standard PEFT adapters of the global model as a rank-T client gets it."""
    fed = session.federation
    paths = []
    for t in tiers or fed.tiers():
        paths.append(export_tier(fed, t, session.cfg, session.dir.adapter_dir(t)))
    return paths


def export_tier(fed: Federation, t: int, cfg: Config, out_dir: Path, fmt: str = "peft", *, force: bool = False) -> Path:
    """One rank-t export of the global state: the global model as a rank-t client receives it, as a PEFT adapter
    directory (``peft``), a merged model directory (``merged``) or a llama.cpp GGUF LoRA adapter in
    ``out_dir`` (``gguf-lora``; :mod:`prelort.export`). Returns the directory or file written.

    The method says which factors (:meth:`prelort.methods.Method.export_adapter`): by default exactly what a
    rank-t client gets; a method whose clients get a merged base-weight delta exports its best rank-t
    approximation. Every format holds the same s * B_t A_t.
    """
    tensors = fed.method.export_adapter(fed.state, t)
    rank = min(t, adapter_rank(tensors))
    if fmt == "peft":
        # an alias is recorded as its hub id, so AutoPeftModelForCausalLM finds the base model online
        export_peft_adapter(tensors, rank, fed.spec.scale, hub_id(cfg.model.name), cfg.model.target_modules, out_dir)
        return out_dir
    export.files_for(fmt)  # an unknown format fails before the model loads
    factors = truncated_factors(tensors, rank)
    # merged into float32 weights on the CPU, whatever the run trained in (a quantised base included): the
    # exported model is exact
    model, tokenizer = load_model(cfg.model.model_copy(update={"dtype": "float32", "device": "cpu"}), "none")
    if fmt == "merged":
        export.merge_into(model, factors, fed.spec.scale)
        return export.write_merged(model, tokenizer, out_dir, force=force)
    return export.write_gguf_lora(
        factors,
        fed.spec.scale,
        model.config,
        Path(out_dir) / export.GGUF_LORA_FILE,
        base_gguf=export.base_gguf_file(cfg.model.name, cfg.model.gguf_file),
        name=f"prelort {fed.method.name} rank-{rank} adapter of {hub_id(cfg.model.name)}",
        force=force,
    )


def log_privacy(fed: Federation, round_: int) -> None:
    """run.log: the (epsilon, delta) accounted after ``round_`` (privacy.dp only; docs/privacy.md)."""
    rec = fed.privacy_record(round_)
    if not rec:
        return
    eps = rec["dp_epsilon"]
    plan = fed.accounting
    log.info(
        "round %d: privacy: epsilon=%s at delta=%.3g after %d round(s) (noise multiplier z=%.6g, clients "
        "sampled %d of %d, bound %s)",
        round_,
        "inf (no noise)" if eps is None else f"{eps:.6g}",
        rec["dp_delta"],
        round_,
        rec["dp_noise_multiplier"],
        plan.per_round,
        plan.num_clients,
        plan.bound,
    )


def _fmt(x: float | None, digits: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def open_federation(run_dir: str | Path) -> tuple[Config, Federation]:
    """The run's config and federation at its latest checkpoint, without loading the model or data."""
    directory = RunDir(run_dir)
    cfg = directory.load_config()
    spec, _ = directory.checkpoint_spec()
    fed = Federation(cfg, Path(run_dir), spec.modules)
    fed.start(resume=True)
    return cfg, fed


def run(cfg: Config, out: str | Path, *, resume: bool = False, verbose: bool = True) -> Path:
    """Run a whole federation with the engine named in the config (``resume`` on a finished run: nothing to do;
    on one whose rounds are done but not its adapters or report: :func:`finish_from_disk`). When it returns or
    raises, run.log is closed and the run directory's lock released (another process may resume it at once)."""
    try:
        if resume and RunDir(out).rounds_complete(cfg):
            if RunDir(out).missing_outputs(cfg):
                return finish_from_disk(cfg, out, verbose=verbose)
            return Path(out)
        from . import engines

        spec = engines.get(cfg.engine)  # the one place a config's engine is chosen (the table in prelort.engines)
        if spec.in_process:
            session = Session(cfg, out, resume=resume, verbose=verbose)
            return session.run(spec.builder()(session, progress=verbose))
        return spec.launcher()(cfg, Path(out), resume=resume, verbose=verbose)  # e.g. Flower: the ServerApp runs it
    finally:  # the run is over: what this process does next is no longer part of it
        close_run_log()
        RunDir(out).release_lock()
