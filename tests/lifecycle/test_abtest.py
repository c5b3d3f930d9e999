"""The A/B test statistics (cifarlab_lifecycle.abtest) against values computed by hand, by scipy's own tests and by
simulation."""

import math

import numpy as np
import pytest
from scipy import stats

from cifarlab_lifecycle import abtest


def outcomes(count: int, correct: int, seed: int = 0) -> np.ndarray:
    """`count` outcomes with exactly `correct` True, in random order."""
    values = np.zeros(count, dtype=bool)
    values[:correct] = True
    return np.random.default_rng(seed).permutation(values)


def test_wilson_interval_matches_its_formula() -> None:
    z = stats.norm.isf(0.025)
    for count, correct in ((10, 8), (200, 3), (50, 50)):
        p = correct / count
        center = (p + z**2 / (2 * count)) / (1 + z**2 / count)
        half = z / (1 + z**2 / count) * math.sqrt(p * (1 - p) / count + z**2 / (4 * count**2))
        result = abtest.accuracy(outcomes(count, correct))
        assert (result.count, result.correct, result.accuracy) == (count, correct, p)
        assert result.low == pytest.approx(center - half) and result.high == pytest.approx(min(1.0, center + half))
    with pytest.raises(ValueError, match="no outcomes"):
        abtest.accuracy(np.array([], dtype=bool))


def test_two_proportion_z_test_by_hand_and_as_a_chi_squared_test() -> None:
    # 45/100 vs 60/100: pooled 0.525, standard error sqrt(0.525 * 0.475 * 2/100)
    z, p = abtest.two_proportion_ztest(45, 100, 60, 100)
    assert z == pytest.approx(0.15 / math.sqrt(0.525 * 0.475 * 0.02))
    assert z == pytest.approx(2.12398, abs=1e-5) and p == pytest.approx(0.033672, abs=1e-6)
    for table in ((45, 100, 60, 100), (900, 1000, 85, 100), (30, 31, 3, 5)):
        z, p = abtest.two_proportion_ztest(*table)
        a, n_a, b, n_b = table
        chi2, chi2_p, _, _ = stats.chi2_contingency([[a, n_a - a], [b, n_b - b]], correction=False)
        assert z**2 == pytest.approx(chi2) and p == pytest.approx(chi2_p)
        assert math.copysign(1, z) == math.copysign(1, b / n_b - a / n_a)
    assert abtest.two_proportion_ztest(10, 10, 5, 5) == (0.0, 1.0)  # both perfect: no evidence either way


def test_mcnemar_exact_p_values() -> None:
    assert abtest.mcnemar_exact(1, 9) == pytest.approx(2 * (1 + 10) / 2**10)  # 2 P(X <= 1), X ~ Bin(10, 1/2)
    assert abtest.mcnemar_exact(9, 1) == abtest.mcnemar_exact(1, 9)
    assert abtest.mcnemar_exact(0, 5) == pytest.approx(2 / 2**5)
    assert abtest.mcnemar_exact(5, 5) == 1.0 and abtest.mcnemar_exact(0, 0) == 1.0


def test_paired_comparison_counts_discordant_pairs_only() -> None:
    champion = np.array([1, 1, 1, 0, 0, 1, 0, 1, 1, 1, 1, 0], dtype=bool)
    challenger = np.array([1, 1, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0], dtype=bool)
    comparison = abtest.compare(champion, challenger, "paired")
    assert comparison.design == "paired" and comparison.discordant == (1, 3)
    assert comparison.p_value == pytest.approx(abtest.mcnemar_exact(1, 3)) and comparison.samples == 12
    assert comparison.difference == pytest.approx(2 / 12)
    with pytest.raises(ValueError, match="differ in length"):
        abtest.compare(champion, challenger[:-1], "paired")


def test_count_based_bootstraps_match_resampling_the_outcomes() -> None:
    """The binomial and multinomial shortcuts give the same interval as resampling records one by one."""
    rng = np.random.default_rng(1)
    champion, challenger = outcomes(300, 240, seed=2), outcomes(120, 102, seed=3)
    draws = 4000
    naive = rng.choice(challenger, (draws, len(challenger))).mean(1) - rng.choice(champion, (draws, 300)).mean(1)
    independent = abtest.compare(champion, challenger, "independent", resamples=draws)
    assert independent.interval == pytest.approx(np.quantile(naive, [0.025, 0.975]), abs=0.012)

    paired_champion, paired_challenger = outcomes(400, 300, seed=4), outcomes(400, 330, seed=5)
    rows = rng.integers(0, 400, (draws, 400))
    naive = paired_challenger[rows].mean(1) - paired_champion[rows].mean(1)
    paired = abtest.compare(paired_champion, paired_challenger, "paired", resamples=draws)
    assert paired.interval == pytest.approx(np.quantile(naive, [0.025, 0.975]), abs=0.008)
    assert paired.share_better == pytest.approx(np.mean(naive > 0) + 0.5 * np.mean(naive == 0), abs=0.02)
    again = abtest.compare(paired_champion, paired_challenger, "paired", resamples=draws)
    assert again.interval == paired.interval  # seeded


def test_required_samples_give_the_stated_power() -> None:
    # Equal groups, 0.80 vs 0.85: the textbook ~906 per group.
    total = abtest.required_independent(0.80, 0.85, ratio=1.0)
    per_group = (1.959964 * math.sqrt(2 * 0.825 * 0.175) + 0.841621 * math.sqrt(0.16 + 0.1275)) ** 2 / 0.05**2
    assert total == pytest.approx(2 * per_group, rel=1e-5) and 905 < per_group < 906
    assert math.isinf(abtest.required_independent(0.8, 0.8, 1.0)) and math.isinf(abtest.required_paired(0.1, 0.1))

    rng = np.random.default_rng(7)
    # A 9:1 split: simulated experiments of the required size reject at alpha 0.05 about 80% of the time.
    total = abtest.required_independent(0.80, 0.85, ratio=1 / 9)
    n_b = round(total / 10)
    n_a = round(total) - n_b
    hits_a, hits_b = rng.binomial(n_a, 0.80, 4000), rng.binomial(n_b, 0.85, 4000)
    p = [abtest.two_proportion_ztest(a, n_a, b, n_b)[1] for a, b in zip(hits_a, hits_b, strict=True)]
    assert np.mean(np.array(p) < 0.05) == pytest.approx(0.80, abs=0.03)

    pairs = math.ceil(abtest.required_paired(0.05, 0.09))
    tables = rng.multinomial(pairs, [0.05, 0.09, 0.86], 1500)
    p = [abtest.mcnemar_exact(only_a, only_b) for only_a, only_b, _ in tables]
    assert np.mean(np.array(p) < 0.05) == pytest.approx(0.80, abs=0.04)


@pytest.mark.parametrize(
    ("challenger_correct", "action"),
    [(900, "promote"), (700, "keep"), (801, "collect")],
)
def test_recommendation_follows_significance(challenger_correct: int, action: str) -> None:
    comparison = abtest.compare(outcomes(1000, 800), outcomes(1000, challenger_correct, seed=1), "independent")
    recommendation = abtest.recommend(comparison)
    assert recommendation.action == action
    if action == "collect":
        assert comparison.p_value >= abtest.ALPHA and recommendation.more_samples > 1_000_000  # 0.1 points
        assert "would detect the observed difference with 80% power" in recommendation.reason
        assert recommendation.confidence == pytest.approx(comparison.share_better)
    else:
        assert comparison.p_value < 1e-6 and recommendation.more_samples is None
        assert recommendation.confidence > 0.999  # bootstrap resamples agreeing with the action
        assert ("better" if action == "promote" else "worse") in recommendation.reason


def test_too_few_samples_means_keep_collecting_even_when_significant() -> None:
    comparison = abtest.compare(outcomes(1000, 500), outcomes(40, 40), "independent")
    assert comparison.p_value < 1e-6
    recommendation = abtest.recommend(comparison, min_samples=100)
    assert recommendation.action == "collect" and recommendation.more_samples == 60 * 1040 // 40  # at a 25:1 split
    assert (
        "only 40 feedback samples for a variant, fewer than the minimum 100 (about 1,560 more" in recommendation.reason
    )
    equal = abtest.recommend(abtest.compare(outcomes(500, 400), outcomes(500, 400, seed=1), "independent"))
    assert equal.action == "collect" and equal.more_samples is None and "no amount of" in equal.reason
