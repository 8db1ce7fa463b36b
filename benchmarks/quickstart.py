"""Run the README quickstart and print its wall time and final validation scores.

Usage (from the repository root)::

    python benchmarks/quickstart.py [--config configs/quickstart.yaml] [extra CLI overrides]

It runs ``defectseg fit --config configs/quickstart.yaml`` in a temporary working directory
(so nothing in ``runs/`` is touched), then reads the validation metrics of the best and last
epoch from a CSV logger added for the purpose, and prints a table.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "quickstart.yaml"))
    args, extra = parser.parse_known_args()
    with tempfile.TemporaryDirectory() as workdir:
        command = [
            sys.executable, "-m", "defectseg", "fit", "--config", args.config,
            "--trainer.logger+=lightning.pytorch.loggers.CSVLogger",
            f"--trainer.logger.save_dir={workdir}/csv",
            *extra,
        ]
        env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
        start = time.perf_counter()
        result = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if result.returncode != 0:
            sys.stderr.write(result.stdout[-4000:] + result.stderr[-4000:])
            raise SystemExit(f"quickstart failed with exit code {result.returncode}")
        rows = list(csv.DictReader(next(Path(workdir, "csv").rglob("metrics.csv")).open()))
    val = [r for r in rows if r.get("val/miou_defect")]
    last = val[-1]
    best = max(val, key=lambda r: float(r["val/miou_defect"]))
    classes = sorted(k for k in last if k.startswith("val/iou/"))
    print(f"quickstart: {args.config}  ({platform.processor() or platform.machine()}, {os.cpu_count()} cpus)")
    print(f"| metric | last epoch ({last['epoch']}) | best epoch ({best['epoch']}) |")
    print("|---|---:|---:|")
    print(f"| wall time (s) | {wall:.0f} | |")
    def fmt(row: dict[str, str], key: str) -> str:
        return f"{float(row[key]):.3f}" if row.get(key) else "-"

    for key in ["val/miou_defect", "val/miou", *classes]:
        print(f"| {key} | {fmt(last, key)} | {fmt(best, key)} |")


if __name__ == "__main__":
    main()
