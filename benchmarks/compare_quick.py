"""Quick-mode comparisons on the real data, recorded under docs/results/<dataset>/.

Runs ``defectseg compare --quick`` for each grid on Magnetic Tile and on NEU-Seg (its leak-free
``grouped`` split), each into ``docs/results/<dataset>/<grid>/`` (summary.md, runs.csv, plots;
the per-run folders are written under ``runs/compare_quick/`` and not meant to be committed), and
writes ``docs/results/<dataset>/README.md`` (from ``benchmark.json`` beside it, one record per
grid, kept across invocations) with the exact command, the hardware, the date and the wall
time of each grid. Rerun it to resume: finished runs are skipped.

    python benchmarks/compare_quick.py                       # both datasets, default grids
    python benchmarks/compare_quick.py --datasets magnetic_tile
    python benchmarks/compare_quick.py --estimate            # time one run per grid, predict the total

Default grids: Magnetic Tile -- losses and dli (it has defect-free images, which DLI and the
false-positive rate need); NEU-Seg -- semi_supervised (NEU-Seg has no defect-free image, so DLI
does nothing there). Add grids with ``--grids``.

``--estimate`` runs a few representative configurations of each grid once (1 seed, one thread:
``OMP_NUM_THREADS=1``), reads each run's CPU time (interpreter start-up, fit and test, data
workers included), counts every configuration of the grid at the CPU time of the timed one that
stands for it (:data:`ESTIMATE_CONFIGS`) times the seeds, and predicts the wall time on N free
cores with ``--jobs N`` (N runs at once, one thread each) as ``total CPU time / N``, printed as
a table. The grids run with ``--jobs`` (default 2): on a small CPU, runs side by side with one
thread each use the cores better than one run with several threads. Skips a dataset whose folder is missing.
"""

from __future__ import annotations

import argparse
import datetime as dt
import fnmatch
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DATASETS = {
    "magnetic_tile": {"base": "configs/compare/magnetic_tile.yaml", "grids": ["losses", "dli"]},
    "neu_seg": {"base": "configs/compare/neu_seg.yaml", "grids": ["semi_supervised"]},
}
#: configurations timed by --estimate, each standing for the configurations matching its
#: pattern (the first match counts; fnmatch patterns)
ESTIMATE_CONFIGS = {
    "losses": {"balanced+dice": "balanced*", "ce": "*"},
    "dli": {"resnet18-dli": "*-dli", "mobilenet_v2-no_dli": "*"},
    "semi_supervised": {"uaps_10": "uaps_*", "supervised_50": "*"},
}


def data_root() -> Path:
    return Path(os.environ.get("DEFECTSEG_DATA_ROOT", REPO.parent / "shared" / "datasets"))


def hardware() -> str:
    from defectseg.experiments.runner import environment_info

    info = environment_info()
    device = info["cuda"] or f"CPU {info['cpu']}, {info.get('cpu_affinity', info['cpu_count'])} cores"
    return f"{device}; {info['platform']}; torch {info['torch']}, lightning {info['lightning']}"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True)
        return out.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")
    except OSError:
        return "unknown"


def compare_command(dataset: str, grid: str, out: Path, extra: list[str]) -> list[str]:
    return [
        "defectseg", "compare", "--base", DATASETS[dataset]["base"], "--grid", f"configs/compare/{grid}.yaml",
        "--out", str(out), "--quick", *extra,
    ]


def run(command: list[str], env: dict[str, str] | None = None) -> float:
    """Run a defectseg command from the repository root; its wall time."""
    start = time.perf_counter()
    full = [sys.executable, "-m", "defectseg", *command[1:]]
    code = subprocess.call(full, cwd=REPO, env=env)
    if code != 0:
        raise SystemExit(f"{' '.join(command)} exited with code {code}")
    return time.perf_counter() - start


def estimate(datasets: list[str], grids: dict[str, list[str]], cores: int) -> None:
    from defectseg.experiments import Grid

    rows = []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for dataset in datasets:
        total_cpu = 0.0
        for grid_name in grids[dataset]:
            grid = Grid.from_yaml(REPO / "configs" / "compare" / f"{grid_name}.yaml")
            configs = [name for name, _ in grid.configurations()]
            patterns = {n: p for n, p in ESTIMATE_CONFIGS.get(grid_name, {}).items() if n in configs}
            patterns = patterns or {configs[0]: "*"}
            with tempfile.TemporaryDirectory(prefix="compare-estimate-") as tmp:
                out = Path(tmp) / "out"
                only = [f"--only={','.join(patterns)}", "--seeds", "1"]
                run(compare_command(dataset, grid_name, out, only), env=env)
                cpu = {}
                for name in patterns:
                    results = json.loads((out / "runs" / name / "seed_0" / "results.json").read_text())
                    cpu[name] = results["cpu_time_s"]
                    rows.append((dataset, grid_name, name, results["cpu_time_s"], results["wall_time_s"]))
            seeds = len(grid.seed_list("quick"))
            grid_cpu = 0.0
            for config in configs:
                match = next((n for n, p in patterns.items() if fnmatch.fnmatchcase(config, p)), None)
                grid_cpu += seeds * (cpu[match] if match else sum(cpu.values()) / len(cpu))
            total_cpu += grid_cpu
            rows.append((dataset, grid_name, f"= {len(configs)} configurations x {seeds} seeds", grid_cpu, None))
        rows.append((dataset, "all", f"predicted: {total_cpu / cores / 60:.0f} min on {cores} free cores "
                     f"with --jobs {cores}", total_cpu, None))
    print("\n| dataset | grid | run | CPU s | wall s (this machine) |\n|---|---|---|---:|---:|")
    for dataset, grid_name, name, cpu, wall in rows:
        print(f"| {dataset} | {grid_name} | {name} | {cpu:.0f} | {'' if wall is None else f'{wall:.0f}'} |")
    print(f"\nhardware: {hardware()}; load average now: {os.getloadavg()[0]:.1f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=list(DATASETS))
    parser.add_argument("--grids", nargs="+", default=None, help="grids (configs/compare/<grid>.yaml) for every dataset")
    parser.add_argument("--results", default="docs/results", help="where summaries go (default docs/results)")
    parser.add_argument("--runs", default="runs/compare_quick", help="where the run folders go")
    parser.add_argument("--estimate", action="store_true", help="time one run per grid and predict the total")
    parser.add_argument("--cores", type=int, default=2, help="cores assumed by --estimate (default 2)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at the same time (defectseg compare --jobs)")
    args = parser.parse_args()

    available = []
    for dataset in args.datasets:
        if not (data_root() / dataset).is_dir():
            print(f"skipping {dataset}: {data_root() / dataset} not found (set DEFECTSEG_DATA_ROOT)")
        else:
            available.append(dataset)
    grids = {d: args.grids or DATASETS[d]["grids"] for d in available}
    if args.estimate:
        estimate(available, grids, args.cores)
        return 0

    for dataset in available:
        results = REPO / args.results / dataset
        results.mkdir(parents=True, exist_ok=True)
        record_path = results / "benchmark.json"
        records = json.loads(record_path.read_text()) if record_path.is_file() else {}
        for grid in grids[dataset]:
            out = Path(args.runs) / dataset / grid
            command = compare_command(dataset, grid, out, ["--jobs", str(args.jobs)])
            print(f"\n=== {dataset} / {grid}: {' '.join(command)}", flush=True)
            started = dt.datetime.now()
            wall = run(command)
            target = results / grid
            target.mkdir(parents=True, exist_ok=True)
            for name in ("summary.md", "runs.csv", "iou_per_class.png", "miou_per_method.png", "compare.json"):
                if (REPO / out / name).is_file():
                    shutil.copy2(REPO / out / name, target / name)
            plan = json.loads((REPO / out / "compare.json").read_text())
            total = sum(float(i.get("wall_time_s") or 0) for i in plan.get("invocations", []))
            records[grid] = {
                "command": " ".join(command),
                "started": started.isoformat(timespec="minutes"),
                "finished": dt.datetime.now().isoformat(timespec="minutes"),
                "wall_time_s": round(wall, 1),
                "grid_wall_time_s": round(total, 1),
                "invocations": len(plan.get("invocations", [])),
                "hardware": hardware(),
                "code": f"git {git_commit()}; python {platform.python_version()}",
            }
            record_path.write_text(json.dumps(records, indent=2) + "\n")
        lines = [
            f"# Quick-mode comparisons on {dataset}",
            "",
            "Written by `python benchmarks/compare_quick.py` (see docs/results.md for what quick mode is and "
            "how these numbers relate to the papers'). One section per grid, newest run of each.",
        ]
        for grid, record in records.items():
            lines += [
                "",
                f"## {grid}",
                "",
                f"- Command: `{record['command']}`",
                f"- Date: {record['started']} to {record['finished']}",
                f"- Wall time: {record['wall_time_s'] / 60:.1f} min for this invocation; "
                f"{record['grid_wall_time_s'] / 60:.1f} min over the grid's {record['invocations']} invocation(s)",
                f"- Hardware: {record['hardware']}",
                f"- Code: {record['code']}",
                f"- Results: [summary]({grid}/summary.md), [runs.csv]({grid}/runs.csv), "
                f"[IoU per class]({grid}/iou_per_class.png), [mean IoU per method]({grid}/miou_per_method.png)",
            ]
        (results / "README.md").write_text("\n".join(lines) + "\n")
        print(f"\nwrote {results / 'README.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
