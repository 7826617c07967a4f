"""bench/study_stats.py against hand-computed cases: bootstrap over seeds then examples, Holm, MDD, verdict."""

from __future__ import annotations

import numpy as np
import pytest
from bench_scripts import load_bench

st = load_bench("study_stats")


def frequencies(reps: np.ndarray) -> dict[float, float]:
    values, counts = np.unique(np.round(reps, 9), return_counts=True)
    return {float(v): c / reps.size for v, c in zip(values, counts)}


def test_constant_values_give_a_degenerate_bootstrap():
    reps = st.Resampler([5, 5], replicates=200, seed=1).means([[1] * 5, [1] * 5])
    assert np.all(reps == 1.0) and st.percentile_ci(reps) == (1.0, 1.0)


def test_seeds_are_resampled_then_examples_within_them():
    # seed 0 always 1, seed 1 always 0, 2 examples each: only the seed draw matters; the mean of two seeds drawn
    # with replacement is 1, 1/2 or 0 with probabilities 1/4, 1/2, 1/4
    f = frequencies(st.Resampler([2, 2], replicates=8000, seed=0).means([[1, 1], [0, 0]]))
    assert set(f) == {0.0, 0.5, 1.0}
    assert f[0.5] == pytest.approx(0.5, abs=0.03) and f[1.0] == pytest.approx(0.25, abs=0.03)


def test_examples_are_resampled_within_a_seed():
    # one seed, examples [0, 1]: the mean of two draws is 0, 1/2, 1 with probabilities 1/4, 1/2, 1/4
    f = frequencies(st.Resampler([2], replicates=8000, seed=0).means([[0, 1]]))
    assert f[0.5] == pytest.approx(0.5, abs=0.03) and f[0.0] == pytest.approx(0.25, abs=0.03)


def test_unequal_seed_sizes_pool_over_examples():
    # seed 0: one example worth 1; seed 1: three worth 0. Drawn seeds (0, 0): 1; (1, 1): 0; mixed: 1 / (1 + 3)
    f = frequencies(st.Resampler([1, 3], replicates=8000, seed=3).means([[1], [0, 0, 0]]))
    assert set(f) == {0.0, 0.25, 1.0}
    assert f[0.25] == pytest.approx(0.5, abs=0.03)
    assert st.pooled_mean([[1], [0, 0, 0]]) == 0.25


def test_one_resampler_pairs_every_comparison():
    r = st.Resampler([4, 4], replicates=500, seed=2)
    a, b = [[1, 0, 1, 1], [0, 1, 1, 0]], [[0, 0, 1, 1], [0, 1, 0, 0]]
    diff = r.means(st.paired_differences(a, b))
    assert np.allclose(diff, r.means(a) - r.means(b))  # same draws for both arms
    assert np.all(r.means(st.paired_differences(a, a)) == 0)
    with pytest.raises(ValueError, match="seed 1: 4 examples against 3: not paired"):
        st.paired_differences(a, [b[0], [0, 1, 0]])


def test_bootstrap_p_value():
    assert st.bootstrap_p(np.array([1.0, 2.0, 3.0])) == pytest.approx(2 * 1 / 4)  # 2 (0 + 1) / (3 + 1)
    assert st.bootstrap_p(np.array([-1.0, 1.0])) == 1.0
    assert st.bootstrap_p(np.zeros(9)) == 1.0


def test_percentile_ci():
    assert st.percentile_ci(np.arange(101.0)) == pytest.approx((2.5, 97.5))
    assert st.percentile_ci(np.arange(101.0), 0.9) == pytest.approx((5.0, 95.0))


def test_holm_by_hand():
    h = st.holm([0.01, 0.04, 0.03])
    # sorted: 0.01 x 3 = 0.03; 0.03 x 2 = 0.06; 0.04 x 1 = 0.04 -> max(0.06, 0.04) = 0.06
    assert h["adjusted"] == pytest.approx([0.03, 0.06, 0.06])
    assert h["reject"] == [True, False, False]
    assert h["level"] == pytest.approx([0.05 / 3, 0.05 / 1, 0.05 / 2])
    assert st.holm([0.5, 0.9])["adjusted"] == [1.0, 1.0]


def test_minimum_detectable_difference():
    assert st.mdd(0.01) == pytest.approx((1.959964 + 0.841621) * 0.01, abs=1e-6)
    assert st.mdd(0.01, alpha=0.05 / 20) == pytest.approx((3.023341 + 0.841621) * 0.01, abs=1e-6)


@pytest.mark.parametrize(
    "cis, verdict",
    [
        ({2: (-0.01, 0.05), 4: (-0.015, 0.04), 8: (0.01, 0.09), 16: (0.02, 0.1)}, "confirmed"),
        ({2: (-0.03, 0.05), 4: (0.0, 0.04), 8: (0.01, 0.09), 16: (0.02, 0.1)}, "inconclusive"),  # tier 2 lo <= -0.02
        ({2: (0.05, 0.2), 4: (0.05, 0.2), 8: (0.05, 0.2), 16: (-0.2, -0.01)}, "refuted"),  # below 0 at tier 16
        ({2: (-0.02, 0.02), 4: (-0.03, 0.03), 8: (-0.01, 0.01), 16: (0.0, 0.03)}, "refuted"),  # within +-0.03
        ({2: (-0.02, 0.02), 4: (-0.03, 0.03), 8: (-0.01, 0.01), 16: (0.0, 0.031)}, "inconclusive"),
        ({2: (-0.01, 0.05), 4: (-0.01, 0.05), 8: (0.0, 0.09), 16: (0.02, 0.1)}, "inconclusive"),  # tier 8 lo = 0
    ],
)
def test_decision_rule(cis, verdict):
    assert st.decide(cis)["verdict"] == verdict


def test_decision_rule_without_the_equivalence_branch():
    """Study 2's stage C drops study 1's +-0.03 equivalence branch: CIs within it are inconclusive, and the other
    branches are unchanged (refuted checked first)."""
    within = {2: (-0.02, 0.02), 4: (-0.03, 0.03), 8: (-0.01, 0.01), 16: (0.0, 0.03)}
    assert st.decide(within)["verdict"] == "refuted"
    assert st.decide(within, equivalence=None)["verdict"] == "inconclusive"
    below = {2: (0.05, 0.2), 4: (0.05, 0.2), 8: (0.05, 0.2), 16: (-0.2, -0.01)}
    assert st.decide(below, equivalence=None)["verdict"] == "refuted"
    above = {2: (-0.01, 0.05), 4: (-0.015, 0.04), 8: (0.01, 0.09), 16: (0.02, 0.1)}
    assert st.decide(above, equivalence=None)["verdict"] == "confirmed"
