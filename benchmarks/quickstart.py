"""Run the README quickstart for several seeds (and precisions) and print wall time and scores.

Usage (from the repository root)::

    python benchmarks/quickstart.py                                  # seeds 0 1 2, the config's precision
    python benchmarks/quickstart.py --precisions 32-true bf16-mixed  # the bf16 accuracy-parity table
    python benchmarks/quickstart.py --seeds 0 -- --trainer.max_epochs 4

Each run is ``defectseg fit --config configs/quickstart.yaml --seed_everything S`` in a
temporary working directory (nothing in ``runs/`` is touched), with a CSV logger added for the
purpose; the table gives each run's wall time and final ``val/miou_defect`` and, per precision,
the mean ± sample standard deviation over the seeds.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
from pathlib import Path

from _cli_runs import REPO, last_value, mean_std, run_cli


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "quickstart.yaml"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--precisions", nargs="+", default=[None], help="e.g. 32-true bf16-mixed")
    args, extra = parser.parse_known_args()
    extra = [e for e in extra if e != "--"]
    load = os.getloadavg()[0]
    print(f"quickstart: {args.config} ({platform.machine()}, {os.cpu_count()} cpus, load {load:.1f} at start)\n")
    print("| precision | seed | wall time (s) | final val/miou_defect | best val/miou_defect |")
    print("|---|---:|---:|---:|---:|")
    summary = {}
    for precision in args.precisions:
        finals = []
        for seed in args.seeds:
            overrides = [f"--seed_everything={seed}", *extra]
            if precision:
                overrides.append(f"--trainer.precision={precision}")
            with tempfile.TemporaryDirectory() as workdir:
                wall, rows = run_cli("fit", args.config, Path(workdir), "csv", overrides)
            final = last_value(rows, "val/miou_defect")
            best = max((float(r["val/miou_defect"]) for r in rows if r.get("val/miou_defect")), default=float("nan"))
            finals.append(final)
            print(f"| {precision or 'config'} | {seed} | {wall:.0f} | {final:.3f} | {best:.3f} |", flush=True)
        summary[precision or "config"] = finals
    print("\n| precision | final val/miou_defect, mean ± std | min |")
    print("|---|---:|---:|")
    for precision, finals in summary.items():
        print(f"| {precision} | {mean_std(finals)} | {min(finals):.3f} |")
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end (above ~2 on 2 cores the machine was busy)")


if __name__ == "__main__":
    main()
