"""PNG plots of a grid's results (matplotlib's Agg canvas: no display, no global backend change).

* :func:`plot_iou_per_class` -- dataset-level IoU of each defect class, one bar per method
  (configuration), mean over seeds with the sample std as error bar.
* :func:`plot_miou_per_method` -- the three IoU summaries (dataset-level mIoU over defect
  classes, image-wise IoU, global defect IoU) per method with error bars, and each seed's value
  as a dot.
* :func:`plot_paired_differences` -- per configuration, its per-seed differences to its
  baseline (one dot per seed) with their mean and 95 % t interval, one panel per metric.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from defectseg.experiments.results import (
    METRICS,
    _number,
    aggregate,
    class_order,
    load_rows,
    summary_markdown,
    write_runs_csv,
)

if TYPE_CHECKING:  # pragma: no cover
    from defectseg.experiments.runner import CompareSettings, PlannedRun


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(figure)
    return figure


def _colours(count: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if count <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(count)]


def _configs(rows: Sequence[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(row["config"] for row in rows))


def plot_iou_per_class(rows: Sequence[dict[str, Any]], path: Path, title: str = "") -> Path | None:
    """Grouped bars: x = defect classes, one bar per configuration (mean ± std over seeds).

    Returns:
        ``path``, or ``None`` when the rows hold no per-class IoU.
    """
    names = [n for n in class_order(rows, "test/iou/") if n != "background"]
    if not names:
        return None
    configs = _configs(rows)
    figure = _figure(max(6.0, 1.2 + 0.45 * len(names) * max(2, len(configs)) / 2), 4.2)
    axes = figure.add_subplot(1, 1, 1)
    width = 0.8 / len(configs)
    x = np.arange(len(names))
    for index, (config, colour) in enumerate(zip(configs, _colours(len(configs)))):
        means, stds = [], []
        for name in names:
            stats = aggregate(rows, f"test/iou/{name}").get(config)
            means.append(stats[0] if stats else np.nan)
            stds.append(stats[1] if stats else 0.0)
        axes.bar(x - 0.4 + width * (index + 0.5), means, width, yerr=stds, capsize=2, label=config, color=colour)
    axes.set_xticks(x, names)
    axes.set_ylabel("IoU (dataset-level, test)")
    axes.set_ylim(0, 1.02)
    axes.set_title(f"{title}: IoU per defect class" if title else "IoU per defect class")
    axes.grid(axis="y", alpha=0.3)
    axes.legend(fontsize=7, ncol=min(4, len(configs)), loc="upper center", bbox_to_anchor=(0.5, -0.08))
    figure.savefig(path, bbox_inches="tight")
    return path


def plot_miou_per_method(rows: Sequence[dict[str, Any]], path: Path, title: str = "") -> Path | None:
    """Per configuration, bars of the IoU summaries (mean ± std) with each seed as a dot.

    Returns:
        ``path``, or ``None`` when the rows hold none of the IoU summaries.
    """
    keys = [m for m in METRICS if m.key in ("test/miou_defect", "test/iou_imagewise", "test/global_defect_iou")]
    keys = [m for m in keys if any(m.key in row for row in rows)]
    if not keys:
        return None
    configs = _configs(rows)
    figure = _figure(max(6.0, 1.5 + 0.6 * len(configs) * len(keys) / 2), 4.4)
    axes = figure.add_subplot(1, 1, 1)
    width = 0.8 / len(keys)
    x = np.arange(len(configs))
    for index, (metric, colour) in enumerate(zip(keys, _colours(len(keys)))):
        stats = aggregate(rows, metric.key)
        offset = -0.4 + width * (index + 0.5)
        means = [stats[c][0] if c in stats else np.nan for c in configs]
        stds = [stats[c][1] if c in stats else 0.0 for c in configs]
        axes.bar(x + offset, means, width, yerr=stds, capsize=3, label=f"{metric.title} ({metric.key})", color=colour, alpha=0.85)
        for position, config in enumerate(configs):
            values = [_number(r.get(metric.key)) for r in rows if r["config"] == config]
            values = [v for v in values if v is not None]
            axes.scatter([position + offset] * len(values), values, s=9, color="black", zorder=3)
    axes.set_xticks(x, configs, rotation=30 if len(configs) > 4 else 0, ha="right" if len(configs) > 4 else "center")
    axes.set_ylabel("IoU (test)")
    axes.set_ylim(0, 1.02)
    axes.set_title(f"{title}: mean IoU per method" if title else "Mean IoU per method")
    axes.grid(axis="y", alpha=0.3)
    axes.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18 if len(configs) > 4 else -0.08))
    figure.savefig(path, bbox_inches="tight")
    return path


def plot_paired_differences(
    rows: Sequence[dict[str, Any]], comparisons: Sequence[Sequence[str]], path: Path, title: str = ""
) -> Path | None:
    """One panel per headline test metric: x = configuration (against its baseline), a dot per
    seed's difference (labelled with the seed), the mean as a bar and the 95 % t interval as
    its error bar (green: clearly better, red: clearly worse, grey: not clear); 0 dashed.

    Returns:
        ``path``, or ``None`` when no comparison has a pair.
    """
    from defectseg.experiments.paired import paired_differences, paired_metrics

    metrics = paired_metrics(rows)
    table = paired_differences(rows, comparisons, metrics)
    metrics = [m for m in metrics if any(per[m.key].n for per in table.values())]
    if not metrics:
        return None
    labels = [f"{config}\n- {baseline}" for config, baseline in table]
    columns = min(3, len(metrics))
    rows_count = -(-len(metrics) // columns)
    width = max(3.2, 0.9 * len(labels) + 1.2)
    figure = _figure(width * columns, 3.6 * rows_count + 0.4)
    for index, metric in enumerate(metrics):
        axes = figure.add_subplot(rows_count, columns, index + 1)
        axes.axhline(0.0, color="black", linewidth=0.8, linestyle="--")
        for position, per in enumerate(table.values()):
            diff = per[metric.key]
            if not diff.n:
                continue
            offsets = np.linspace(-0.15, 0.15, diff.n) if diff.n > 1 else np.zeros(1)
            axes.scatter(position + offsets, diff.values, s=14, color="black", zorder=3)
            for offset, (seed, value) in zip(offsets, diff.diffs):
                axes.annotate(str(seed), (position + offset, value), xytext=(3, 2), textcoords="offset points", fontsize=6)
            colour = "0.55"
            if diff.clear and metric.higher_is_better is not None:
                colour = "tab:green" if (diff.mean > 0) == metric.higher_is_better else "tab:red"
            error = diff.half_width if diff.n > 1 else 0.0
            axes.errorbar([position + 0.3], [diff.mean], yerr=[error], fmt="s", color=colour, capsize=4, markersize=5)
        axes.set_xticks(np.arange(len(labels)), labels, fontsize=7)
        axes.set_xlim(-0.6, len(labels) - 0.4)
        direction = "" if metric.higher_is_better is None else (" (higher is better)" if metric.higher_is_better else " (lower is better)")
        axes.set_title(f"{metric.title}{direction}", fontsize=9)
        axes.set_ylabel("difference to baseline", fontsize=8)
        axes.grid(axis="y", alpha=0.3)
    heading = "Paired differences per seed (dots, seed numbers), mean and 95 % t interval (squares)"
    figure.suptitle(f"{title}: {heading}" if title else heading, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, bbox_inches="tight")
    return path


def report_comparisons(
    plan: Sequence[PlannedRun], settings: CompareSettings | None, plan_data: dict[str, Any]
) -> list[tuple[str, str]]:
    """The ``(configuration, baseline)`` pairs to report: from the settings (``--baseline``
    and the grid) when given, else those recorded in ``compare.json``."""
    if settings is not None:
        configs = list(dict.fromkeys(run.spec.config for run in plan))
        return settings.grid.comparisons(configs, settings.baseline)
    return [tuple(pair) for pair in plan_data.get("comparisons") or []]


def write_reports(
    out: Path, plan: Sequence[PlannedRun], settings: CompareSettings | None, plan_data: dict[str, Any]
) -> dict[str, Path]:
    """Write ``runs.csv``, the plots and ``summary.md`` into ``out``; their paths."""
    rows = load_rows(plan)
    paths = {"runs": out / "runs.csv"}
    write_runs_csv(rows, paths["runs"])
    plots = []
    finished = [r for r in rows if r.get("status") == "finished"]
    comparisons = report_comparisons(plan, settings, plan_data)
    if finished:
        title = f"{plan_data.get('grid', '')} ({plan_data.get('mode', '')})"
        paths["iou_per_class"] = plot_iou_per_class(finished, out / "iou_per_class.png", title)
        paths["miou_per_method"] = plot_miou_per_method(finished, out / "miou_per_method.png", title)
        paths["paired_differences"] = plot_paired_differences(
            finished, comparisons, out / "paired_differences.png", title
        )
        plots = [p for p in (paths["iou_per_class"], paths["miou_per_method"], paths["paired_differences"]) if p is not None]
    paths["summary"] = out / "summary.md"
    paths["summary"].write_text(summary_markdown(rows, plan_data, plots, comparisons))
    return {k: v for k, v in paths.items() if v is not None}
