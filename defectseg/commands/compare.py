"""``defectseg compare``: run a grid of configurations over a base config, with tables and plots.

    defectseg compare --base configs/compare/magnetic_tile.yaml --grid configs/compare/losses.yaml \\
        --out results/mt_losses --quick
    defectseg compare --base configs/magnetic_tile_cpu.yaml --grid configs/compare/dli_balanced.yaml \\
        --out results/mt_dli_balanced --mode cpu --jobs 2
    defectseg compare ... --jobs 4 --devices-per-run 2          # one node: 2 GPUs per run
    defectseg compare ... --executor slurm --slurm-partition gpu --slurm-time 4:00:00   # a cluster

Each run is ``defectseg fit`` + ``defectseg test`` in a subprocess, from the merged config saved
in ``OUT/runs/<configuration>/seed_<n>/config.yaml``. Running the same command again resumes:
finished runs are skipped, an interrupted run resumes from its ``last.ckpt``. See
``docs/results.md``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from defectseg.commands.registry import register_command


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 0,1,2, got {text!r}") from None


def _key_value(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE such as account=lab, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip().lstrip("-"), value.strip()


def _gpu_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def build_parser() -> argparse.ArgumentParser:
    from defectseg.experiments.grid import MODES  # the experiments import Lightning: only when run
    from defectseg.experiments.runner import EXECUTORS, LOGGERS

    parser = argparse.ArgumentParser(
        prog="defectseg compare",
        description=(
            "Run a grid of configurations (YAML fragments over a base config) x seeds; each run is a "
            "`defectseg fit` + `defectseg test`. Writes OUT/runs.csv, OUT/summary.md and PNG plots; "
            "run it again to resume."
        ),
    )
    parser.add_argument(
        "--base", "-c", action="append", default=[], required=True,
        help="base config (data, model, trainer); repeatable, merged in order like --config",
    )
    parser.add_argument("--grid", "-g", required=True, help="grid YAML (see configs/compare/)")
    parser.add_argument("--out", "-o", required=True, help="output folder (created; rerun the command to resume)")
    parser.add_argument(
        "--mode", choices=list(MODES), default=None,
        help="quick: the grid's `quick` fragment (reduced resolution and epochs on a CPU: a pipeline check), 3 seeds; "
        "cpu: a CPU training recipe as --base (configs/magnetic_tile_cpu.yaml, configs/neu_seg_cpu.yaml) plus the "
        "grid's `cpu` fragment, 3 seeds; full (default): the `full` fragment (paper settings, a GPU), 5 seeds",
    )
    parser.add_argument("--quick", action="store_true", help="the same as --mode quick")
    parser.add_argument(
        "--baseline", default=None, metavar="CONFIG",
        help="the configuration every other one is paired against in summary.md (default: the grid's `baseline`)",
    )
    parser.add_argument(
        "--logger", choices=list(LOGGERS), default="csv",
        help="csv (default): each run logs to CSV files in its folder; wandb: also to Weights & Biases, one group "
        "per grid and output folder, the configuration as job type (offline unless WANDB_MODE=online)",
    )
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (0..N-1), overriding the grid's")
    parser.add_argument(
        "--seed-list", type=_int_list, default=None, metavar="S1,S2,...",
        help="explicit seeds instead of --seeds, e.g. 3,4",
    )
    parser.add_argument(
        "--only", action="append", default=None, metavar="CONFIG",
        help="run only this configuration of the grid (repeatable, or comma-separated)",
    )
    parser.add_argument(
        "--test-checkpoint", choices=["best", "last"], default=None,
        help="checkpoint to test (default: the grid's, else best by the checkpoint monitor)",
    )
    parser.add_argument(
        "--jobs", "-j", type=int, default=1,
        help="runs at the same time (default 1); each then gets cores/jobs threads (OMP_NUM_THREADS) unless "
        "set. On a small CPU, --jobs 2 with one thread per run uses the cores better than one run with two",
    )
    parser.add_argument(
        "--devices-per-run", type=int, default=None, metavar="K",
        help="GPUs of each run: on a machine with G GPUs at most G/K runs go at once, each with its own GPUs "
        "(CUDA_VISIBLE_DEVICES) and trainer.devices K (default: one GPU per run, trainer.devices as configured)",
    )
    parser.add_argument(
        "--gpus", type=_gpu_list, default=None, metavar="0,1,...",
        help="the GPUs to hand out (default: every visible one, CUDA_VISIBLE_DEVICES or all)",
    )
    parser.add_argument("--fail-fast", action="store_true", help="stop at the first failed run")
    cluster = parser.add_argument_group(
        "cluster", "where the runs go: local subprocesses (default) or jobs through submitit "
        '(pip install "defectseg[cluster]"); a grid file\'s `slurm:` section sets the same, these options win'
    )
    cluster.add_argument(
        "--executor", choices=list(EXECUTORS), default="local",
        help="local: subprocesses here (--jobs at a time); slurm: one SLURM job array, a run per job, requeued "
        "and resumed from last.ckpt after a time-out or pre-emption; submitit-local: the same jobs as local "
        "processes (to try a cluster set-up)",
    )
    cluster.add_argument("--slurm-partition", default=None, metavar="NAME", help="SLURM partition")
    cluster.add_argument(
        "--slurm-time", default=None, metavar="TIME",
        help="time limit of a job: minutes or [D-]HH:MM:SS; a longer run is requeued and resumes",
    )
    cluster.add_argument("--slurm-gpus", type=int, default=None, metavar="N", help="GPUs per job (default --devices-per-run or 1)")
    cluster.add_argument("--slurm-cpus", type=int, default=None, metavar="N", help="CPU cores per job")
    cluster.add_argument("--slurm-mem-gb", type=float, default=None, metavar="GB", help="memory per job")
    cluster.add_argument(
        "--slurm-array-parallelism", type=int, default=None, metavar="N", help="jobs of the array running at once",
    )
    cluster.add_argument(
        "--slurm-setup", action="append", default=None, metavar="LINE",
        help="a shell line run in each job first, e.g. 'module load cuda' (repeatable)",
    )
    cluster.add_argument(
        "--sbatch", action="append", type=_key_value, default=None, metavar="KEY=VALUE",
        help="another #SBATCH option, e.g. --sbatch account=lab --sbatch qos=high (repeatable)",
    )
    parser.add_argument(
        "--dry-run", action="store_true",
        help="print the runs, check their configs with the defectseg parser, run nothing",
    )
    parser.add_argument(
        "--report-only", action="store_true",
        help="only rewrite runs.csv, summary.md and the plots from the finished runs",
    )
    parser.add_argument(
        "overrides", nargs="*",
        help="overrides for every run, applied after the grid: --trainer.max_epochs 2 (as for defectseg fit) "
        "or trainer.max_epochs=2",
    )
    return parser


def split_dotted_options(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separate ``--section.key value`` / ``--section.key=value`` overrides (as ``defectseg fit``
    takes them) from compare's own arguments; the overrides come back as ``section.key=value``."""
    rest: list[str] = []
    overrides: list[str] = []
    items = iter(argv)
    for item in items:
        name = item[2:].split("=", 1)[0] if item.startswith("--") else ""
        if "." not in name:
            rest.append(item)
        elif "=" in item:
            overrides.append(item[2:])
        else:
            value = next(items, None)
            if value is None:
                raise SystemExit(f"defectseg compare: {item} needs a value, e.g. {item} 2")
            overrides.append(f"{name}={value}")
    return rest, overrides


@register_command("compare", "run a grid of configurations x seeds (fit + test each) into tables and plots")
def compare_command(argv: list[str]) -> int:
    from defectseg.config import check_config
    from defectseg.experiments import (
        CompareRunner,
        CompareSettings,
        Grid,
        GridError,
        RunFailedError,
    )
    from defectseg.experiments.plots import write_reports
    from defectseg.experiments.runner import PLAN_FILE, _read_json

    parser = build_parser()
    own, dotted = split_dotted_options(list(argv))
    args = parser.parse_args(own)
    args.overrides = [*args.overrides, *dotted]
    if args.seeds is not None and args.seed_list is not None:
        parser.error("give --seeds or --seed-list, not both")
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.quick and args.mode not in (None, "quick"):
        parser.error(f"--quick is --mode quick; it contradicts --mode {args.mode}")
    mode = "quick" if args.quick else (args.mode or "full")
    cluster_options = {
        "--slurm-partition": args.slurm_partition, "--slurm-time": args.slurm_time,
        "--slurm-gpus": args.slurm_gpus, "--slurm-cpus": args.slurm_cpus, "--slurm-mem-gb": args.slurm_mem_gb,
        "--slurm-array-parallelism": args.slurm_array_parallelism, "--slurm-setup": args.slurm_setup,
        "--sbatch": args.sbatch,
    }
    given = [name for name, value in cluster_options.items() if value is not None]
    if given and args.executor == "local":
        parser.error(f"{', '.join(given)} only apply to cluster jobs: add --executor slurm (or submitit-local)")
    try:
        grid = Grid.from_yaml(args.grid)
        settings = CompareSettings(
            base=list(args.base),
            grid=grid,
            out=Path(args.out),
            mode=mode,
            seeds=args.seed_list if args.seed_list is not None else args.seeds,
            overrides=list(args.overrides),
            test_checkpoint=args.test_checkpoint,
            only=[name for item in args.only for name in item.split(",") if name] if args.only else None,
            fail_fast=args.fail_fast,
            jobs=args.jobs,
            baseline=args.baseline,
            logger=args.logger,
            devices_per_run=args.devices_per_run,
            gpus=args.gpus,
            executor=args.executor,
        )
        executor = None
        if args.executor != "local" and not (args.report_only or args.dry_run):
            from defectseg.experiments.cluster import ClusterSettings, SubmititExecutor

            cluster = ClusterSettings.from_mapping(grid.slurm, source=f"grid {grid.source!r}: slurm").merged(
                {
                    "partition": args.slurm_partition, "time": args.slurm_time, "gpus_per_job": args.slurm_gpus,
                    "cpus_per_job": args.slurm_cpus, "mem_gb": args.slurm_mem_gb,
                    "array_parallelism": args.slurm_array_parallelism, "setup": args.slurm_setup,
                    "sbatch": dict(args.sbatch) if args.sbatch else None,
                }
            )
            executor = SubmititExecutor(args.executor, cluster)
        runner = CompareRunner(settings, executor=executor)
        plan = runner.plan()
        runner.comparisons()  # an unknown --baseline stops here
        if not args.report_only:
            check_config(settings.base, prog="defectseg compare")  # unknown keys: one paragraph, exit 2
        if args.report_only:
            if not (runner.out / PLAN_FILE).is_file():
                raise GridError(f"{runner.out} holds no {PLAN_FILE}: nothing to report")
            paths = write_reports(runner.out, plan, settings, _read_json(runner.out / PLAN_FILE))
            print("\n".join(str(p) for p in paths.values()))
            return 0
        if args.dry_run:
            runner.check_out_dir()
            for run in plan:
                state = "finished" if run.finished else "to run"
                print(f"{run.spec.key:40s} {state:9s} {run.run_dir}")
            for note in runner.notes():
                print(f"note: {note}")
            runner.validate()
            print(f"{len(plan)} runs; configs parse.")
            return 0
        summary = runner.run(argv=argv)
    except GridError as err:
        raise SystemExit(f"defectseg compare: {err}") from None
    except RunFailedError as err:
        raise SystemExit(f"defectseg compare: {err}") from None
    except KeyboardInterrupt:
        return 130  # the runner said how to resume
    return 1 if summary["failed"] else 0
