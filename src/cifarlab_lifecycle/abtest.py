"""Statistics of an online A/B test between two model variants, from labelled feedback.

Each variant's feedback is a boolean array: True where its answer matched the true label. Two designs:

- independent: traffic was split, each request answered by one variant (different images per variant). The
  accuracies are compared by a two-proportion z-test, with a bootstrap interval of their difference.
- paired: the challenger ran in shadow, so both variants predicted the same images. Only the images they disagree
  on carry information: McNemar's exact test on those discordant pairs, with a paired bootstrap interval.

Both bootstraps resample the data exactly but cheaply: a resampled set of Bernoulli outcomes only matters through
its count of successes (binomial), a resampled set of pairs through its counts of the four outcome pairs
(multinomial), so 10,000 resamples of a million requests cost microseconds.

Differences are challenger minus champion: positive means the challenger is more accurate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import stats

ALPHA = 0.05
POWER = 0.8
LEVEL = 0.95
RESAMPLES = 10_000
MIN_SAMPLES = 100

Design = Literal["independent", "paired"]
Action = Literal["promote", "keep", "collect"]


@dataclass(frozen=True)
class Accuracy:
    count: int
    correct: int
    accuracy: float
    low: float  # Wilson score interval at `level`
    high: float


def accuracy(outcomes: np.ndarray, level: float = LEVEL) -> Accuracy:
    """Accuracy of a variant's outcomes with its Wilson score interval (sound near 0 and 1, unlike the Wald one)."""
    count, correct = len(outcomes), int(np.count_nonzero(outcomes))
    if count == 0:
        raise ValueError("no outcomes: accuracy is undefined")
    interval = stats.binomtest(correct, count).proportion_ci(confidence_level=level, method="wilson")
    return Accuracy(count, correct, correct / count, float(interval.low), float(interval.high))


def two_proportion_ztest(correct_a: int, count_a: int, correct_b: int, count_b: int) -> tuple[float, float]:
    """z statistic of b's proportion minus a's (pooled standard error under equality) and its two-sided p-value."""
    pooled = (correct_a + correct_b) / (count_a + count_b)
    se = math.sqrt(pooled * (1 - pooled) * (1 / count_a + 1 / count_b))
    if se == 0:  # both variants all right or all wrong: no evidence of a difference
        return 0.0, 1.0
    z = (correct_b / count_b - correct_a / count_a) / se
    return z, float(2 * stats.norm.sf(abs(z)))


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value: under equal accuracy each discordant pair favours either side with 1/2."""
    if only_a + only_b == 0:
        return 1.0
    return float(stats.binomtest(only_b, only_a + only_b, 0.5).pvalue)


@dataclass(frozen=True)
class Comparison:
    design: Design
    test: str
    champion: Accuracy
    challenger: Accuracy
    difference: float  # challenger accuracy minus champion accuracy
    interval: tuple[float, float]  # bootstrap percentile interval of the difference at `level`
    level: float
    p_value: float
    statistic: float  # z of the z-test; for McNemar, the discordant pairs the challenger won
    discordant: tuple[int, int] | None  # paired: (only the champion right, only the challenger right)
    share_better: float  # fraction of bootstrap resamples in which the challenger is better (ties count half)
    required: float  # feedback (independent: both variants, at the observed split; paired: images) for `power`
    power: float

    @property
    def samples(self) -> int:
        """Feedback used: images for a paired test, requests of both variants for an independent one."""
        return self.champion.count if self.design == "paired" else self.champion.count + self.challenger.count


def compare(
    champion: np.ndarray,
    challenger: np.ndarray,
    design: Design,
    alpha: float = ALPHA,
    power: float = POWER,
    level: float = LEVEL,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> Comparison:
    """Compare the variants' outcomes. "independent": they answered different requests (split traffic);
    "paired": both predicted each image, `champion[i]` and `challenger[i]` being their outcomes on image i."""
    a, b = accuracy(champion, level), accuracy(challenger, level)
    rng = np.random.default_rng(seed)
    if design == "paired":
        if champion.shape != challenger.shape:
            raise ValueError(f"paired outcomes differ in length: {champion.shape} vs {challenger.shape}")
        champion, challenger = champion.astype(bool), challenger.astype(bool)
        only_a, only_b = int(np.count_nonzero(champion & ~challenger)), int(np.count_nonzero(~champion & challenger))
        shares = np.array([only_a, only_b, a.count - only_a - only_b]) / a.count  # the rest: both right or wrong
        tables = rng.multinomial(a.count, shares, resamples)
        differences = (tables[:, 1] - tables[:, 0]) / a.count
        test, p_value, statistic = "McNemar exact test", mcnemar_exact(only_a, only_b), float(only_b)
        discordant: tuple[int, int] | None = (only_a, only_b)
        required = required_paired(shares[0], shares[1], alpha, power)
    else:
        differences = rng.binomial(b.count, b.accuracy, resamples) / b.count
        differences -= rng.binomial(a.count, a.accuracy, resamples) / a.count
        statistic, p_value = two_proportion_ztest(a.correct, a.count, b.correct, b.count)
        test, discordant = "two-proportion z-test", None
        required = required_independent(a.accuracy, b.accuracy, b.count / a.count, alpha, power)
    return Comparison(
        design=design,
        test=test,
        champion=a,
        challenger=b,
        difference=b.accuracy - a.accuracy,
        interval=_percentiles(differences, level),
        level=level,
        p_value=p_value,
        statistic=statistic,
        discordant=discordant,
        share_better=_share_positive(differences),
        required=required,
        power=power,
    )


def required_independent(p_a: float, p_b: float, ratio: float, alpha: float = ALPHA, power: float = POWER) -> float:
    """Total samples (a's plus b's, b = `ratio` x a) for a two-sided z-test at `alpha` to detect p_b - p_a with
    `power` (the normal-approximation formula of Fleiss et al.); infinite when the difference is zero."""
    if p_a == p_b:
        return math.inf
    pooled = (p_a + ratio * p_b) / (1 + ratio)
    z_alpha, z_power = stats.norm.isf(alpha / 2), stats.norm.isf(1 - power)
    spread = z_alpha * math.sqrt(pooled * (1 - pooled) * (1 + 1 / ratio)) + z_power * math.sqrt(
        p_a * (1 - p_a) + p_b * (1 - p_b) / ratio
    )
    return (spread / (p_b - p_a)) ** 2 * (1 + ratio)


def required_paired(only_a: float, only_b: float, alpha: float = ALPHA, power: float = POWER) -> float:
    """Pairs for McNemar's test at `alpha` to detect the discordance `only_b - only_a` (shares of all pairs) with
    `power` (Connor, 1987); infinite when the discordant shares are equal."""
    if only_a == only_b:
        return math.inf
    discordant, difference = only_a + only_b, only_b - only_a
    z_alpha, z_power = stats.norm.isf(alpha / 2), stats.norm.isf(1 - power)
    spread = z_alpha * math.sqrt(discordant) + z_power * math.sqrt(discordant - difference**2)
    return (spread / difference) ** 2


@dataclass(frozen=True)
class Recommendation:
    action: Action
    confidence: float  # share of bootstrap resamples that agree with the action's direction (or the observed one)
    reason: str
    more_samples: int | None  # for "collect": about how much more feedback 80% power needs; None if unbounded


def recommend(comparison: Comparison, alpha: float = ALPHA, min_samples: int = MIN_SAMPLES) -> Recommendation:
    """Promote on a significant gain, keep the champion on a significant loss, otherwise keep collecting."""
    c = comparison
    evidence = (
        f"accuracy {_points(c.difference)} points ({c.level:.0%} interval {_points(c.interval[0])} to "
        f"{_points(c.interval[1])}), {c.test} p = {c.p_value:.3g}"
    )
    direction = c.share_better if c.difference >= 0 else 1 - c.share_better
    fewest = min(c.champion.count, c.challenger.count)
    if fewest < min_samples:
        # at the current split (paired: every sample counts for both), the minimum takes this much more feedback
        more = max(math.ceil((min_samples - fewest) * c.samples / fewest), _more(c) or 0)
        reason = (
            f"only {fewest} feedback samples for a variant, fewer than the minimum {min_samples} (about {more:,} "
            f"more {_unit(c)}); {evidence}"
        )
        return Recommendation("collect", direction, reason, more)
    if c.p_value < alpha:
        action: Action = "promote" if c.difference > 0 else "keep"
        better = "better" if action == "promote" else "worse"
        reason = f"the challenger is significantly {better} at alpha {alpha}: {evidence}"
        return Recommendation(action, direction, reason, None)
    for_power = _more(c)
    needed = f"about {for_power:,} more" if for_power is not None else "no amount of"
    reason = (
        f"no significant difference at alpha {alpha}: {evidence}; {needed} {_unit(c)} would detect the observed "
        f"difference with {c.power:.0%} power"
    )
    return Recommendation("collect", direction, reason, for_power)


def _unit(c: Comparison) -> str:
    return "shadowed feedback samples" if c.design == "paired" else "feedback samples at the current traffic split"


def _more(c: Comparison) -> int | None:
    return None if math.isinf(c.required) else max(0, math.ceil(c.required) - c.samples)


def _percentiles(values: np.ndarray, level: float) -> tuple[float, float]:
    low, high = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def _share_positive(values: np.ndarray) -> float:
    return float(np.mean(values > 0) + 0.5 * np.mean(values == 0))


def _points(difference: float) -> str:
    return f"{100 * difference:+.2f}"
