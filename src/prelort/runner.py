"""A run directory from start to finish, for any engine.

``Session`` loads the base model and data, owns the run directory (config.yaml, run.log, metrics.jsonl,
checkpoints, adapters, report) and evaluates the global model per rank tier. An engine only has to turn a
round's :class:`~prelort.federation.ClientTask` list into updates (or exceptions).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from . import adapters
from .config import Config
from .data import load_records, partition, tokenize_for_training
from .evaluate import evaluate_examples, truncation_tiers
from .federation import ClientTask, Federation, MetricsLog, RoundFailed, check_privacy
from .methods import Broadcast, ClientUpdate
from .models import load_model

log = logging.getLogger("prelort")


class Engine(Protocol):
    def execute(self, tasks: Sequence[ClientTask]) -> list[ClientUpdate | Exception]: ...


def setup_logging(run_dir: Path, verbose: bool = True) -> None:
    """run.log gets everything (every rejection with its reason); the console gets INFO."""
    logger = logging.getLogger("prelort")
    logger.setLevel(logging.INFO)
    for h in list(logger.handlers):
        if getattr(h, "_prelort", False):
            logger.removeHandler(h)
            h.close()
    fh = logging.FileHandler(run_dir / "run.log")
    fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    fh._prelort = True  # type: ignore[attr-defined]
    logger.addHandler(fh)
    if verbose:
        sh = logging.StreamHandler(sys.stderr)
        sh.setFormatter(logging.Formatter("%(message)s"))
        sh._prelort = True  # type: ignore[attr-defined]
        logger.addHandler(sh)
    logger.propagate = False


def adapter_rank(adapter: dict[str, torch.Tensor]) -> int:
    a = next(v for k, v in adapter.items() if k.endswith(".lora_A"))
    return int(a.shape[0])


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


def load_federation_model(cfg: Config):
    """``(base_model, tokenizer, model)``: the base model with the federation's rank-R LoRA attached.

    The one recipe for the server and for every client process (Flower ClientApps call it too), so all
    of them hold the same weights for the same config.
    """
    quiet_libraries()
    torch.manual_seed(cfg.seed)
    base_model, tokenizer = load_model(cfg.model)
    model = adapters.attach_lora(base_model, cfg.model.target_modules, max(cfg.clients.ranks),
                                 cfg.lora.alpha, cfg.lora.dropout)
    return base_model, tokenizer, model


def load_data(cfg: Config) -> tuple[Any, Any, list[Any]]:
    """``(train, test, partitions)``: the record datasets and the per-client split (partitions[k] = client k's)."""
    train, test = load_records(cfg.data, cfg.seed)
    parts = partition(train, cfg.data.partition, cfg.clients.num, cfg.seed)
    return train, test, parts


class Session:
    """Model, data and run directory of one run. Engines call :meth:`run` with their executor."""

    def __init__(self, cfg: Config, run_dir: str | Path, *, resume: bool = False, verbose: bool = True,
                 read_only: bool = False):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.resume = resume or read_only
        self.verbose = verbose
        check_privacy(cfg)  # a refused setting must not leave a half-made run directory behind
        if not read_only:
            self._prepare_dir()
            setup_logging(self.run_dir, verbose)
        log.info("prelort run: method=%s engine=%s model=%s ranks=%s rounds=%d -> %s", cfg.method, cfg.engine,
                 cfg.model.name, cfg.clients.ranks, cfg.rounds, self.run_dir)
        self.base_model, self.tokenizer, self.model = load_federation_model(cfg)
        self.modules = adapters.adapted_modules(self.model)
        train, test, parts = load_data(cfg)
        self.test_records = test
        self.partitions = [tokenize_for_training(p, self.tokenizer, cfg.data.max_length) for p in parts]
        log.info("data: %d train / %d test records; client sizes %s", len(train), len(test),
                 [len(p) for p in self.partitions])
        self.federation = Federation(cfg, self.run_dir, self.modules)
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl")

    @classmethod
    def open(cls, run_dir: str | Path, verbose: bool = False) -> "Session":
        """An existing run, at its latest checkpoint, for evaluation (nothing in the run directory changes)."""
        cfg = load_run_config(run_dir)
        s = cls(cfg, run_dir, read_only=True, verbose=verbose)
        s.federation.start(resume=True)
        return s

    # -- run directory ------------------------------------------------------------------------------------
    def _prepare_dir(self) -> None:
        d = self.run_dir
        if self.resume:
            if not (d / "checkpoints").is_dir():
                raise FileNotFoundError(f"--resume: {d} has no checkpoints/ to resume from")
            old = d / "config.yaml"
            if old.exists():
                import yaml

                prev = yaml.safe_load(old.read_text())
                now = self.cfg.to_dict()
                changed = [k for k in ("method", "seed", "model", "lora", "clients", "data", "train", "prelort",
                                       "hetlora") if prev.get(k) != now.get(k)]
                if changed:
                    from .config import ConfigError

                    raise ConfigError(f"--resume: config differs from the run's config.yaml in {changed}; "
                                     "a resumed run must keep them")
        elif (d / "checkpoints").exists():
            raise FileExistsError(f"{d} already holds a run; use --resume to continue it or choose another --out")
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.yaml").write_text(self.cfg.to_yaml())

    # -- evaluation ---------------------------------------------------------------------------------------
    def _load_tier(self, broadcast: Broadcast) -> None:
        adapters.apply_broadcast(self.model, broadcast, adapter_rank(broadcast.adapter))

    def _evaluate(self, desc: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        return evaluate_examples(self.model, self.tokenizer, self.test_records, self.cfg.eval,
                                 self.cfg.data.max_length, progress=self.verbose, desc=desc)

    def _evaluate_tier(self, t: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        fed = self.federation
        self._load_tier(fed.method.tier(fed.state, t))
        return self._evaluate(f"eval rank {t}")

    def _evaluate_base(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        adapters.set_base_delta(self.model, None)
        with self.model.disable_adapter():
            return self._evaluate("eval base")

    def evaluate_tier(self, t: int) -> dict[str, Any]:
        return self._evaluate_tier(t)[0]

    def evaluate_base(self) -> dict[str, Any]:
        return self._evaluate_base()[0]

    def _record(self, round_: int, rank: Any, kind: str, result: tuple[dict[str, Any], list[dict[str, Any]]]
                ) -> dict[str, Any]:
        metrics, examples = result
        rec = {"round": round_, "rank": rank, "kind": kind, **metrics, "method": self.cfg.method,
               "seed": self.cfg.seed}
        self.metrics.write(rec)
        write_eval_examples(self.run_dir, round_, rank, kind, examples)
        return rec

    def evaluate_round(self, round_: int) -> list[dict[str, Any]]:
        return [self._record(round_, t, "tier", self._evaluate_tier(t)) for t in self.federation.tiers()]

    # -- the loop -----------------------------------------------------------------------------------------
    def run(self, engine: Engine) -> Path:
        cfg, fed = self.cfg, self.federation
        first = fed.start(resume=self.resume)
        if self.resume:
            self.metrics.truncate_after(fed.round)
            drop_eval_examples_after(self.run_dir, fed.round)
        elif cfg.eval.base:
            r = self._record(0, "base", "base", self._evaluate_base())
            log.info("round 0 base model: accuracy=%.3f rougeL=%s ppl=%.2f", r["accuracy"], _fmt(r["rougeL"], 3),
                     r["perplexity"])
        bar = tqdm(range(first, cfg.rounds + 1), desc="rounds", disable=not self.verbose, initial=first - 1,
                   total=cfg.rounds)
        for round_ in bar:
            try:
                outcome = fed.run_round(round_, engine.execute)  # begin, execute, end; retried if it fails
            except RoundFailed as e:
                log.error("%s", e)
                raise
            # training records carry the contract's fields too (no tier evaluated: rank and metrics null)
            self.metrics.write({"round": round_, "rank": None, "kind": "train", "accuracy": None, "rougeL": None,
                                "perplexity": None, "train_loss": outcome.train_loss,
                                "accepted": len(outcome.accepted), "rejected": len(outcome.rejected),
                                "failed": len(outcome.failed), "seconds": round(outcome.seconds, 3),
                                "method": cfg.method})
            line = (f"round {round_}/{cfg.rounds}: train_loss={_fmt(outcome.train_loss)} "
                    f"accepted={len(outcome.accepted)} rejected={len(outcome.rejected)} failed={len(outcome.failed)}")
            if fed.eval_due(round_):
                recs = self.evaluate_round(round_)
                line += " | " + " ".join(f"r{r['rank']}: acc={r['accuracy']:.3f} rL={_fmt(r['rougeL'], 3)} "
                                         f"ppl={r['perplexity']:.2f}" for r in recs)
            log.info("%s", line)
        bar.close()
        self.finish()
        return self.run_dir

    def finish(self) -> None:
        """Truncation curve, per-tier PEFT adapters, summary.csv and plots."""
        cfg, fed = self.cfg, self.federation
        if cfg.eval.truncation_curve:
            for t in truncation_tiers(fed.spec.max_rank):
                self._record(fed.round, t, "curve", self._evaluate_tier(t))
        export_adapters(self, self.run_dir / "adapters")
        from .report import write_run_report

        write_run_report(self.run_dir)
        log.info("done: %s (metrics.jsonl, summary.csv, plots/, checkpoints/, adapters/)", self.run_dir)


def export_adapters(session: Session, out: Path, tiers: Sequence[int] | None = None) -> list[Path]:
    """adapters/rank-T/ for every tier: standard PEFT adapters of the global model as a rank-T client gets it."""
    fed = session.federation
    paths = []
    for t in tiers or fed.tiers():
        paths.append(export_tier(fed, t, session.cfg, out / f"rank-{t}"))
    return paths


def export_tier(fed: Federation, t: int, cfg: Config, out_dir: Path) -> Path:
    """One rank-t PEFT adapter of the global state: the global model as a rank-t client receives it.

    LoRA-state methods and FlexLoRA export exactly what a rank-t client gets. FLoRA's clients get the
    full merged delta, which no rank-t LoRA holds: its export is the best rank-t approximation (SVD,
    Eckart-Young) of that delta, the same factorisation FlexLoRA broadcasts.
    """
    b = fed.method.tier(fed.state, t)
    tensors = b.adapter
    if b.base_delta:
        from .methods import GlobalState
        from .methods.flexlora import FlexLoRA

        tensors = FlexLoRA(fed.spec).broadcast(GlobalState(tensors=b.base_delta), t).adapter
    rank = min(t, adapter_rank(tensors))
    adapters.export_peft_adapter(tensors, rank, fed.spec.scale, cfg.model.name, cfg.model.target_modules, out_dir)
    return out_dir


def _fmt(x: float | None, digits: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


# -- per-example evaluation records ---------------------------------------------------------------------------
EVAL_DIR = "eval"


def eval_examples_path(run_dir: Path, round_: int) -> Path:
    return Path(run_dir) / EVAL_DIR / f"round-{round_}.jsonl"


def write_eval_examples(run_dir: Path, round_: int, rank: Any, kind: str, examples: Sequence[dict[str, Any]]) -> Path:
    """Put one evaluation's examples into ``eval/round-N.jsonl``, one JSON line per example:
    {"round", "rank", "kind", "id", "category", "correct", "loglik", "n_tokens", "prediction"}.

    Lines of the same (kind, rank) already in the file are replaced, not appended to (a resumed run
    re-evaluating a round leaves no duplicate), and the file is rewritten atomically (temporary file +
    rename), so a crash leaves either the old or the new file.
    """
    path = eval_examples_path(run_dir, round_)
    path.parent.mkdir(parents=True, exist_ok=True)
    kept = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                old = json.loads(line)
            except json.JSONDecodeError:
                continue
            if (old.get("kind"), old.get("rank")) != (kind, rank):
                kept.append(line)
    new = [json.dumps({"round": round_, "rank": rank, "kind": kind, **ex}) for ex in examples]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept + new))
    os.replace(tmp, path)
    return path


def drop_eval_examples_after(run_dir: Path, round_: int) -> None:
    """On resume: remove eval/round-N.jsonl of rounds after the checkpoint (they are evaluated again)."""
    for path in (Path(run_dir) / EVAL_DIR).glob("round-*.jsonl"):
        try:
            n = int(path.stem.split("-", 1)[1])
        except ValueError:
            continue
        if n > round_:
            path.unlink()


def load_run_config(run_dir: str | Path) -> Config:
    from . import config as config_mod

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a prelort run directory (no config.yaml)")
    return config_mod.load(path)


def open_federation(run_dir: str | Path) -> tuple[Config, Federation]:
    """The run's config and federation at its latest checkpoint, without loading the model or data."""
    from . import checkpoint as ckpt

    cfg = load_run_config(run_dir)
    spec, _ = ckpt.spec_from_checkpoint(run_dir)
    fed = Federation(cfg, Path(run_dir), spec.modules)
    fed.start(resume=True)
    return cfg, fed


def run(cfg: Config, out: str | Path, *, resume: bool = False, verbose: bool = True) -> Path:
    """Run a whole federation with the engine named in the config."""
    if cfg.engine == "inprocess":
        from .simulation import InProcessEngine

        session = Session(cfg, out, resume=resume, verbose=verbose)
        return session.run(InProcessEngine(session, progress=verbose))
    if cfg.engine in ("flower-sim", "flower"):
        from .flower import run_on_flower  # type: ignore[attr-defined]

        return run_on_flower(cfg, Path(out), resume=resume, verbose=verbose)
    raise ValueError(f"unknown engine {cfg.engine!r}")
