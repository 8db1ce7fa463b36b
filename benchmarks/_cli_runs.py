"""Run ``defectseg fit`` / ``defectseg test`` in a subprocess and read their metrics (CSV logger).

Shared by ``benchmarks/quickstart.py`` and ``benchmarks/magnetic_tile_cpu.py``.
"""

from __future__ import annotations

import csv
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_cli(command: str, config: str, workdir: Path, name: str, overrides: list[str]) -> tuple[float, list[dict]]:
    """``defectseg <command> --config config`` in ``workdir`` with a CSV logger under ``workdir/name``;
    returns the wall time in seconds and the logged rows."""
    save_dir = workdir / name
    cli = [
        sys.executable, "-m", "defectseg", command, "--config", config,
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={save_dir}",
        f"--trainer.default_root_dir={workdir}", f"--checkpoint.dirpath={workdir}/checkpoints", *overrides,
    ]
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    start = time.perf_counter()
    result = subprocess.run(cli, cwd=workdir, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    (workdir / f"{name}.log").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        sys.stderr.write(result.stdout[-3000:] + result.stderr[-3000:])
        raise SystemExit(f"defectseg {command} failed with exit code {result.returncode} (log: {workdir}/{name}.log)")
    files = sorted(save_dir.rglob("metrics.csv"))
    rows = list(csv.DictReader(files[-1].open())) if files else []
    return wall, rows


def last_value(rows: list[dict], key: str) -> float:
    """The last logged value of ``key`` (nan when never logged)."""
    values = [float(r[key]) for r in rows if r.get(key) not in (None, "")]
    return values[-1] if values else float("nan")


def mean_std(values: list[float]) -> str:
    """``mean ± sample std`` of the finite values."""
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return "-"
    spread = statistics.stdev(finite) if len(finite) > 1 else 0.0
    return f"{statistics.mean(finite):.3f} ± {spread:.3f}"
