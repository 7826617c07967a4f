"""The round loop on a server state, independent of the engine that carries messages.

Per round: sample clients (seeded by seed and round, so a resumed run samples the same clients),
broadcast each client its rank-r_k state, collect updates, validate each (a rejected update is logged
with its reason and the round goes on), optionally clip, aggregate with the method's rule, evaluate
every ``eval.every`` rounds per rank tier, and checkpoint atomically.

Engines (:mod:`prelort.engines`: in-process, Flower) drive it through :meth:`Federation.run_round` (or
:meth:`Federation.begin_round` and :meth:`Federation.end_round`); the client side is
:class:`prelort.client.ClientRunner`. The messages between them are in :mod:`prelort.protocol`.

What an engine returns per task (:data:`~prelort.protocol.EngineResult`) is untrusted: a
:class:`~prelort.protocol.RawUpdate` (the wire format, decoded here with
:func:`~prelort.protocol.decode_raw`), a decoded :class:`ClientUpdate`, an :class:`UpdateRejected` from the engine's own
decoding (with ``.client`` set), or any other exception (the client failed). Nothing a client sends can
crash the round: every problem becomes a rejection ("rejected update from client K: <reason>: <message>"
in run.log) or a failure, and the round completes when at least ``clients.min_per_round`` updates were
accepted. Otherwise the round is retried up to ``clients.max_round_retries`` times with a resampled set
of clients, and then :class:`RoundFailed` stops the run with the state on disk at the last complete round.

Under ``privacy.secure_aggregation`` the engine returns one :class:`SecureAggregate` per round (SecAgg+'s
weighted mean of fixed-shape uploads): validation and robust clipping happen on each client before it
encodes its update, and :meth:`Federation.end_round_secure` finishes the round from the sums.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import checkpoint as ckpt
from . import methods as methods_registry
from .config import Config
from .methods import Broadcast, ClientUpdate, GlobalState, Method
from .privacy import check_dp, check_secure_aggregation, clip_update, dp_aggregate, finish_noised
from .protocol import ClientTask, EngineResult, EvalSums, EvalTask, RawUpdate, SecureAggregate, decode_raw
from .rank_geometry import adapter_prefix, segments
from .robust import cap_at_median, median_clip_scales, scale_segments, segment_change_norms, segment_medians
from .secure_sums import (
    WEIGHT_UNITS,
    SecAggLayout,
    aggregation_rule,
    decode_secagg_mean,
    finish_secagg,
    quantisation_bound,
)
from .updates import UpdateRejected, max_payload_bytes, save_update, server_check

log = logging.getLogger("prelort")


class RoundFailed(RuntimeError):
    """Too few clients delivered an acceptable update this round (below clients.min_per_round).

    ``round``: the round that failed; ``accepted``: accepted updates in its last attempt;
    ``min_per_round``; ``attempts``: how many times the round was tried; ``completed``: the last
    complete round (the state on disk, where ``--resume`` continues).
    """

    def __init__(self, message: str, *, round_: int, accepted: int, min_per_round: int, attempts: int, completed: int):
        super().__init__(message)
        self.round = round_
        self.accepted = accepted
        self.min_per_round = min_per_round
        self.attempts = attempts
        self.completed = completed


# Rejection reasons raised by the round loop itself, besides prelort.updates.REASONS (whose "not_sampled"
# is raised here too).
ROUND_REASONS: dict[str, str] = {
    "client_mismatch": "the metadata declares another client than the one that sent the update",
    "invalid_update": "checking the update raised an unexpected error (logged with its traceback)",
}


# A per-entry quantisation bound on SecAgg+'s sums above this is worth a warning in run.log.
SECAGG_PRECISION_WARNING = 1e-3


def derived_seed(seed: int, *parts: int) -> int:
    """A 63-bit seed derived from the run seed and (round, client, ...): every random choice of a round
    depends only on these numbers, so a resumed run repeats it exactly."""
    return random.Random(":".join(str(p) for p in (seed, *parts))).getrandbits(63)


def client_broadcast(method: Method, state: GlobalState, seed: int, round_: int, client: int) -> tuple[int, Broadcast]:
    """``(rank, broadcast)``: what ``client`` trains at and receives in round ``round_`` from the state of the round
    before (its fresh inits drawn with the seed derived from (seed, round, client)). The round loop sends it;
    ``prelort verify-update`` recomputes it to bound an update's change from it."""
    rank = method.client_rank(client, state)
    gen = torch.Generator().manual_seed(derived_seed(seed, round_, client))
    return rank, method.broadcast(state, rank, gen)


@dataclass
class RoundOutcome:
    round: int
    accepted: list[int] = field(default_factory=list)
    rejected: dict[int, str] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)
    train_loss: float | None = None
    seconds: float = 0.0
    attempts: int = 1
    # per rank dimension 0..R-1 of the global adapter: accepted clients whose update covers it, and optimizer
    # steps (summed over the clients that reported them) that changed it; see round_diagnostics
    dim_clients: list[int] = field(default_factory=list)
    dim_steps: list[int] = field(default_factory=list)
    passes: int = 0  # forward/backward passes of a micro-batch, summed over the clients that reported them
    optimizer_steps: int = 0
    diagnostics_reported: int = 0  # accepted clients whose step counts passed the checks and are in the sums
    # every sampled client: {client, rank, quantization, num_examples, status: accepted|rejected|failed[, reason]}
    clients: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """What the round's training record in metrics.jsonl says; kept in the round's state.json too, so a
        resumed run can write the record when the run stopped between the checkpoint and the record."""
        return {
            "train_loss": self.train_loss,
            "accepted": len(self.accepted),
            "rejected": len(self.rejected),
            "failed": len(self.failed),
            "seconds": round(self.seconds, 3),
            "dim_clients": self.dim_clients,
            "dim_steps": self.dim_steps,
            "passes": self.passes,
            "optimizer_steps": self.optimizer_steps,
            "diagnostics_reported": self.diagnostics_reported,
            "clients": self.clients,
        }


def round_diagnostics(
    clients: Sequence[tuple[int, int, Any]], max_rank: int, local_steps: int, grad_accum: int
) -> dict[str, Any]:
    """Per-dimension diagnostics of a round from its accepted clients ``(client, rank, meta)``.

    ``dim_clients[i]``: clients whose update has rank > i. ``dim_steps[i]``: the sum of the clients'
    ``meta["dim_steps"][i]`` (optimizer steps of that client that changed dimension i). ``passes`` and
    ``optimizer_steps``: sums of ``meta["passes"]`` and ``meta["steps"]``. A client's report is only
    diagnostics, never trusted for aggregation: one that is not a list of ``rank`` (or more: a client
    that pruned its rank reports before pruning, at most R) integers in [0, local_steps], with steps in
    [0, local_steps] and passes in [0, local_steps * grad_accum * R], is left out of the step sums (logged)
    and its update stays accepted.
    """

    def whole(x: Any, hi: int) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= hi

    dim_clients = [0] * max_rank
    dim_steps = [0] * max_rank
    passes = steps = reported = 0
    for client, rank, meta in clients:
        for i in range(min(rank, max_rank)):
            dim_clients[i] += 1
        meta = meta if isinstance(meta, dict) else {}
        counts, p, k = meta.get("dim_steps"), meta.get("passes"), meta.get("steps")
        if not (
            isinstance(counts, list)
            and rank <= len(counts) <= max_rank
            and all(whole(c, local_steps) for c in counts)
            and whole(p, local_steps * grad_accum * max_rank)
            and whole(k, local_steps)
        ):
            if counts is not None or p is not None:
                log.warning(
                    "client %s: ignoring its step counts (dim_steps %.80r, passes %r, steps %r): not within "
                    "the round's bounds",
                    client,
                    counts,
                    p,
                    k,
                )
            continue
        for i in range(rank):
            dim_steps[i] += counts[i]
        passes += p
        steps += k
        reported += 1
    return {
        "dim_clients": dim_clients,
        "dim_steps": dim_steps,
        "passes": passes,
        "optimizer_steps": steps,
        "diagnostics_reported": reported,
    }


def check_privacy(cfg: Config, method: Method | None = None) -> None:
    """Refuse privacy and robust-aggregation settings the method or the round loop cannot honour, before
    anything runs."""
    if method is None:
        method = methods_registry.build(cfg.method, cfg.federation_spec({}))
    if cfg.privacy.dp:
        check_dp(method)
    check_privacy_budget(cfg)
    if cfg.privacy.secure_aggregation:
        check_secure_aggregation(cfg)
    check_robust_aggregator(cfg, method)


def check_robust_aggregator(cfg: Config, method: Method) -> None:
    """Refuse a coordinate-wise ``robust.aggregator`` where it cannot run: a method whose aggregate is not a mean
    of the clients' factors (no sum rule), client-level DP (its noise is calibrated to a sum of clipped
    updates) and secure aggregation (the server only ever sees the sum)."""
    from .config import ConfigError

    aggregator = cfg.robust.aggregator
    if aggregator == "mean":
        return
    if not method.sum_aggregatable:
        able = ", ".join(sorted(n for n, c in methods_registry.available().items() if c.sum_aggregatable))
        raise ConfigError(
            f"robust.aggregator={aggregator}: method {cfg.method!r} does not aggregate by a mean of the clients' "
            f"factors (no sum rule), so no coordinate-wise statistic can replace it; methods that can: {able}"
        )
    for flag, why in (
        ("dp", "its noise is calibrated to the sum of the clipped updates, not to a median or trimmed mean"),
        ("secure_aggregation", "the server only ever learns the sum of the updates, never the values to sort"),
    ):
        if getattr(cfg.privacy, flag):
            raise ConfigError(f"robust.aggregator={aggregator} cannot be combined with privacy.{flag}: {why}")


def check_privacy_budget(cfg: Config) -> None:
    """Refuse ``privacy.target_epsilon`` without ``privacy.dp`` or next to a noise multiplier, and a budget the
    calibration cannot meet (:func:`prelort.accounting.resolve_noise_multiplier`), before the run starts."""
    from .accounting import resolve_noise_multiplier
    from .config import ConfigError

    p = cfg.privacy
    if p.target_epsilon is not None and not p.dp:
        raise ConfigError("privacy.target_epsilon needs privacy.dp: true (the budget is met by clipping and noise)")
    if p.target_epsilon is not None and p.noise_multiplier > 0:
        raise ConfigError(
            f"privacy.target_epsilon={p.target_epsilon:g} and privacy.noise_multiplier="
            f"{p.noise_multiplier:g} both set the noise: the budget calibrates the noise multiplier, "
            "so set one of them (noise_multiplier back to 0)"
        )
    if p.dp:
        resolve_noise_multiplier(cfg)


class Federation:
    """Server state and the per-round protocol. Holds no model: evaluation is a callback."""

    def __init__(self, cfg: Config, run_dir: Path, modules: dict[str, tuple[int, int]]):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.spec = cfg.federation_spec(modules)
        self.method: Method = methods_registry.build(cfg.method, self.spec)
        check_privacy(cfg, self.method)
        self.noise_multiplier: float | None = None  # z the rounds use (privacy.dp; calibrated for a target_epsilon)
        self.accounting = None  # prelort.accounting.AccountingPlan under privacy.dp
        if cfg.privacy.dp:
            from .accounting import resolve_noise_multiplier

            self.noise_multiplier, self.accounting = resolve_noise_multiplier(cfg)
        self.state: GlobalState | None = None
        self.round = 0  # last completed round
        self._tasks: dict[int, ClientTask] = {}
        self._attempt = 0
        # how each client holds its base model, for the training records: the config's rule unless the engine
        # knows better (a SuperNode's declaration; the runner hands over protocol.QuantizationReporter's)
        self.quantization_of: Callable[[int], str | None] = cfg.client_quantization

    # -- life cycle -------------------------------------------------------------------------------------
    def checkpoint_info(self) -> dict[str, Any]:
        return {
            "method": self.cfg.method,
            "modules": {m: list(s) for m, s in self.spec.modules.items()},
            "client_ranks": list(self.spec.client_ranks),
            "alpha": self.spec.alpha,
            "options": self.spec.options,
            "seed": self.cfg.seed,
            # every random choice is derived from (seed, round, client): no generator state to carry
            "rng": {"scheme": "derived", "seed": self.cfg.seed},
            **(
                {"dp": {"noise_multiplier": self.noise_multiplier, "delta": self.accounting.delta}}
                if self.accounting is not None
                else {}
            ),
        }

    def start(self, resume: bool = False) -> int:
        """Initialise (round 0) or resume from the last complete checkpoint. Returns the next round."""
        if self.accounting is not None:
            p = self.cfg.privacy
            how = (
                f"calibrated for target_epsilon={p.target_epsilon:g} over {self.cfg.rounds} rounds"
                if p.target_epsilon is not None
                else "privacy.noise_multiplier"
            )
            log.info(
                "differential privacy: noise multiplier z=%.6g (%s), clip norm C=%g, delta=%.3g; accounting: %s (%s)",
                self.noise_multiplier,
                how,
                p.clip_norm,
                self.accounting.delta,
                self.accounting.bound,
                self.accounting.why,
            )
        latest = ckpt.latest_intact_round(self.run_dir) if resume else None  # a damaged last round: the one before
        if latest is not None:
            self.round, self.state, info = ckpt.load_checkpoint(self.run_dir, latest)
            if info.get("method") != self.cfg.method:
                raise ValueError(
                    f"cannot resume: checkpoint method {info.get('method')!r} != config {self.cfg.method!r}"
                )
            self._check_resumed_noise(info)
            log.info("resuming after round %d", self.round)
        else:
            gen = torch.Generator().manual_seed(derived_seed(self.cfg.seed, 0))
            self.state = self.method.init_state(gen)
            self.round = 0
            ckpt.save_checkpoint(self.run_dir, 0, self.state, self.checkpoint_info())
        return self.round + 1

    def _check_resumed_noise(self, info: dict[str, Any]) -> None:
        """Epsilon is accounted for one noise multiplier over all rounds: a resume whose z differs from the one
        the finished rounds used (e.g. ``rounds`` changed under a ``target_epsilon``) is refused."""
        done = info.get("dp", {}).get("noise_multiplier") if isinstance(info.get("dp"), dict) else None
        if self.round == 0 or (done is None and self.noise_multiplier is None):
            return
        if done is None or self.noise_multiplier is None or abs(float(done) - self.noise_multiplier) > 1e-12:
            raise ValueError(
                f"cannot resume: rounds 1-{self.round} ran with noise multiplier {done} but this config "
                f"gives {self.noise_multiplier} (privacy.dp, privacy.noise_multiplier, "
                "privacy.target_epsilon and, with a budget, rounds must stay as they were)"
            )

    def privacy_record(self, round_: int) -> dict[str, Any]:
        """The accounted privacy after ``round_`` complete rounds, for the round's metrics record (empty without
        ``privacy.dp``): ``dp_epsilon`` (null while z = 0: no guarantee), ``dp_delta``, ``dp_noise_multiplier``."""
        if self.accounting is None or self.noise_multiplier is None:
            return {}
        from .accounting import epsilon_after

        eps = epsilon_after(self.accounting, self.noise_multiplier, round_)
        return {
            "dp_epsilon": eps if eps != float("inf") else None,
            "dp_delta": self.accounting.delta,
            "dp_noise_multiplier": self.noise_multiplier,
        }

    # -- one round --------------------------------------------------------------------------------------
    def sample_clients(self, round_: int, attempt: int = 0) -> list[int]:
        """This round's clients, drawn with a seed derived from (seed, round) - and the attempt number for a
        retried round, so a retry may reach other clients when ``per_round < num``."""
        parts = (round_, -1) if attempt == 0 else (round_, -1, attempt)
        rng = random.Random(derived_seed(self.cfg.seed, *parts))
        if self.cfg.clients.sampling == "stratified":
            return stratified_sample(self.cfg.clients.all_ranks(), self.cfg.clients.per_round, rng)
        return sorted(rng.sample(range(self.cfg.clients.num), self.cfg.clients.per_round))

    def begin_round(self, round_: int, attempt: int = 0) -> list[ClientTask]:
        """The tasks of this round's sampled clients (``attempt`` > 0: a retry of a failed round).

        A client's training seed depends on (seed, round, client) only, not on the attempt: a client that
        trains in a retry produces the update it would have produced in the first attempt.
        """
        assert self.state is not None, "call start() first"
        self._attempt = attempt
        tasks = []
        for client in self.sample_clients(round_, attempt):
            rank, broadcast = client_broadcast(self.method, self.state, self.cfg.seed, round_, client)
            seed = derived_seed(self.cfg.seed, round_, client)
            tasks.append(ClientTask(round_, client, rank, broadcast, self.method.plan(rank), seed))
        self._tasks = {t.client: t for t in tasks}
        return tasks

    def received(self, client: int, rank: int) -> dict[str, torch.Tensor]:
        """The adapter ``client`` received this round, cut to ``rank`` (a client may return fewer dims)."""
        return adapter_prefix(self._tasks[client].broadcast.adapter, rank)

    def accept(self, update: ClientUpdate, seen: set[int]) -> ClientUpdate:
        """Validate (raises UpdateRejected with the reason) and apply robust clipping."""
        task = self._tasks.get(update.client)
        if task is None:
            raise UpdateRejected("not_sampled", f"client {update.client} was not sampled in round {self.round + 1}")
        server_check(
            update,
            self.spec,
            self.method,
            self.cfg.validation,
            round_=task.round,
            seen_clients=seen,
            reference=task.broadcast.adapter,
        )
        seen.add(update.client)
        if self.cfg.robust.clip_norm is not None and not self.cfg.privacy.dp:  # DP clips with its own bound
            update, norm, clipped = clip_update(
                update, self.received(update.client, update.rank), self.cfg.robust.clip_norm
            )
            if clipped:
                log.info(
                    "round %d: clipped client %d update change %.4g -> %.4g",
                    task.round,
                    update.client,
                    norm,
                    self.cfg.robust.clip_norm,
                )
                update.meta = dict(update.meta, clipped_from=norm)
        return update

    def end_round(self, round_: int, results: Sequence[EngineResult], seconds: float = 0.0) -> RoundOutcome:
        """Decode, validate and aggregate this round's results, checkpoint, return what happened.

        Only the first reply of each client counts: any further reply from it this round is rejected
        (``duplicate_client``), whether the first one was accepted or not. Raises :class:`RoundFailed`
        (state unchanged) when fewer than ``clients.min_per_round`` updates were accepted.
        """
        assert self.state is not None
        if self.cfg.privacy.secure_aggregation:
            # never aggregate in the clear what the config says must be aggregated securely
            raise RuntimeError(
                "privacy.secure_aggregation is on but the engine returned individual updates; "
                "it must return a SecureAggregate (engines flower-sim / flower)"
            )
        outcome = RoundOutcome(round_)
        accepted: list[ClientUpdate] = []
        seen: set[int] = set()  # clients whose update was accepted (validate_update's duplicate check)
        replied: set[Any] = set()  # clients that already replied this round, accepted or not
        for res in results:
            if isinstance(res, Exception) and not isinstance(res, UpdateRejected):
                who = getattr(res, "client", "?")
                outcome.failed[who] = f"{type(res).__name__}: {res}"
                log.warning("round %d: client %s failed: %s: %s", round_, who, type(res).__name__, res)
                continue
            sender = getattr(res, "client", "?")
            try:
                if sender in replied and sender != "?":
                    raise UpdateRejected("duplicate_client", f"client {sender} already replied this round")
                replied.add(sender)
                if isinstance(res, UpdateRejected):
                    raise res
                update = decode_raw(res, max_payload_bytes(self.spec), self.spec) if isinstance(res, RawUpdate) else res
                if not isinstance(update, ClientUpdate):
                    raise UpdateRejected(
                        "not_safetensors", f"the engine returned a {type(update).__name__}, not an update"
                    )
                upd = self.accept(update, seen)
            except UpdateRejected as e:
                self._reject(outcome, round_, sender, e)
                continue
            except Exception as e:  # whatever a client sent, the server keeps going without it
                log.exception("round %d: the update from client %s could not be checked", round_, sender)
                self._reject(outcome, round_, sender, UpdateRejected("invalid_update", f"{type(e).__name__}: {e}"))
                continue
            accepted.append(upd)
            outcome.accepted.append(upd.client)
        self._check_enough(
            round_,
            len(accepted),
            f"{len(results)} replies ({len(outcome.rejected)} rejected, {len(outcome.failed)} failed clients)",
        )
        outcome.train_loss = _mean_loss([u.meta for u in accepted])
        self._diagnose(outcome, [(u.client, u.rank, u.meta) for u in accepted])
        outcome.clients = self._client_list(outcome, {u.client: (u.rank, u.num_examples) for u in accepted})
        if not self.cfg.privacy.dp:  # under DP its clip and weight 1 bound every client already
            accepted = self._limit_influence(round_, accepted)
        if self.cfg.audit:
            from .rundir import RunDir

            for u in accepted:
                save_update(RunDir(self.run_dir).update_stem(round_, u.client), u)
        if self.cfg.privacy.dp:
            references = {u.client: self.received(u.client, u.rank) for u in accepted}
            gen = torch.Generator().manual_seed(derived_seed(self.cfg.seed, round_, -2))
            privacy = self.cfg.privacy.model_copy(update={"noise_multiplier": self.noise_multiplier})
            self.state, info = dp_aggregate(self.method, self.state, accepted, references, privacy, gen)
            log.info("round %d: differential privacy: %s", round_, json.dumps(info, default=str))
        else:
            robust = self.cfg.robust
            new_state = (
                self.method.aggregate(self.state, accepted)
                if robust.aggregator == "mean"
                else self.method.aggregate_robust(self.state, accepted, robust.aggregator, robust.trim_fraction)
            )
            # last line of defence: a state that is not finite is never checkpointed or broadcast
            bad = sorted(name for name, t in new_state.tensors.items() if not bool(torch.isfinite(t).all()))
            if bad:
                raise RoundFailed(
                    f"round {round_}: aggregation produced non-finite values in {bad[:3]}; the run "
                    f"directory holds round {self.round}",
                    round_=round_,
                    accepted=len(accepted),
                    min_per_round=self.cfg.clients.min_per_round,
                    attempts=self._attempt + 1,
                    completed=self.round,
                )
            self.state = new_state
        return self._commit_round(round_, outcome, seconds)

    def _limit_influence(self, round_: int, updates: list[ClientUpdate]) -> list[ClientUpdate]:
        """The round's bounds relative to its other clients (:mod:`prelort.robust`): each change clipped per segment
        to ``robust.clip_to_median`` x the segment's median change norm, then each ``num_examples`` capped at
        ``robust.max_examples_ratio`` x the round's median. Logs the round's change statistics (what the
        defaults were measured with, docs/security.md) and every client it clipped or capped."""
        robust = self.cfg.robust
        bounds = segments(self.spec.client_ranks)
        references = [self.received(u.client, u.rank) for u in updates]
        changes = [{n: x - ref[n] for n, x in u.tensors.items()} for u, ref in zip(updates, references)]
        norms = [segment_change_norms(c, bounds) for c in changes]
        medians = segment_medians(norms)
        ratios = [
            None if m is None else max(n / m if m > 0 else float("inf") for row in norms if (n := row[j]) is not None)
            for j, m in enumerate(medians)
        ]
        largest = max((float(t.abs().max()) for c in changes for t in c.values() if t.numel()), default=0.0)
        log.info(
            "round %d: changes from what the clients received: largest entry %.4g; per segment %s, the largest "
            "norm / median norm %s",
            round_,
            largest,
            [list(b) for b in bounds],
            ["-" if r is None else f"{r:.3g}" for r in ratios],
        )
        factor = robust.clip_to_median
        scales = (
            median_clip_scales(norms, medians, factor) if factor is not None else [[1.0] * len(bounds)] * len(norms)
        )
        out = []
        for update, ref, change, row, norm_row in zip(updates, references, changes, scales, norms):
            if any(s < 1.0 for s in row):
                clipped = scale_segments(change, row, bounds)
                update = dataclasses.replace(update, tensors={n: (ref[n] + clipped[n]).contiguous() for n in change})
                log.warning(
                    "round %d: clipped client %d's change to %g x the median per segment (robust.clip_to_median): %s",
                    round_,
                    update.client,
                    robust.clip_to_median,
                    ", ".join(
                        f"[{lo}, {hi}) {n:.4g} -> {n * s:.4g}"
                        for (lo, hi), n, s in zip(bounds, norm_row, row)
                        if s < 1.0 and n is not None
                    ),
                )
            out.append(update)
        if robust.max_examples_ratio is not None:
            capped = cap_at_median([u.num_examples for u in out], robust.max_examples_ratio)
            for i, (update, n) in enumerate(zip(out, capped)):
                if n != update.num_examples:
                    log.warning(
                        "round %d: capped client %d's num_examples %d -> %d (%g x the round's median; "
                        "robust.max_examples_ratio)",
                        round_,
                        update.client,
                        update.num_examples,
                        n,
                        robust.max_examples_ratio,
                    )
                    out[i] = dataclasses.replace(update, num_examples=n)
        return out

    def end_round_secure(self, round_: int, agg: SecureAggregate, seconds: float = 0.0) -> RoundOutcome:
        """Finish a round from SecAgg+'s output (:class:`SecureAggregate`) instead of from updates.

        The server never sees an individual update: each client validated (and, with ``robust.clip_norm``,
        clipped) its own update before encoding it, and an invalid one was never sent (that client is in
        ``agg.failed``). The new state is :func:`prelort.secure_sums.finish_secagg` of the sums; the
        log line gives the clients aggregated, SecAgg+'s per-entry quantisation bound on the sums N', D'
        (:func:`prelort.secure_sums.quantisation_bound`) and the dropped clients. Checkpoint and
        :class:`RoundFailed` (fewer than ``clients.min_per_round`` clients aggregated) as in :meth:`end_round`.
        """
        assert self.state is not None
        outcome = RoundOutcome(round_)
        outcome.failed = dict(agg.failed)
        clients = [(c, m) for c, m in agg.clients if c in self._tasks]
        for c, _ in agg.clients:
            if c not in self._tasks:  # engines map nodes to sampled clients; defence in depth
                log.warning("round %d: SecAgg+ result names client %s, which was not sampled", round_, c)
        outcome.accepted = [c for c, _ in clients]
        for client, reason in sorted(outcome.failed.items(), key=lambda kv: str(kv[0])):
            log.warning("round %d: client %s is not in the secure sum: %s", round_, client, reason)
        count = len(clients) if agg.arrays is not None else 0
        self._check_enough(
            round_,
            count,
            f"{len(self._tasks)} sampled clients under SecAgg+ ({len(outcome.failed)} "
            "dropped or failed" + ("; the protocol halted" if agg.arrays is None else "") + ")",
        )
        outcome.train_loss = _mean_loss([m for _, m in clients])
        counted = [(c, self.method.counted_rank(self._clear_meta(c, m), self._tasks[c].rank), m) for c, m in clients]
        self._diagnose(outcome, counted)
        # a client's own example count stays inside SecAgg+'s sum: null here
        outcome.clients = self._client_list(outcome, {c: (r, None) for c, r, _ in counted})
        layout = SecAggLayout.of(self.state)
        rho_total = sum(agg.weight_units) / WEIGHT_UNITS
        clear = [(c, self._clear_meta(c, m)) for c, m in clients]
        if self.cfg.privacy.dp:
            self.state = self._finish_secure_dp(round_, agg.arrays, layout, rho_total, clear)
        else:
            self.state = finish_secagg(self.method, self.state, agg.arrays, layout, clear)
        in_sum = len(agg.clients)  # the bound counts every upload in the sum
        bound = (
            quantisation_bound(in_sum, rho_total, agg.clipping_range, agg.quantization_range)
            if rho_total > 0
            else float("inf")
        )
        log.info(
            "round %d: secure aggregation (SecAgg+): %d clients aggregated %s; quantisation bound %.6g per "
            "entry of the sums N', D' (K=%d, sum rho=%.6g, clipping range %g, quantization range %d); "
            "dropped/failed clients: %s",
            round_,
            count,
            sorted(outcome.accepted),
            bound,
            in_sum,
            rho_total,
            agg.clipping_range,
            agg.quantization_range,
            sorted(outcome.failed) or "none",
        )
        if bound > SECAGG_PRECISION_WARNING:
            log.warning(
                "round %d: SecAgg+ recovered the sums only to +-%.3g per entry: the clients' weights are small "
                "against the public bound W (sum rho = %.3g); a tighter W (a weight that depends on "
                "the update: a lower validation.max_update_norm) restores precision",
                round_,
                bound,
                rho_total,
            )
        return self._commit_round(round_, outcome, seconds)

    def _commit_round(self, round_: int, outcome: RoundOutcome, seconds: float) -> RoundOutcome:
        """The round is done: checkpoint the new state with its outcome (both ways of ending a round)."""
        self.round = round_
        outcome.seconds = seconds
        outcome.attempts = self._attempt + 1
        # the outcome without its wall time: a checkpoint's bytes depend only on the run's inputs
        kept = {k: v for k, v in outcome.summary().items() if k != "seconds"}
        ckpt.save_checkpoint(self.run_dir, round_, self.state, {**self.checkpoint_info(), "outcome": kept})
        return outcome

    def _finish_secure_dp(
        self, round_: int, arrays: list[Any], layout: Any, rho_total: float, clear: list[tuple[int, dict[str, Any]]]
    ) -> GlobalState:
        """DP under secure aggregation: every client clipped its own update to ``privacy.clip_norm`` and uploaded
        it with weight 1 (rho_k = 1), so SecAgg+'s mean times sum rho (= K) is the sum of the clipped updates
        N = sum_k pad(X~_k) (and D the coverage counts); the server adds the noise central DP adds, from the same
        generator, and finishes with the method's rule. It never sees one client's update."""
        assert self.state is not None
        rule = aggregation_rule(self.method)
        if abs(rho_total - len(clear)) > 1e-9:  # each client must upload with weight 1 (W = 1): rho_k = 1
            log.warning(
                "round %d: under privacy.dp the SecAgg+ weights add up to %.6g, not the %d clients in the sum "
                "(a client reported a weight other than 1)",
                round_,
                rho_total,
                len(clear),
            )
        mean_num, mean_den = decode_secagg_mean(arrays, layout)
        num = {k: v * rho_total for k, v in mean_num.items()}
        den = {k: v * rho_total for k, v in mean_den.items()}
        gen = torch.Generator().manual_seed(derived_seed(self.cfg.seed, round_, -2))
        out, info = finish_noised(
            self.method,
            self.state,
            rule,
            num,
            den,
            clear,
            self.cfg.privacy.clip_norm,
            float(self.noise_multiplier or 0.0),
            gen,
        )
        # how many clients clipped stays with them: a clear flag would tell the server about one update
        info.update(clients=len(clear), where="server noise on the SecAgg+ sums of the client-clipped updates")
        log.info("round %d: differential privacy: %s", round_, json.dumps(info, default=str))
        return out

    def _clear_meta(self, client: int, meta: Any) -> dict[str, Any]:
        """The clear metadata a client sent with its upload, as the method's bookkeeping may use it: a field the
        method finds invalid for the client's rank (:meth:`Method.check_clear_meta`) is dropped with a warning
        (the update itself was never seen)."""
        if not isinstance(meta, dict):
            return {}
        task = self._tasks[client]
        invalid = self.method.check_clear_meta(meta, task.rank)
        if not invalid:
            return meta
        for reason in invalid.values():
            log.warning("round %d: ignoring client %d's %s", task.round, client, reason)
        return {k: v for k, v in meta.items() if k not in invalid}

    def _client_list(self, outcome: RoundOutcome, accepted: dict[int, tuple[int, int | None]]) -> list[dict[str, Any]]:
        """The round's sampled clients for its training record: an accepted one with the rank and example count
        of its update, a rejected or failed one with the rank it was asked to train and the reason; each with
        how it holds its base model (``quantization``, null where not known)."""
        out: list[dict[str, Any]] = []
        for client, task in sorted(self._tasks.items()):
            entry: dict[str, Any] = {
                "client": client,
                "rank": task.rank,
                "quantization": self.quantization_of(client),
                "num_examples": None,
            }
            if client in accepted:
                entry.update(rank=accepted[client][0], num_examples=accepted[client][1], status="accepted")
            elif client in outcome.rejected:
                entry.update(status="rejected", reason=outcome.rejected[client])
            else:
                entry.update(status="failed", reason=outcome.failed.get(client, "no reply this round"))
            out.append(entry)
        return out

    def _diagnose(self, outcome: RoundOutcome, clients: Sequence[tuple[int, int, Any]]) -> None:
        diag = round_diagnostics(clients, self.spec.max_rank, self.cfg.train.local_steps, self.cfg.train.grad_accum)
        for key, value in diag.items():
            setattr(outcome, key, value)

    def _check_enough(self, round_: int, accepted: int, what: str) -> None:
        """Raise :class:`RoundFailed` when fewer than ``clients.min_per_round`` updates count this round."""
        minimum = self.cfg.clients.min_per_round
        if accepted < minimum:
            attempts = self._attempt + 1
            tried = f" (attempt {attempts})" if attempts > 1 else ""
            raise RoundFailed(
                f"round {round_}{tried}: {accepted} accepted update(s) from {what}, fewer than "
                f"clients.min_per_round={minimum}; the run directory holds round {self.round}, continue it "
                "with --resume once the cause is fixed",
                round_=round_,
                accepted=accepted,
                min_per_round=minimum,
                attempts=attempts,
                completed=self.round,
            )

    @staticmethod
    def _reject(outcome: RoundOutcome, round_: int, sender: Any, e: UpdateRejected) -> None:
        # a rejected duplicate must not overwrite the record of the client's first reply
        outcome.rejected.setdefault(sender, str(e))
        log.warning("round %d: rejected update from client %s: %s", round_, sender, e)

    def run_round(
        self, round_: int, execute: Callable[[Sequence[ClientTask]], Sequence[EngineResult] | SecureAggregate]
    ) -> RoundOutcome:
        """One whole round: begin, ``execute(tasks)`` (the engine), end; retried when it fails.

        An engine under secure aggregation returns one :class:`SecureAggregate` for the round, finished by
        :meth:`end_round_secure`; otherwise a result per task, finished by :meth:`end_round`.

        A round with too few accepted updates is tried again, up to ``clients.max_round_retries`` times,
        each retry sampling clients with a seed derived from (seed, round, attempt) (the same clients when
        ``per_round == num``: that covers transient failures) and training each with its usual
        (seed, round, client) seed. After the last attempt :class:`RoundFailed` propagates; the state
        is then still that of round ``self.round``, on disk and in memory.
        """
        retries = self.cfg.clients.max_round_retries
        t0 = time.perf_counter()
        for attempt in range(retries + 1):
            tasks = self.begin_round(round_, attempt)
            results = execute(tasks)
            try:
                if isinstance(results, SecureAggregate):
                    return self.end_round_secure(round_, results, seconds=time.perf_counter() - t0)
                return self.end_round(round_, results, seconds=time.perf_counter() - t0)
            except RoundFailed as e:
                if attempt == retries:
                    raise
                log.warning(
                    "round %d: %d accepted update(s), fewer than clients.min_per_round=%d; retrying the "
                    "round with resampled clients (retry %d of clients.max_round_retries=%d)",
                    round_,
                    e.accepted,
                    e.min_per_round,
                    attempt + 1,
                    retries,
                )
        raise AssertionError("unreachable")

    # -- evaluation ---------------------------------------------------------------------------------------
    def tiers(self) -> list[int]:
        return self.spec.distinct_ranks

    def eval_due(self, round_: int) -> bool:
        return round_ % self.cfg.eval.every == 0 or round_ == self.cfg.rounds

    def site_eval_tasks(self, round_: int) -> list[EvalTask]:
        """On-site evaluation after ``round_``: every client sampled in it evaluates the new global state as its
        rank tier receives it (the tier its site declared, which is where its result is counted)."""
        assert self.state is not None
        tiers: dict[int, Any] = {}
        tasks = []
        for client in sorted(self._tasks):
            t = self.spec.client_ranks[client]
            if t not in tiers:
                tiers[t] = self.method.tier(self.state, t)
            tasks.append(EvalTask(round_, client, t, tiers[t]))
        return tasks

    def site_eval_sums(
        self, round_: int, tasks: Sequence[EvalTask], results: Sequence[EvalSums | Exception | None]
    ) -> dict[int, dict[str, Any]]:
        """Per rank tier, the sums of the sites' evaluations: ``{tier: {n, correct, loglik_sum, tokens, sites}}``.
        A site without held-out records (None) is skipped; a failed one or sums that do not add up are logged
        and left out."""
        out: dict[int, dict[str, Any]] = {}
        for task, res in zip(tasks, results):
            if res is None:
                continue
            if isinstance(res, Exception):
                problem: str | None = f"{type(res).__name__}: {res}"
            elif not isinstance(res, EvalSums):
                problem = f"the engine returned a {type(res).__name__}, not evaluation sums"
            else:
                problem = f"the sums name client {res.client!r}" if res.client != task.client else res.problem()
            if problem is not None or not isinstance(res, EvalSums):
                log.warning("round %d: on-site evaluation of client %d left out: %s", round_, task.client, problem)
                continue
            tier = out.setdefault(task.rank, {"n": 0, "correct": 0, "loglik_sum": 0.0, "tokens": 0, "sites": 0})
            tier["n"] += res.n
            tier["correct"] += res.correct
            tier["loglik_sum"] += float(res.loglik_sum)
            tier["tokens"] += res.tokens
            tier["sites"] += 1
        return dict(sorted(out.items()))


def stratified_sample(ranks: Sequence[int], k: int, rng: random.Random) -> list[int]:
    """``k`` of the clients ``0..len(ranks)-1`` (sorted), drawn per rank tier in proportion to its size.

    Tier r with n_r clients gets floor(k n_r / N) clients, and the k - sum(floors) left over go one each to
    the tiers with the largest remainders (ties broken by ``rng``); each tier's clients are then drawn
    without replacement. A tier gets at most n_r (its quota k n_r / N <= n_r), so with k >= the number of
    tiers and equal tiers every tier is drawn every round.
    """
    n = len(ranks)
    if not 0 <= k <= n:
        raise ValueError(f"cannot sample {k} of {n} clients")
    tiers: dict[int, list[int]] = {}
    for client, r in enumerate(ranks):
        tiers.setdefault(int(r), []).append(client)
    order = sorted(tiers)
    quota = {r: k * len(tiers[r]) // n for r in order}
    # largest remainder first; a random key breaks ties so no tier is favoured by its position
    left = sorted(order, key=lambda r: (-(k * len(tiers[r]) % n), rng.random()))
    for r in left[: k - sum(quota.values())]:
        quota[r] += 1
    chosen: list[int] = []
    for r in order:
        chosen += rng.sample(tiers[r], quota[r])
    return sorted(chosen)


def _mean_loss(metas: Sequence[Any]) -> float | None:
    losses = [
        m["loss"]
        for m in metas
        if isinstance(m, dict) and isinstance(m.get("loss"), (int, float)) and not isinstance(m.get("loss"), bool)
    ]
    return float(sum(losses) / len(losses)) if losses else None
