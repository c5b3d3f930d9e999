"""The service's own KS and chi-squared tests against scipy's (scipy is in the training environment only)."""

import numpy as np
import pytest
from scipy import stats

from cifarlab_contract.significance import chi2_independence, chi2_sf, kolmogorov_sf, ks_two_sample


def samples(n: int, m: int, shift: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A window [n, 3] shifted by `shift` and a reference [m, 3]; the third column is coarsely rounded (ties)."""
    rng = np.random.default_rng(seed)
    window, reference = rng.normal(shift, 1.0, (n, 3)), rng.normal(0.0, 1.0, (m, 3))
    window[:, 2], reference[:, 2] = np.round(window[:, 2], 1), np.round(reference[:, 2], 1)
    return window.astype(np.float32), reference.astype(np.float32)


@pytest.mark.parametrize("n", [20, 200, 2000])
@pytest.mark.parametrize("shift", [0.0, 0.1, 0.3, 1.0])
def test_ks_distance_is_scipys_and_the_p_value_is_close(n: int, shift: float) -> None:
    window, reference = samples(n, 2000, shift)
    distance, p_value = ks_two_sample(window, reference)
    expected = stats.ks_2samp(window, reference, axis=0, method="asymp")
    np.testing.assert_allclose(distance, expected.statistic, rtol=0, atol=1e-12)
    # scipy evaluates the exact one-sample distribution at n*m/(n+m); over a grid of distances the Kolmogorov
    # limit with Stephens' correction is at most 0.025 from it at a window of 20, 0.009 at 200, 0.003 at 2000
    np.testing.assert_allclose(p_value, expected.pvalue, rtol=0, atol=0.03)


def test_ks_p_value_is_within_five_percent_where_drift_is_decided() -> None:
    """At the default window (200) and reference sample (2000), p-values near the alarm threshold agree."""
    distances = np.linspace(0.05, 0.4, 200)
    effective = np.sqrt(200 * 2000 / 2200)
    expected = stats.kstwo.sf(distances, np.round(effective**2))
    mine = kolmogorov_sf((effective + 0.12 + 0.11 / effective) * distances)
    decisive = (expected > 1e-6) & (expected < 0.05)
    assert decisive.sum() > 50
    np.testing.assert_allclose(mine[decisive], expected[decisive], rtol=0.05)


def test_kolmogorov_survival_matches_the_limit_distribution_on_both_series() -> None:
    x = np.linspace(0.02, 4.0, 500)  # both sides of the switch between the two series
    np.testing.assert_allclose(kolmogorov_sf(x), stats.kstwobign.sf(x), rtol=1e-9, atol=1e-14)
    assert kolmogorov_sf(np.array(0.0)) == 1.0


@pytest.mark.parametrize("dof", [1, 2, 3, 9, 10])
def test_chi2_survival_is_scipys(dof: int) -> None:
    for statistic in [0.0, 0.3, 1.0, 5.0, 20.0, 80.0, 400.0]:
        assert chi2_sf(statistic, dof) == pytest.approx(stats.chi2.sf(statistic, dof), rel=1e-10, abs=1e-300)


def test_chi2_independence_is_scipys_contingency_test() -> None:
    table = np.random.default_rng(3).integers(1, 60, size=(2, 10))
    statistic, p_value = chi2_independence(table)
    expected_statistic, expected_p = stats.chi2_contingency(table, correction=False)[:2]
    assert statistic == pytest.approx(expected_statistic, rel=1e-12)
    assert p_value == pytest.approx(expected_p, rel=1e-9)
    assert chi2_independence(np.array([[10, 20], [10, 20]]))[1] == pytest.approx(1.0)
