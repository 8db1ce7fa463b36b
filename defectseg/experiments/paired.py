"""Paired differences between configurations of a grid: same seed, same split, same start.

Runs of two configurations with the same seed share the data split (``data.init_args.seed`` is
the same for every run) and the seed of initialisation, batch order and augmentation, so the
fair comparison of a configuration with its baseline is seed by seed: the per-seed differences
``d_s = metric(configuration, s) - metric(baseline, s)``, their mean, and a 95 % interval from
Student's t distribution on the ``n`` differences (``n - 1`` degrees of freedom)::

    mean ± t(0.975, n - 1) * sd(d) / sqrt(n)

A difference is **clear** only when that interval excludes 0. A seed that finished for one side
only has no pair: it is left out and counted. The t quantiles come from a table (1 to 30 degrees
of freedom; the normal 1.96 above), so the harness needs no scipy.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from defectseg.experiments.metric_info import METRICS, MetricInfo, _number

#: t(0.975, dof) for dof = 1..30 (two-sided 95 %); above 30 the normal quantile is used.
T_975 = (
    12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
    2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
    2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423,
)
NORMAL_975 = 1.9600
#: With this many pairs or fewer, the summary says in words how wide the interval is.
SMALL_N = 5


def t_quantile_975(dof: int) -> float:
    """The 97.5 % quantile of Student's t with ``dof`` degrees of freedom (table, normal above 30)."""
    if dof < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {dof}")
    return T_975[dof - 1] if dof <= len(T_975) else NORMAL_975


@dataclass(frozen=True)
class PairedDifference:
    """One configuration against its baseline on one metric.

    Attributes:
        config: the configuration.
        baseline: its baseline.
        metric: the metric key (``test/miou_defect``...).
        diffs: ``(seed, configuration - baseline)`` of every seed with both values, by seed.
        missing: seeds with a value on one side only (left out).
    """

    config: str
    baseline: str
    metric: str
    diffs: tuple[tuple[int, float], ...]
    missing: tuple[int, ...] = ()

    @property
    def n(self) -> int:
        return len(self.diffs)

    @property
    def values(self) -> list[float]:
        return [d for _, d in self.diffs]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values) if self.diffs else math.nan

    @property
    def sd(self) -> float:
        """Sample standard deviation of the differences (NaN below two pairs)."""
        return statistics.stdev(self.values) if self.n > 1 else math.nan

    @property
    def half_width(self) -> float:
        """Half-width of the 95 % t interval (NaN below two pairs)."""
        return t_quantile_975(self.n - 1) * self.sd / math.sqrt(self.n) if self.n > 1 else math.nan

    @property
    def interval(self) -> tuple[float, float]:
        return self.mean - self.half_width, self.mean + self.half_width

    @property
    def clear(self) -> bool:
        """Whether the 95 % interval excludes 0 (never with fewer than two pairs)."""
        low, high = self.interval
        return self.n > 1 and (low > 0 or high < 0)


def metric_values(rows: Sequence[dict[str, Any]], config: str, key: str) -> dict[int, float]:
    """``{seed: value}`` of one metric over the finished runs of one configuration."""
    values = {}
    for row in rows:
        if row.get("config") == config and row.get("status") == "finished":
            number = _number(row.get(key))
            if number is not None:
                values[int(row["seed"])] = number
    return values


def paired_difference(rows: Sequence[dict[str, Any]], config: str, baseline: str, key: str) -> PairedDifference:
    """The per-seed differences ``config - baseline`` of metric ``key`` (see the module docstring)."""
    a, b = metric_values(rows, config, key), metric_values(rows, baseline, key)
    paired = sorted(set(a) & set(b))
    return PairedDifference(
        config, baseline, key,
        diffs=tuple((seed, a[seed] - b[seed]) for seed in paired),
        missing=tuple(sorted(set(a) ^ set(b))),
    )


def paired_metrics(rows: Sequence[dict[str, Any]]) -> list[MetricInfo]:
    """The headline test metrics present in ``rows`` (those the paired table reports)."""
    return [m for m in METRICS if m.key.startswith("test/") and any(m.key in row for row in rows)]


def paired_differences(
    rows: Sequence[dict[str, Any]], comparisons: Sequence[Sequence[str]], metrics: Sequence[MetricInfo] | None = None
) -> dict[tuple[str, str], dict[str, PairedDifference]]:
    """``{(configuration, baseline): {metric key: PairedDifference}}`` for every comparison."""
    metrics = paired_metrics(rows) if metrics is None else metrics
    return {
        (config, baseline): {m.key: paired_difference(rows, config, baseline, m.key) for m in metrics}
        for config, baseline in comparisons
    }


def _signed(value: float) -> str:
    return f"{value:+.3f}"


def _cell(diff: PairedDifference, higher_is_better: bool | None) -> str:
    if diff.n == 0:
        return "n/a"
    if diff.n == 1:
        return f"{_signed(diff.mean)} (one pair, no interval)"
    low, high = diff.interval
    text = f"{_signed(diff.mean)} [{_signed(low)}, {_signed(high)}]"
    if diff.clear:
        better = None if higher_is_better is None else (diff.mean > 0) == higher_is_better
        text += " **clear" + ("" if better is None else (", better" if better else ", worse")) + "**"
    return text


def paired_markdown(rows: Sequence[dict[str, Any]], comparisons: Sequence[Sequence[str]]) -> list[str]:
    """The ``summary.md`` section of paired differences (empty without comparisons)."""
    if not comparisons:
        return []
    metrics = paired_metrics(rows)
    if not metrics:
        return []
    table = paired_differences(rows, comparisons, metrics)
    baselines = list(dict.fromkeys(b for _, b in comparisons))
    lines = [
        "",
        "## Paired differences against the baseline",
        "",
        f"Baseline: {', '.join(f'`{b}`' for b in baselines)}. Runs of two configurations with the same seed "
        "share the data split and the seed of initialisation, batch order and augmentation, so each "
        "configuration is compared with its baseline seed by seed. A cell is the mean over the seeds of "
        "(configuration - baseline) with a 95 % interval from the t distribution on the per-seed "
        "differences (n - 1 degrees of freedom). **clear** marks an interval that excludes 0, with its "
        "direction (for the FP rate lower is better); any other difference is not distinguishable from 0 "
        "with these seeds, which is not evidence that there is none.",
    ]
    counts = sorted({d.n for per in table.values() for d in per.values() if d.n})
    if not counts:
        lines += ["", "No seed finished on both sides of any comparison: nothing to pair yet."]
        return lines
    small = [n for n in counts if n <= SMALL_N]
    if counts == [1]:
        lines += ["", "**One pair per comparison: there is no interval.** Run more seeds (`--seeds`) to tell "
                  "a difference from seed-to-seed noise."]
    elif small:
        n = max(small)
        t = t_quantile_975(n - 1)
        lines += [
            "",
            f"**With {n} pairs the interval is wide**: its half-width is {t / math.sqrt(n):.2f} times the "
            f"standard deviation of the per-seed differences (t = {t:.2f} for {n - 1} degrees of freedom), so "
            "only a large and consistent difference comes out clear; more seeds narrow it.",
        ]
    header = "| configuration | baseline | pairs | " + " | ".join(m.title for m in metrics) + " |"
    lines += ["", header, "|---|---|---:|" + "---:|" * len(metrics)]
    left_out = []
    for (config, baseline), per in table.items():
        n = max(d.n for d in per.values())
        missing = sorted({s for d in per.values() for s in d.missing})
        pairs = f"{n}" + (f" ({len(missing)} left out)" if missing else "")
        cells = [_cell(per[m.key], m.higher_is_better) for m in metrics]
        lines.append(f"| {config} | {baseline} | {pairs} | " + " | ".join(cells) + " |")
        for seed in missing:
            finished = {c for c in (config, baseline) if any(
                r.get("config") == c and r.get("status") == "finished" and int(r["seed"]) == seed for r in rows)}
            without = [c for c in (config, baseline) if c not in finished]
            why = f"no result for {' and '.join(without)}" if without else "a metric missing on one side"
            left_out.append(f"{config} vs {baseline}, seed {seed} ({why})")
    if left_out:
        lines += ["", "Left out, no pair: " + "; ".join(left_out) + "."]
    return lines
