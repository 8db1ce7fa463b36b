"""Experiment harness: run a grid of configurations over a base config and compare them.

``defectseg compare --base CONFIG --grid GRID.yaml --out DIR [--mode quick|cpu|full] [--seeds N]``
(see ``docs/results.md``). Each run is a ``defectseg fit`` then ``defectseg test`` subprocess with
its merged config saved in its folder; an interrupted grid resumes where it stopped. The
output folder gets ``runs.csv``, ``summary.md`` (with the paired differences against the grid's
baseline, :mod:`defectseg.experiments.paired`) and PNG plots.
"""

from defectseg.experiments.grid import Grid, GridError, RunSpec, merge_config, substitute_seed
from defectseg.experiments.plots import write_reports
from defectseg.experiments.results import (
    METRICS,
    MetricInfo,
    load_rows,
    summary_markdown,
)
from defectseg.experiments.runner import (
    CompareRunner,
    CompareSettings,
    PlannedRun,
    RunConflictError,
    RunFailedError,
    default_launcher,
)

__all__ = [
    "METRICS",
    "CompareRunner",
    "CompareSettings",
    "Grid",
    "GridError",
    "MetricInfo",
    "PlannedRun",
    "RunConflictError",
    "RunFailedError",
    "RunSpec",
    "default_launcher",
    "load_rows",
    "merge_config",
    "substitute_seed",
    "summary_markdown",
    "write_reports",
]
