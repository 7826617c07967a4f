"""The round protocol between the round loop and the engines that carry its messages.

:class:`prelort.federation.Federation` turns each sampled client into a :class:`ClientTask`; an
:class:`Engine` executes a round's tasks (in this process: :mod:`prelort.engines.inprocess`; on Flower
SuperNodes: :mod:`prelort.engines.flower`) and returns per task an :data:`EngineResult` - a
:class:`RawUpdate` (the wire format, decoded by :func:`decode_raw`), a decoded ``ClientUpdate``, an
``UpdateRejected`` from the engine's own decoding (with ``.client`` set), or any other exception such as
:class:`ClientFailed` (the client failed) -, or one :class:`SecureAggregate` for the whole round under
``privacy.secure_aggregation``. Everything an engine returns is untrusted (see the federation module).

This module depends only on the algorithm layer (methods, the update format, the SecAgg+ public constants):
engines import it, never the round loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from .methods import Broadcast, ClientUpdate, FederationSpec, TrainPlan
from .secure_sums import SECAGG_CLIPPING_RANGE, SECAGG_QUANTIZATION_RANGE
from .updates import UpdateRejected, decode_update


@dataclass
class ClientTask:
    """What one sampled client must do this round."""

    round: int
    client: int
    rank: int
    broadcast: Broadcast
    plan: TrainPlan
    seed: int


@dataclass
class RawUpdate:
    """A client's reply as it came over the wire: safetensors bytes and the metadata (JSON text, bytes or
    an already parsed object), with ``client`` the id of the client the engine sent the task to (the
    sender, which the metadata's declared client must match)."""

    client: int
    payload: bytes
    meta: bytes | str | dict[str, Any]


EngineResult = ClientUpdate | RawUpdate | Exception
"""What an engine returns for one task; see the module docstring."""


@dataclass
class SecureAggregate:
    """What a secure-aggregation engine returns for a whole round instead of per-task results
    (``privacy.secure_aggregation``; :class:`prelort.engines.flower_secagg.SecAggGridEngine`).

    ``arrays``: SecAgg+'s weighted mean of the clients' uploads, (N', D') in the order of
    :class:`prelort.secure_sums.SecAggLayout` (None when the protocol halted: too many clients dropped);
    ``clients``: (client, metadata sent in the clear) of every client aggregated; ``weight_units``: their
    integer SecAgg+ weights n_k (rho_k = n_k / 2**16); ``failed``: client -> why it is not in the sum
    (its ClientApp raised - e.g. it rejected its own update -, timed out, or no node holds it);
    ``clipping_range`` / ``quantization_range``: SecAgg+'s c and Q (for the quantisation bound).
    """

    arrays: list[Any] | None
    clients: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    weight_units: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)
    clipping_range: float = SECAGG_CLIPPING_RANGE
    quantization_range: int = SECAGG_QUANTIZATION_RANGE


def decode_raw(raw: RawUpdate, max_bytes: int | None = None, spec: FederationSpec | None = None) -> ClientUpdate:
    """Decode a wire-format reply; raises :class:`UpdateRejected` with ``.client`` = the sender.

    Any failure of the decoder on hostile bytes is a rejection, never a crash of the round. ``max_bytes``:
    a longer payload is refused unparsed; ``spec``: tensor names outside its layout are refused undecoded.
    """
    try:
        update = decode_update(raw.payload, raw.meta, max_bytes, spec=spec)
    except UpdateRejected as e:
        e.client = raw.client  # type: ignore[attr-defined]
        raise
    except Exception as e:  # defence in depth: a decoder bug on hostile input rejects the update
        rejection = UpdateRejected("not_safetensors", f"could not decode the update: {type(e).__name__}: {e}")
        rejection.client = raw.client  # type: ignore[attr-defined]
        raise rejection from None
    if update.client != raw.client:
        rejection = UpdateRejected(
            "client_mismatch", f"update sent by client {raw.client} declares client {update.client!r}"
        )
        rejection.client = raw.client  # type: ignore[attr-defined]
        raise rejection
    return update


@dataclass
class EvalTask:
    """On-site evaluation: a site evaluates the global adapter as a client of ``rank`` receives it
    (``broadcast``) on its own held-out records, after round ``round``."""

    round: int
    client: int
    rank: int
    broadcast: Broadcast


@dataclass
class EvalSums:
    """What a site returns from an :class:`EvalTask`: counts and sums only, never a per-example result.

    ``n``: examples evaluated; ``correct``: of them, exact matches; ``loglik_sum``: the summed log-likelihood
    of their reference answers (nats); ``tokens``: the answer tokens scored."""

    client: int
    n: int
    correct: int
    loglik_sum: float
    tokens: int

    def problem(self) -> str | None:
        """Why these sums cannot be counted (the server checks what a site sends), or None."""

        def whole(x: Any) -> bool:
            return isinstance(x, int) and not isinstance(x, bool) and x >= 0

        if not (whole(self.n) and whole(self.correct) and whole(self.tokens)):
            return f"counts n={self.n!r} correct={self.correct!r} tokens={self.tokens!r} are not whole numbers"
        if self.n == 0 or self.correct > self.n:
            return f"correct={self.correct} of n={self.n} examples"
        loglik = self.loglik_sum
        if isinstance(loglik, bool) or not isinstance(loglik, (int, float)) or not (-1e300 < loglik <= 0):
            return f"loglik_sum={loglik!r} is not a finite log-likelihood (<= 0)"
        return None


class ClientFailed(RuntimeError):
    """A client raised during local training (or never replied); the round goes on without it."""

    def __init__(self, client: int, message: str):
        super().__init__(message)
        self.client = client


class Engine(Protocol):
    """What the round loop needs of an engine: :meth:`prelort.federation.Federation.run_round` calls
    ``execute(tasks)`` once per attempt of a round."""

    def execute(self, tasks: Sequence[ClientTask]) -> Sequence[EngineResult] | SecureAggregate: ...


class SiteEvaluator(Protocol):
    """An engine that can also run on-site evaluation (optional: the runner asks ``hasattr(engine, "evaluate")``).

    ``evaluate(tasks)`` returns per task the site's :class:`EvalSums`, None when the site keeps no held-out
    records, or an exception (the site failed; the round's records go on without it)."""

    def evaluate(self, tasks: Sequence[EvalTask]) -> Sequence[EvalSums | Exception | None]: ...


class QuantizationReporter(Protocol):
    """An engine that knows how each client holds its base model (optional: the runner asks
    ``hasattr(engine, "quantization_of")``; otherwise the config says, :meth:`prelort.config.Config.client_quantization`).

    ``quantization_of(client)``: none, int8 or nf4, or None when it is not known (the client's node was refused)."""

    def quantization_of(self, client: int) -> str | None: ...
