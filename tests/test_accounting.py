"""(epsilon, delta) accounting of privacy.dp runs (prelort.accounting) against dp-accounting's own accountants,
the privacy budget (privacy.target_epsilon: calibration and refusal), and epsilon across retried rounds."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

dpa = pytest.importorskip("dp_accounting")
from dp_accounting.pld import pld_privacy_accountant  # noqa: E402
from dp_accounting.rdp import rdp_privacy_accountant  # noqa: E402

from prelort import config as config_mod  # noqa: E402
from prelort import runner  # noqa: E402
from prelort.accounting import (  # noqa: E402
    MAX_NOISE_MULTIPLIER,
    AccountingPlan,
    accounting_plan,
    calibrate_noise_multiplier,
    default_delta,
    epsilon_after,
    resolve_noise_multiplier,
)
from prelort.config import ConfigError  # noqa: E402
from prelort.federation import Federation, RoundFailed, check_privacy  # noqa: E402
from prelort.methods import ClientUpdate  # noqa: E402
from prelort.rank_geometry import adapter_rank  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples" / "tiny.yaml"
MODULES = {"layers.0.q_proj": (6, 5), "layers.0.v_proj": (4, 5)}


def cfg(*overrides: str) -> config_mod.Config:
    return config_mod.load(TINY, list(overrides))


def pld_reference(z: float, rounds: int, delta: float, sensitivity: float = 1.0) -> float:
    """dp-accounting's PLD accountant on T self-composed Gaussian mechanisms (add-or-remove-one)."""
    acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
    acc.compose(dpa.SelfComposedDpEvent(dpa.GaussianDpEvent(z / sensitivity), rounds))
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("z, rounds, delta", [(1.0, 3, 1e-5), (0.8, 10, 1e-6), (2.5, 50, 1e-5)])
def test_unsampled_epsilon_equals_the_library_pld_accountant(z, rounds, delta):
    plan = AccountingPlan("gaussian", "add_or_remove", 4, 4, delta, "q = 1")
    ours = epsilon_after(plan, z, rounds)
    # PLD discretises the privacy loss (interval 1e-4): it is a hair above the exact analytic figure
    assert ours == pytest.approx(pld_reference(z, rounds, delta), rel=2e-4, abs=2e-4)
    assert ours <= pld_reference(z, rounds, delta) + 1e-9


def test_known_value_and_monotonicity():
    plan = AccountingPlan("gaussian", "add_or_remove", 4, 4, 1e-5, "q = 1")
    # 3 Gaussian rounds at z = 1 are one Gaussian at z = 1/sqrt(3): epsilon 8.3854 at delta 1e-5
    assert epsilon_after(plan, 1.0, 3) == pytest.approx(8.38542, abs=1e-4)
    per_round = [epsilon_after(plan, 1.0, r) for r in range(1, 6)]
    assert per_round == sorted(per_round) and len(set(per_round)) == 5
    assert epsilon_after(plan, 1.0, 0) == 0.0
    assert math.isinf(epsilon_after(plan, 0.0, 3))
    replace = AccountingPlan("gaussian", "replace_one", 4, 4, 1e-5, "q = 1")
    assert epsilon_after(replace, 1.0, 3) == pytest.approx(pld_reference(1.0, 3, 1e-5, sensitivity=2.0), rel=2e-4)


@pytest.mark.parametrize("n, k, z, rounds, delta", [(20, 5, 2.0, 30, 1e-5), (100, 10, 1.2, 100, 1e-6)])
def test_sampled_epsilon_equals_the_library_rdp_accountant_for_sampling_without_replacement(n, k, z, rounds, delta):
    plan = AccountingPlan("rdp-sampled-without-replacement", "replace_one", n, k, delta, "test")
    acc = rdp_privacy_accountant.RdpAccountant(neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE)
    acc.compose(dpa.SelfComposedDpEvent(dpa.SampledWithoutReplacementDpEvent(n, k, dpa.GaussianDpEvent(z / 2)), rounds))
    assert epsilon_after(plan, z, rounds) == pytest.approx(acc.get_epsilon(delta), rel=1e-12)
    # amplification: sampling k of n is cheaper than every client in every round at the same relation
    unsampled = AccountingPlan("gaussian", "replace_one", n, k, delta, "test")
    assert epsilon_after(plan, z, rounds) < epsilon_after(unsampled, z, rounds)


def test_which_bound_a_config_gets():
    from prelort import methods

    def plan(*o):
        c = cfg("privacy.dp=true", "privacy.noise_multiplier=1", *o)
        return accounting_plan(c, methods.build(c.method, c.federation_spec({})))

    assert plan().bound == "gaussian" and plan().sampling_rate == 1.0
    sampled = ("clients.num=20", "clients.per_round=5", "privacy.neighbouring=replace_one")
    assert plan(*sampled, "method=zeropad").bound == "rdp-sampled-without-replacement"
    assert plan(*sampled, "method=fedit").bound == "rdp-sampled-without-replacement"
    assert plan(*sampled, "clients.ranks=[4]").bound == "rdp-sampled-without-replacement"
    # segment rule, heterogeneous ranks: the release shows which tiers were sampled -> no amplification
    hetero = plan(*sampled)
    assert hetero.bound == "gaussian" and "rank tiers were sampled" in hetero.why
    # add_or_remove: the library has no fixed-size sampling event -> no amplification
    assert plan("clients.num=20", "clients.per_round=5", "method=zeropad").bound == "gaussian"


def test_default_delta():
    assert default_delta(4) == 1e-5
    assert default_delta(10**6) == pytest.approx((10**6) ** -1.1)
    assert resolve_noise_multiplier(cfg("privacy.dp=true", "privacy.noise_multiplier=1"))[1].delta == 1e-5
    assert (
        resolve_noise_multiplier(cfg("privacy.dp=true", "privacy.noise_multiplier=1", "privacy.delta=0.001"))[1].delta
        == 0.001
    )


@pytest.mark.parametrize(
    "plan",
    [
        AccountingPlan("gaussian", "add_or_remove", 4, 4, 1e-5, "q = 1"),
        AccountingPlan("rdp-sampled-without-replacement", "replace_one", 50, 5, 1e-5, "test"),
    ],
)
def test_calibration_meets_the_budget_with_the_smallest_noise(plan):
    z = calibrate_noise_multiplier(plan, 4.0, 20)
    assert epsilon_after(plan, z, 20) <= 4.0
    assert epsilon_after(plan, z, 20) == pytest.approx(4.0, rel=1e-4)
    assert epsilon_after(plan, z * 0.99, 20) > 4.0


def test_target_epsilon_sets_the_noise_and_is_logged_with_the_run_settings():
    z, plan = resolve_noise_multiplier(cfg("privacy.dp=true", "privacy.target_epsilon=5", "rounds=10"))
    assert epsilon_after(plan, z, 10) == pytest.approx(5.0, rel=1e-5) and epsilon_after(plan, z, 10) <= 5.0
    assert 1 < z < MAX_NOISE_MULTIPLIER


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (
            ["privacy.dp=true", "privacy.target_epsilon=0.01", "rounds=1000"],
            r"privacy\.target_epsilon=0\.01: epsilon 0\.01 cannot be met with a noise multiplier up to 100 \(that gives "
            r"epsilon [\d.]+\) over rounds=1000 at delta=1e-05 .*; raise target_epsilon, lower rounds, raise "
            r"privacy\.delta, or sample fewer clients per round",
        ),
        (["privacy.target_epsilon=5"], r"privacy\.target_epsilon needs privacy\.dp: true"),
        (
            ["privacy.dp=true", "privacy.target_epsilon=5", "privacy.noise_multiplier=1"],
            r"both set the noise: the budget calibrates the noise multiplier, so set one of them",
        ),
    ],
)
def test_a_budget_that_cannot_be_met_is_refused_before_the_run_directory_exists(tmp_path, overrides, needle):
    c = cfg(*overrides)
    with pytest.raises(ConfigError, match=needle):
        check_privacy(c)
    with pytest.raises(ConfigError, match=needle):
        runner.run(c, tmp_path / "r", verbose=False)
    assert not (tmp_path / "r").exists()


def test_config_rejects_a_delta_outside_0_1():
    with pytest.raises(ConfigError, match=r"privacy\.delta"):
        cfg("privacy.delta=1.5")


# -- rounds count once ------------------------------------------------------------------------------------------
def _results(fed: Federation, round_: int, attempt: int = 0) -> list[ClientUpdate]:
    out = []
    for task in fed.begin_round(round_, attempt):
        gen = torch.Generator().manual_seed(100 * round_ + task.client)
        tensors = {
            k: (v + 0.01 * torch.randn(tuple(v.shape), generator=gen)).contiguous()
            for k, v in task.broadcast.adapter.items()
        }
        rank = adapter_rank(task.broadcast.adapter)
        out.append(ClientUpdate(task.client, rank, 10, tensors, task.round, fed.cfg.method, {}))
    return out


def test_a_retried_and_a_resumed_round_count_once(tmp_path):
    dp = (
        "privacy.dp=true",
        "privacy.target_epsilon=6",
        "privacy.clip_norm=0.05",
        "clients.min_per_round=2",
        "clients.max_round_retries=1",
    )
    straight = Federation(cfg(*dp), tmp_path / "a", MODULES)
    straight.start()
    for r in (1, 2, 3):
        straight.end_round(r, _results(straight, r))
    # interrupted after round 1; round 2's first attempt fails (one reply), is retried; then a resume
    broken = Federation(cfg(*dp), tmp_path / "b", MODULES)
    broken.start()
    broken.end_round(1, _results(broken, 1))
    with pytest.raises(RoundFailed):
        broken.end_round(2, _results(broken, 2)[:1])
    broken.end_round(2, _results(broken, 2, attempt=1))
    resumed = Federation(cfg(*dp), tmp_path / "b", MODULES)
    assert resumed.start(resume=True) == 3
    resumed.end_round(3, _results(resumed, 3))
    assert [resumed.privacy_record(r) for r in (1, 2, 3)] == [straight.privacy_record(r) for r in (1, 2, 3)]
    assert straight.privacy_record(3)["dp_epsilon"] == pytest.approx(6.0, rel=1e-5)
    for k, v in straight.state.tensors.items():
        assert torch.equal(v, resumed.state.tensors[k]), "same noise for the same (seed, round)"


def test_a_resume_that_would_change_the_noise_is_refused(tmp_path):
    fed = Federation(cfg("privacy.dp=true", "privacy.target_epsilon=6", "rounds=3"), tmp_path, MODULES)
    fed.start()
    fed.end_round(1, _results(fed, 1))
    longer = Federation(cfg("privacy.dp=true", "privacy.target_epsilon=6", "rounds=6"), tmp_path, MODULES)
    with pytest.raises(
        ValueError,
        match=r"cannot resume: rounds 1-1 ran with noise multiplier [\d.]+ but this "
        r"config gives [\d.]+",
    ):
        longer.start(resume=True)
