"""Client-level (epsilon, delta) accounting of ``privacy.dp`` runs, with Google's ``dp-accounting`` library.

One round of client-level DP is a Gaussian mechanism on the sum of the sampled clients' clipped updates
(noise std z C; see :mod:`prelort.privacy`). Its L2 sensitivity depends on the neighbouring relation
(``privacy.neighbouring``): adding or removing one client changes the sum by at most C (multiplier z);
replacing one client's data by another's changes it by at most 2C (multiplier z / 2).

prelort samples ``K = clients.per_round`` of ``N = clients.num`` clients per round, a fixed-size sample
WITHOUT replacement (:meth:`prelort.federation.Federation.sample_clients`), not the Poisson sample most
accountants assume. The bound reported (:func:`accounting_plan`, ``AccountingPlan.bound``):

``gaussian`` - no amplification by sampling: every client is counted as taking part in every round (a round
    it sits out costs it nothing, so this bounds any sampling). T rounds of the Gaussian mechanism with
    multiplier m compose to one Gaussian mechanism with multiplier m / sqrt(T); its epsilon is the library's
    exact analytic one (``dp_accounting.gaussian_mechanism.get_epsilon_gaussian``, Balle & Wang 2018), the
    figure the library's PLD accountant converges to (tests compare them). Used for ``add_or_remove``
    (dp-accounting has no fixed-size-sampling event for it: its PLD and RDP accountants amplify only
    Poisson sampling under add-or-remove), for q = 1, and where the release reveals who took part.

``rdp-sampled-without-replacement`` - ``replace_one`` with q < 1 and a release that does not reveal who was
    sampled (the padded sum rule, or every client at the same rank): the library's RDP
    accountant with ``SampledWithoutReplacementDpEvent(N, K, GaussianDpEvent(z / 2))`` (Wang, Balle and
    Kasiviswanathan 2019, Theorem 27: fixed-size sampling without replacement, N public).

Why the segment sum rule with heterogeneous ranks gets no amplification: dimension i of the new state is
N_i / D_i and keeps its previous value where no sampled client covered it, so the released state shows
which rank tiers were sampled; a client whose rank is rare is seen taking part, and amplification by
subsampling needs the sample to stay hidden.

Every figure is a pure function of (plan, z, rounds completed), so a retried round (its failed attempt
released nothing: the state is unchanged and no noise is drawn) and a resumed round (the same noise, drawn
from (seed, round)) count exactly once.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from .config import Config
    from .methods import Method

# Beyond this noise multiplier the noise on a round's mean (std z C / K per entry) swamps any update: a budget
# that needs more is refused rather than run.
MAX_NOISE_MULTIPLIER = 100.0

Bound = Literal["gaussian", "rdp-sampled-without-replacement"]
Relation = Literal["add_or_remove", "replace_one"]

__all__ = [
    "AccountingPlan",
    "MAX_NOISE_MULTIPLIER",
    "accounting_plan",
    "calibrate_noise_multiplier",
    "default_delta",
    "epsilon_after",
    "privacy_delta",
    "resolve_noise_multiplier",
]


def default_delta(num_clients: int) -> float:
    """``min(1e-5, N**-1.1)``: delta below 1/N (a mechanism that publishes one client's whole data with
    probability delta is then unlikely to hit anyone) and never above 1e-5 (for a small federation 1/N**1.1
    alone would be about 0.2 at N = 4, far too weak to sign)."""
    return min(1e-5, float(num_clients) ** -1.1)


def privacy_delta(cfg: Config) -> float:
    """``privacy.delta``, or :func:`default_delta` of ``clients.num`` when unset."""
    return float(cfg.privacy.delta) if cfg.privacy.delta is not None else default_delta(cfg.clients.num)


@dataclass(frozen=True)
class AccountingPlan:
    """Everything the accountant needs; :func:`epsilon_after` turns it and a round count into epsilon."""

    bound: Bound
    relation: Relation
    num_clients: int  # N
    per_round: int  # K
    delta: float
    why: str  # why this bound (for run.log and the docs)

    @property
    def sampling_rate(self) -> float:
        return self.per_round / self.num_clients

    @property
    def sensitivity(self) -> float:
        """L2 sensitivity of a round's sum in units of C under the relation."""
        return 1.0 if self.relation == "add_or_remove" else 2.0


def _hides_sample(cfg: Config, method: Method) -> tuple[bool, str]:
    from .privacy import check_dp

    rule = check_dp(method)
    if rule == "padded":
        return True, "padded rule: every entry of the new state is noised and divided by K, whoever was sampled"
    if method.trains_one_rank:
        return True, "segment rule with every client at the same rank: the release shows only K"
    return False, (
        "segment rule with heterogeneous ranks: which dimensions change shows which rank tiers were "
        "sampled, so no amplification by sampling is claimed"
    )


def accounting_plan(cfg: Config, method: Method) -> AccountingPlan:
    """The bound prelort reports for this config (module docstring)."""
    n, k, delta, rel = cfg.clients.num, cfg.clients.per_round, privacy_delta(cfg), cfg.privacy.neighbouring
    if k == n:
        return AccountingPlan("gaussian", rel, n, k, delta, "every client takes part in every round (q = 1)")
    if rel == "add_or_remove":
        return AccountingPlan(
            "gaussian",
            rel,
            n,
            k,
            delta,
            f"{k} of {n} clients sampled without replacement: dp-accounting has no fixed-size "
            "sampling event for add_or_remove, so no amplification by sampling is claimed",
        )
    hides, why = _hides_sample(cfg, method)
    if hides:
        return AccountingPlan(
            "rdp-sampled-without-replacement",
            rel,
            n,
            k,
            delta,
            f"fixed-size sampling of {k} of {n} clients without replacement; {why}",
        )
    return AccountingPlan("gaussian", rel, n, k, delta, why)


def _rdp_event(plan: AccountingPlan, z: float, rounds: int):
    import dp_accounting as dpa

    # replace-one: one client's clipped update traded for another moves the sum by up to 2C -> multiplier z / 2
    gaussian = dpa.GaussianDpEvent(z / plan.sensitivity)
    per_round = dpa.SampledWithoutReplacementDpEvent(plan.num_clients, plan.per_round, gaussian)
    return dpa.SelfComposedDpEvent(per_round, rounds)


def _rdp_accountant():
    import dp_accounting as dpa
    from dp_accounting.rdp import rdp_privacy_accountant

    return rdp_privacy_accountant.RdpAccountant(neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE)


def _quiet_absl() -> None:
    # the RDP accountant warns (absl) for every fractional order it skips; the skipped orders only make the bound
    # slightly less tight, nothing a user can act on
    logging.getLogger("absl").setLevel(logging.ERROR)


@functools.lru_cache(maxsize=4096)
def _epsilon(plan: AccountingPlan, z: float, rounds: int) -> float:
    if rounds <= 0:
        return 0.0
    if z <= 0:
        return math.inf
    if plan.bound == "gaussian":
        from dp_accounting import gaussian_mechanism

        multiplier = z / plan.sensitivity / math.sqrt(rounds)
        return float(gaussian_mechanism.get_epsilon_gaussian(multiplier, plan.delta))
    _quiet_absl()
    return float(_rdp_accountant().compose(_rdp_event(plan, z, rounds)).get_epsilon(plan.delta))


def epsilon_after(plan: AccountingPlan, noise_multiplier: float, rounds: int) -> float:
    """Epsilon at ``plan.delta`` after ``rounds`` complete rounds with noise multiplier z (inf for z = 0)."""
    return _epsilon(plan, float(noise_multiplier), int(rounds))


def calibrate_noise_multiplier(plan: AccountingPlan, target_epsilon: float, rounds: int) -> float:
    """The smallest z (within 1e-6) whose epsilon after ``rounds`` rounds is at most ``target_epsilon``
    (the library's ``mechanism_calibration.calibrate_dp_mechanism`` for the sampled bound; the analytic
    Gaussian's ``get_sigma_gaussian`` times sqrt(rounds) for the other). Raises ``ValueError`` when even
    :data:`MAX_NOISE_MULTIPLIER` does not meet it."""
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ValueError(f"target epsilon must be a positive number, got {target_epsilon}")
    worst = epsilon_after(plan, MAX_NOISE_MULTIPLIER, rounds)
    if worst > target_epsilon:
        raise ValueError(
            f"epsilon {target_epsilon:g} cannot be met with a noise multiplier up to "
            f"{MAX_NOISE_MULTIPLIER:g} (that gives epsilon {worst:.4g})"
        )
    if plan.bound == "gaussian":
        from dp_accounting import gaussian_mechanism

        z = (
            float(gaussian_mechanism.get_sigma_gaussian(target_epsilon, plan.delta))
            * math.sqrt(rounds)
            * plan.sensitivity
        )
    else:
        from dp_accounting import mechanism_calibration as mc

        _quiet_absl()
        z = float(
            mc.calibrate_dp_mechanism(
                _rdp_accountant,
                lambda x: _rdp_event(plan, x, rounds),
                target_epsilon,
                plan.delta,
                mc.ExplicitBracketInterval(1e-3, MAX_NOISE_MULTIPLIER),
                tol=1e-6,
            )
        )
    # the root finder stops within its tolerance on either side: step up until the budget holds
    for _ in range(60):
        if epsilon_after(plan, z, rounds) <= target_epsilon:
            return z
        z += max(1e-6, z * 1e-9)
    raise ValueError(f"calibration did not reach epsilon {target_epsilon:g} (z = {z:.6g})")


@functools.lru_cache(maxsize=64)
def _resolve(cfg_key: str) -> tuple[float, AccountingPlan]:
    import json

    from . import methods
    from .config import ConfigError, from_dict

    cfg = from_dict(json.loads(cfg_key))
    method = methods.build(cfg.method, cfg.federation_spec({}))
    plan = accounting_plan(cfg, method)
    target = cfg.privacy.target_epsilon
    if target is None:
        return float(cfg.privacy.noise_multiplier), plan
    try:
        z = calibrate_noise_multiplier(plan, float(target), cfg.rounds)
    except ValueError as e:
        raise ConfigError(
            f"privacy.target_epsilon={target:g}: {e} over rounds={cfg.rounds} at delta={plan.delta:.3g} "
            f"(sampling {cfg.clients.per_round} of {cfg.clients.num} clients, bound {plan.bound}); raise "
            "target_epsilon, lower rounds, raise privacy.delta, or sample fewer clients per round "
            "(clients.per_round / clients.num)"
        ) from None
    return z, plan


def resolve_noise_multiplier(cfg: Config) -> tuple[float, AccountingPlan]:
    """``(z, plan)`` of a ``privacy.dp`` config: ``privacy.noise_multiplier``, or with
    ``privacy.target_epsilon`` the z calibrated for ``rounds`` (a :class:`~prelort.config.ConfigError` when
    the budget cannot be met). Deterministic, so a resumed run gets the same z."""
    import json

    relevant = {k: cfg.to_dict()[k] for k in ("method", "rounds", "clients", "privacy")}
    return _resolve(json.dumps(relevant, sort_keys=True))
