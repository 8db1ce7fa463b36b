"""The Magnetic Tile CPU recipe over several seeds: fit, test, one table.

Usage (from the repository root, with the dataset under $DEFECTSEG_DATA_ROOT/magnetic_tile)::

    python benchmarks/magnetic_tile_cpu.py                     # seeds 0 1 2
    python benchmarks/magnetic_tile_cpu.py --seeds 0 -- --trainer.max_epochs 2

Each seed runs ``defectseg fit --config configs/magnetic_tile_cpu.yaml`` with
``--seed_everything S --data.init_args.seed S`` (the split and the initialisation change
together), then ``defectseg test`` on the last checkpoint, in a temporary working directory.
The table gives the fit wall time, the test split's global defect IoU (defect pixels of all
images pooled), defect mIoU, the false-positive rate on defect-free test images and the IoU of
each class, then the mean ± sample standard deviation over the seeds.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
from pathlib import Path

from _cli_runs import REPO, last_value, mean_std, run_cli

CLASSES = ["Blowhole", "Break", "Crack", "Fray", "Uneven"]
COLUMNS = {
    "global defect IoU": "test/global_defect_iou",
    "defect mIoU": "test/miou_defect",
    "FP rate (defect-free)": "test/fp_rate_defect_free",
    **{name: f"test/iou/{name}" for name in CLASSES},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "magnetic_tile_cpu.yaml"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--keep", default=None, help="keep each seed's run folder under this folder")
    args, extra = parser.parse_known_args()
    extra = [e for e in extra if e != "--"]
    root = os.environ.get("DEFECTSEG_DATA_ROOT", os.path.join("..", "shared", "datasets"))
    if not os.path.isdir(os.path.join(root, "magnetic_tile")):
        raise SystemExit(f"Magnetic Tile not found under {root}/magnetic_tile; set DEFECTSEG_DATA_ROOT")
    os.environ["DEFECTSEG_DATA_ROOT"] = os.path.abspath(root)
    print(f"{args.config} ({platform.machine()}, {os.cpu_count()} cpus, load {os.getloadavg()[0]:.1f} at start)\n")
    print("| seed | fit wall time (min) | epochs | " + " | ".join(COLUMNS) + " |")
    print("|---:|---:|---:|" + "---:|" * len(COLUMNS))
    results: dict[str, list[float]] = {name: [] for name in ["wall", *COLUMNS]}
    for seed in args.seeds:
        overrides = [f"--seed_everything={seed}", f"--data.init_args.seed={seed}", *extra]
        with tempfile.TemporaryDirectory() as tmp:
            workdir = Path(args.keep, f"seed{seed}") if args.keep else Path(tmp)
            workdir.mkdir(parents=True, exist_ok=True)
            wall, fit_rows = run_cli("fit", args.config, workdir, "fit", overrides)
            last = workdir / "checkpoints" / "last.ckpt"
            _, rows = run_cli("test", args.config, workdir, "test", [*overrides, f"--ckpt_path={last}"])
        epochs = int(last_value(fit_rows, "epoch")) + 1
        values = {name: last_value(rows, key) for name, key in COLUMNS.items()}
        results["wall"].append(wall / 60)
        for name, value in values.items():
            results[name].append(value)
        cells = " | ".join(f"{v:.3f}" for v in values.values())
        print(f"| {seed} | {wall / 60:.1f} | {epochs} | {cells} |", flush=True)
    cells = " | ".join(mean_std(results[name]) for name in COLUMNS)
    print(f"| mean ± std | {mean_std(results['wall'])} | | {cells} |")
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end (above ~2 on 2 cores the machine was busy)")


if __name__ == "__main__":
    main()
