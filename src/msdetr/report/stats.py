"""Statistics over a configuration's seeds: mean, sample standard deviation and n, the bootstrap
difference from the baseline, and the configurations' table (configs.csv)."""

from __future__ import annotations

import statistics
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from msdetr.report.grouping import Configuration

BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0


@dataclass(frozen=True)
class Summary:
    """A metric over a configuration's seeds."""

    mean: float | None
    std: float | None  # sample standard deviation (ddof=1); None with fewer than two seeds
    n: int


def summarize(values: Sequence[float]) -> Summary:
    values = [float(v) for v in values]
    return Summary(
        mean=statistics.fmean(values) if values else None,
        std=statistics.stdev(values) if len(values) >= 2 else None,
        n=len(values),
    )


@dataclass(frozen=True)
class Difference:
    """A configuration's mean minus the baseline's, with a bootstrap 95% interval (None when a
    side has fewer than two seeds)."""

    diff: float | None
    low: float | None
    high: float | None
    paired: bool
    n: tuple[int, int]  # seeds of the baseline, of the configuration

    @property
    def beyond_noise(self) -> bool:
        """The interval excludes 0."""
        return self.low is not None and self.high is not None and (self.low > 0 or self.high < 0)


def bootstrap_difference(
    baseline: Sequence[tuple[Hashable, float]],
    other: Sequence[tuple[Hashable, float]],
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> Difference:
    """mean(other) - mean(baseline) over (repetition, value) pairs, with a percentile bootstrap 95%
    interval (`resamples` draws from numpy's default_rng(seed)). Paired when both sides have the
    same repetitions, each once: the pairs are resampled and the interval is that of the mean
    paired difference; otherwise each side's values are resampled on their own."""
    n = (len(baseline), len(other))
    if not baseline or not other:
        return Difference(None, None, None, False, n)
    base = dict(baseline)
    mine = dict(other)
    paired = len(base) == n[0] and len(mine) == n[1] and set(base) == set(mine)
    a = np.array([v for _, v in baseline], dtype=float)
    b = np.array([v for _, v in other], dtype=float)
    diff = statistics.fmean(b.tolist()) - statistics.fmean(a.tolist())
    if min(n) < 2:
        return Difference(diff, None, None, paired, n)
    rng = np.random.default_rng(seed)
    if paired:
        d = np.array([mine[k] - base[k] for k in base], dtype=float)
        means = d[rng.integers(0, len(d), size=(resamples, len(d)))].mean(axis=1)
    else:
        resampled_a = a[rng.integers(0, n[0], size=(resamples, n[0]))].mean(axis=1)
        resampled_b = b[rng.integers(0, n[1], size=(resamples, n[1]))].mean(axis=1)
        means = resampled_b - resampled_a
    low, high = np.percentile(means, [2.5, 97.5])
    return Difference(diff, float(low), float(high), paired, n)


def compare(
    configs: list[Configuration], baseline: Configuration, metrics: Sequence[str]
) -> dict[tuple[int, str], Difference]:
    """(index of a configuration in `configs`, metric) -> its Difference from the baseline, for
    every configuration but the baseline."""
    return {
        (i, m): bootstrap_difference(baseline.values(m), config.values(m))
        for i, config in enumerate(configs)
        if config is not baseline
        for m in metrics
    }


# The Difference of the baseline from itself, and of a metric no job logged: every cell blank.
_NO_DIFFERENCE = Difference(None, None, None, False, (0, 0))


def configuration_table(
    configs: list[Configuration],
    metrics: Sequence[str],
    baseline: Configuration | None = None,
    differences: dict[tuple[int, str], Difference] | None = None,
) -> tuple[list[str], list[dict]]:
    """configs.csv's columns and one row per configuration: its label and overrides, n (usable
    jobs), the jobs used and left out, each metric's mean, std and n, mean images/s and peak memory,
    and with a baseline each metric's difference, interval, pairing and mark."""
    columns = ["configuration", "overrides", "n", "jobs", "excluded_jobs"]
    for m in metrics:
        columns += [f"{m}_mean", f"{m}_std", f"{m}_n"]
    columns += ["images_per_s", "peak_mem_gib"]
    if baseline is not None:
        columns.append("baseline")
        for m in metrics:
            columns += [
                f"{m}_diff",
                f"{m}_ci_low",
                f"{m}_ci_high",
                f"{m}_paired",
                f"{m}_beyond_noise",
            ]
    rows = []
    for i, config in enumerate(configs):
        used = config.usable
        row: dict[str, Any] = {
            "configuration": config.label,
            "overrides": " ".join(config.overrides),
            "n": len(used),
            "jobs": " ".join(j.name for j in used),
            "excluded_jobs": " ".join(j.name for j in config.excluded),
        }
        for m in metrics:
            s = summarize([v for _, v in config.values(m)])
            row.update({f"{m}_mean": s.mean, f"{m}_std": s.std, f"{m}_n": s.n})
        speeds = [j.images_per_s for j in used if j.images_per_s is not None]
        peaks = [j.peak_mem_gib for j in used if j.peak_mem_gib is not None]
        row["images_per_s"] = summarize(speeds).mean
        row["peak_mem_gib"] = summarize(peaks).mean
        if baseline is not None:
            row["baseline"] = config is baseline
            for m in metrics:
                d = (differences or {}).get((i, m), _NO_DIFFERENCE)
                with_ci = d.low is not None  # the pairing and the mark only with an interval
                row.update(
                    {
                        f"{m}_diff": d.diff,
                        f"{m}_ci_low": d.low,
                        f"{m}_ci_high": d.high,
                        f"{m}_paired": d.paired if with_ci else None,
                        f"{m}_beyond_noise": d.beyond_noise if with_ci else None,
                    }
                )
        rows.append(row)
    return columns, rows
