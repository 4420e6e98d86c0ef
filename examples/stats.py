"""Paired differences over seeds with a t-interval, for `examples.train`.

Every row of a seed is trained from the same initial weights, data order
and label noise as the baseline row of that seed, so the rows are compared
seed by seed: the differences `row - baseline`, their mean and a two-sided
Student t-interval (n - 1 degrees of freedom). A difference is significant
when the interval excludes 0; otherwise the report says "no significant
difference". With one seed there is no interval.
"""

import math
import statistics

CONFIDENCE = 0.95
# Which way is better for each metric.
HIGHER_IS_BETTER = {"accuracy": True, "nll": False, "ece": False}
NO_DIFFERENCE = "no significant difference"


def t_quantile(probability, dof):
    """The `probability` quantile of Student's t with `dof` degrees of
    freedom (SciPy, which scikit-learn of the `examples` extra brings)."""
    from scipy import stats

    return float(stats.t.ppf(probability, dof))


def paired_difference(values, baseline, metric, confidence=CONFIDENCE):
    """The paired difference `values - baseline` (per-seed lists, same
    seed order) of a metric: `{"mean", "low", "high", "n", "verdict"}`,
    the verdict "better", "worse" (the interval excludes 0; which way is
    better by `HIGHER_IS_BETTER`) or `NO_DIFFERENCE`; `low`, `high` and
    the verdict None for one seed."""
    if len(values) != len(baseline):
        raise ValueError(f"Paired values need as many seeds: {len(values)} and {len(baseline)}.")
    differences = [v - b for v, b in zip(values, baseline)]
    n = len(differences)
    mean = statistics.fmean(differences)
    if n < 2:
        return {"mean": mean, "low": None, "high": None, "n": n, "verdict": None}
    half = (t_quantile(0.5 + confidence / 2, n - 1) * statistics.stdev(differences)
            / math.sqrt(n))
    low, high = mean - half, mean + half
    if low <= 0.0 <= high:
        verdict = NO_DIFFERENCE
    else:
        verdict = "better" if (mean > 0) == HIGHER_IS_BETTER[metric] else "worse"
    return {"mean": mean, "low": low, "high": high, "n": n, "verdict": verdict}
