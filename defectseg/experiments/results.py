"""Aggregate a grid's results: ``runs.csv`` (one row per run) and ``summary.md`` (mean ± std).

Metric names are the ones the runs log under ``test/`` (see :data:`METRICS` for the headline
ones and their definitions); ``val/miou_defect_best`` and ``epochs`` come from the fit logs.
"""

from __future__ import annotations

import csv
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from defectseg.experiments.metric_info import METRICS, MetricInfo, _number  # noqa: F401  (public here too)
from defectseg.experiments.paired import paired_markdown

if TYPE_CHECKING:  # pragma: no cover
    from defectseg.experiments.runner import PlannedRun


class _HparamsLoader(yaml.SafeLoader):
    """Safe YAML loader that reads Lightning's ``hparams.yaml`` (``!!python/tuple`` as lists,
    other ``!!python/`` objects as ``None``)."""


_HparamsLoader.add_constructor("tag:yaml.org,2002:python/tuple", lambda loader, node: loader.construct_sequence(node))
_HparamsLoader.add_multi_constructor("tag:yaml.org,2002:python/", lambda loader, suffix, node: None)


def read_class_names(run_dir: Path) -> list[str]:
    """Class names (background first) from the run's logged hyperparameters, if any."""
    for path in (run_dir / "logs" / "test" / "hparams.yaml", run_dir / "logs" / "fit" / "hparams.yaml"):
        if path.is_file():
            try:
                data = yaml.load(path.read_text(), Loader=_HparamsLoader) or {}
            except yaml.YAMLError:
                continue
            names = data.get("class_names") if isinstance(data, dict) else None
            if names:
                return [str(n) for n in names]
    return []


def load_rows(plan: Sequence[PlannedRun]) -> list[dict[str, Any]]:
    """One row per planned run: ``config``, ``seed``, ``status``, metrics, times, folder."""
    rows = []
    for run in plan:
        row: dict[str, Any] = {"config": run.spec.config, "seed": run.spec.seed, "run_dir": str(run.run_dir)}
        path = run.run_dir / "results.json"
        if path.is_file():
            results = json.loads(path.read_text())
            row["status"] = "finished"
            row.update(results.get("metrics", {}))
            for key in ("wall_time_s", "cpu_time_s", "fit_time_s", "test_time_s"):
                row[key] = results.get(key)
            row["_class_names"] = read_class_names(run.run_dir)
        else:
            state = run.run_dir / "run.json"
            row["status"] = "unfinished" if state.is_file() else "not started"
        rows.append(row)
    return rows


def class_order(rows: Sequence[dict[str, Any]], prefix: str) -> list[str]:
    """Class names with a ``<prefix><name>`` metric, in the datamodule's order when known."""
    present = {key[len(prefix):] for row in rows for key in row if key.startswith(prefix)}
    ordered: list[str] = []
    for row in rows:
        for name in row.get("_class_names") or []:
            if name in present and name not in ordered:
                ordered.append(name)
    return ordered + sorted(present - set(ordered))


def metric_columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Metric columns of ``runs.csv``: headline metrics, per-class IoUs, then the rest."""
    keys = {k for row in rows for k in row if "/" in k or k == "epochs"}
    ordered = [m.key for m in METRICS if m.key in keys]
    for prefix in ("test/iou/", "test/iou_imagewise/"):
        ordered += [prefix + name for name in class_order(rows, prefix)]
    return ordered + sorted(keys - set(ordered))


def write_runs_csv(rows: Sequence[dict[str, Any]], path: Path) -> list[str]:
    """Write ``runs.csv``; returns its columns."""
    columns = [
        "config", "seed", "status", *metric_columns(rows),
        "wall_time_s", "cpu_time_s", "fit_time_s", "test_time_s", "run_dir",
    ]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    return columns


def aggregate(rows: Sequence[dict[str, Any]], key: str) -> dict[str, tuple[float, float, int]]:
    """``{config: (mean, std, n)}`` of one metric over the finished seeds (sample std, 0 for n=1)."""
    values: dict[str, list[float]] = {}
    for row in rows:
        if row.get("status") != "finished":
            continue
        number = _number(row.get(key))
        values.setdefault(row["config"], [])
        if number is not None:
            values[row["config"]].append(number)
    out = {}
    for config, numbers in values.items():
        if numbers:
            std = statistics.stdev(numbers) if len(numbers) > 1 else 0.0
            out[config] = (statistics.fmean(numbers), std, len(numbers))
    return out


def _cell(stats: tuple[float, float, int] | None, digits: int = 3, bold: bool = False) -> str:
    if stats is None:
        return "n/a"
    mean, std, n = stats
    text = f"{mean:.{digits}f} ± {std:.{digits}f}" if n > 1 else f"{mean:.{digits}f}"
    return f"**{text}**" if bold else text


def _best(stats: dict[str, tuple[float, float, int]], higher: bool | None) -> set[str]:
    """Configurations with the best mean (none when all means are equal or no direction)."""
    means = {c: round(v[0], 6) for c, v in stats.items()}
    if higher is None or len(set(means.values())) < 2:
        return set()
    target = max(means.values()) if higher else min(means.values())
    return {c for c, mean in means.items() if mean == target}


def _table(rows: Sequence[dict[str, Any]], configs: Sequence[str], columns: Sequence[tuple[str, str, bool | None]]) -> list[str]:
    counts = {c: sum(1 for r in rows if r["config"] == c and r.get("status") == "finished") for c in configs}
    lines = [
        "| configuration | runs | " + " | ".join(title for _, title, _ in columns) + " |",
        "|---|---:|" + "---:|" * len(columns),
    ]
    stats = {key: aggregate(rows, key) for key, _, _ in columns}
    best = {key: _best(stats[key], higher) for key, _, higher in columns}
    for config in configs:
        cells = [
            _cell(stats[key].get(config), digits=0 if key.endswith("_s") else 3, bold=config in best[key])
            for key, _, _ in columns
        ]
        lines.append(f"| {config} | {counts[config]} | " + " | ".join(cells) + " |")
    return lines


#: What each mode's numbers are, in one line of the summary.
MODE_NOTES = {
    "quick": "quick: a check of the pipeline (reduced resolution and schedule), not a measurement of the methods",
    "cpu": "cpu: the base config is a CPU training recipe (e.g. `configs/magnetic_tile_cpu.yaml`), about 10 "
    "minutes of training per run on 2 cores",
    "full": "full: the paper settings (meant for a GPU)",
}


def summary_markdown(
    rows: Sequence[dict[str, Any]],
    plan_data: dict[str, Any],
    plots: Sequence[str] = (),
    comparisons: Sequence[Sequence[str]] | None = None,
) -> str:
    """The ``summary.md`` text: context, headline table, paired differences against the
    baseline, per-class tables, definitions.

    Args:
        comparisons: ``(configuration, baseline)`` pairs of the paired table (default: the
            ``comparisons`` recorded in ``plan_data``).
    """

    if comparisons is None:
        comparisons = plan_data.get("comparisons") or []
    configs = list(dict.fromkeys(row["config"] for row in rows))
    finished = sum(1 for row in rows if row.get("status") == "finished")
    invocations = plan_data.get("invocations") or []
    lines = [f"# {plan_data.get('grid', 'grid')} ({plan_data.get('mode', '?')} mode)", ""]
    if plan_data.get("description"):
        lines += [plan_data["description"], ""]
    lines += [
        f"- Runs: {finished} finished of {len(rows)} ({len(configs)} configurations x seeds "
        f"{', '.join(str(s) for s in plan_data.get('seeds', []))}); values are mean ± sample std over the "
        "finished seeds; **bold**: best mean of the column.",
        f"- Grid: `{plan_data.get('grid_file', '?')}`; base: {', '.join(f'`{b}`' for b in plan_data.get('base', []))}"
        + (f"; overrides: `{' '.join(plan_data['overrides'])}`" if plan_data.get("overrides") else ""),
        "- Tested checkpoint: "
        + ("the best by the checkpoint monitor (`val/miou_defect` by default)."
           if plan_data.get("test_checkpoint", "best") == "best" else "the last one (end of training)."),
    ]
    if plan_data.get("mode") in MODE_NOTES:
        lines.append(f"- Mode {MODE_NOTES[plan_data['mode']]}.")
    epochs = {_number(r.get("epochs")) for r in rows if r.get("status") == "finished"} - {None}
    if len(epochs) > 1:
        lines.append(
            f"- Epochs trained differ between runs ({min(epochs):.0f} to {max(epochs):.0f}, `epochs` in `runs.csv`): "
            "a `trainer.max_time` limit or an early stop cut some runs short; compare them with care."
        )
    if invocations:
        total = sum(float(i.get("wall_time_s") or 0) for i in invocations)
        first, last = invocations[0], invocations[-1]
        hw = last.get("hardware") or {}
        device = hw.get("cuda") or f"CPU {hw.get('cpu', '?')} ({hw.get('cpu_affinity', hw.get('cpu_count', '?'))} cores)"
        command = last.get("command")
        lines += [
            f"- Command: `defectseg compare {' '.join(command)}`" if command else "- Command: (API call)",
            f"- Date: {first.get('started', '?')} to {last.get('finished', last.get('started', '?'))}; "
            f"wall time {total / 60:.1f} min over {len(invocations)} invocation(s).",
            f"- Hardware: {device}; torch {hw.get('torch', '?')}, lightning {hw.get('lightning', '?')}, "
            f"python {hw.get('python', '?')}.",
        ]
    headline = [(m.key, m.title, m.higher_is_better) for m in METRICS if any(m.key in r for r in rows)]
    headline.append(("wall_time_s", "wall time (s)", None))
    lines += ["", "## Main metrics", ""] + _table(rows, configs, headline)
    lines += paired_markdown(rows, comparisons)
    for prefix, title in (
        ("test/iou/", "Dataset-level IoU per class (`test/iou/<class>`)"),
        ("test/iou_imagewise/", "Image-wise IoU per class (`test/iou_imagewise/<class>`)"),
    ):
        names = class_order(rows, prefix)
        if names:
            columns = [(prefix + n, n, True) for n in names]
            lines += ["", f"## {title}", ""] + _table(rows, configs, columns)
    lines += ["", "## Metrics", ""]
    for metric in METRICS:
        if any(metric.key in r for r in rows):
            lines.append(f"- **{metric.title}** (`{metric.key}`): {metric.definition}.")
    lines.append(
        "- **wall time**: one run's worker process (interpreter start-up, fit and test; every attempt of a "
        "resumed run); `runs.csv` also has `cpu_time_s` (user + system CPU seconds of that process and its "
        "data-loader workers) and `fit_time_s`, `test_time_s` (inside the process)."
    )
    unfinished = [f"{r['config']}/seed_{r['seed']} ({r['status']})" for r in rows if r.get("status") != "finished"]
    if unfinished:
        lines += ["", f"Not finished: {', '.join(unfinished)}."]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    lines += ["", "Per-run values: `runs.csv`; each run's config and logs: `runs/<configuration>/seed_<n>/`.", ""]
    return "\n".join(lines)
