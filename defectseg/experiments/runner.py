"""Run a grid: each run is a ``defectseg fit`` then a ``defectseg test``, in a subprocess.

One worker process per run (:mod:`defectseg.experiments.worker`) runs both commands through the
``defectseg`` entry point, so a crash of one run never takes the grid down and each run starts
from a fresh interpreter.

Output folder layout::

    OUT/
      compare.json                  the plan and every invocation (command, date, hardware, time)
      runs.csv  summary.md  *.png   written by defectseg.experiments.results / plots
      runs/<config>/seed_<seed>/
        config.yaml                 the merged config: `defectseg fit --config config.yaml`
                                    reproduces the run
        run.json                    state: config hash, commands, fit done, times
        run.log                     the output of its fit and test
        checkpoints/                best-*.ckpt, last.ckpt
        logs/fit/metrics.csv        CSVLogger of the fit (fit_2, fit_3... after resumes)
        logs/test/metrics.csv       CSVLogger of the test
        wandb/                      with --logger wandb: the run's W&B folder (fit and test)
        results.json                written last: the run is finished

Resuming: a run with ``results.json`` is finished and skipped. A run without it restarts; its
fit resumes from ``checkpoints/last.ckpt`` when that exists (``ResumableCheckpoint`` also
writes it on Ctrl-C or a crash), and a run whose fit had finished only redoes its test. A run
folder made from a different config (changed grid, base or overrides) stops the grid before
anything runs, so no result is mixed with another experiment's.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import datetime as dt
import hashlib
import io
import json
import math
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from defectseg.experiments.devices import DevicePlan, plan_devices, visible_gpus
from defectseg.experiments.grid import (
    MODES,
    Grid,
    GridError,
    RunSpec,
    merge_config,
    substitute_seed,
)

RESULTS_FILE = "results.json"
STATE_FILE = "run.json"
CONFIG_FILE = "config.yaml"
PLAN_FILE = "compare.json"
#: Loggers of ``defectseg compare --logger``: the CSV logger is always there (the harness reads it).
LOGGERS = ("csv", "wandb")
#: Executors of ``defectseg compare --executor``: subprocesses here, or submitit (SLURM or local).
EXECUTORS = ("local", "slurm", "submitit-local")


class LaunchResult(NamedTuple):
    """What a launcher reports: the exit code and the CPU seconds of the process tree."""

    code: int
    cpu_time_s: float | None = None


#: ``launcher(command, log_path, env) -> exit code | LaunchResult``: runs one subprocess.
Launcher = Callable[[list[str], Path, dict[str, str]], "int | LaunchResult"]

#: Subprocesses started by :func:`default_launcher` and still running (for Ctrl-C handling).
_ACTIVE: set[subprocess.Popen] = set()
_ACTIVE_LOCK = threading.Lock()


class RunConflictError(GridError):
    """A run folder holds a run of another config."""


class RunFailedError(RuntimeError):
    """A run's fit or test subprocess failed (with ``--fail-fast``)."""


@dataclass
class PlannedRun:
    """A run with its merged config and folder."""

    spec: RunSpec
    run_dir: Path
    config: dict[str, Any]
    config_hash: str

    @property
    def finished(self) -> bool:
        return (self.run_dir / RESULTS_FILE).is_file()


@dataclass
class CompareSettings:
    """What ``defectseg compare`` runs.

    Attributes:
        base: base config files (merged in order, as repeated ``--config`` are).
        grid: the grid.
        out: output folder.
        mode: ``quick``, ``cpu`` or ``full`` (which fragment, seed count and tested checkpoint
            of the grid apply).
        quick: ``True`` is the same as ``mode="quick"`` (the older spelling).
        seeds: seed count or list (default: the grid's for the mode).
        overrides: ``key.sub=value`` applied to every run, after the grid's fragments.
        test_checkpoint: ``best`` or ``last`` (default: the grid's).
        only: run these configurations only.
        fail_fast: stop at the first failed run (else go on and report failures at the end).
        jobs: runs at the same time. With more than one, each run gets
            ``OMP_NUM_THREADS = cores // jobs`` unless the environment sets it.
        baseline: the configuration every other one is paired against in ``summary.md``
            (default: the grid's ``baseline``).
        logger: ``csv`` (each run's CSVLogger only) or ``wandb`` (a WandbLogger too, one W&B
            group per grid and output folder, the configuration as job type).
        devices_per_run: GPUs of each run (``--devices-per-run``): on a machine with G GPUs at
            most ``G // devices_per_run`` runs go at once, each with its own GPUs through
            ``CUDA_VISIBLE_DEVICES``, and ``trainer.devices`` of the runs is set to it. ``None``:
            one GPU per run and ``trainer.devices`` as the config says.
        gpus: the GPUs to hand out (``CUDA_VISIBLE_DEVICES`` entries); ``None``: every visible one.
        executor: ``local`` (subprocesses on this machine), ``slurm`` (a SLURM job array through
            submitit) or ``submitit-local`` (the same submitit code path on this machine); the
            runner is given the submitit executor (:mod:`defectseg.experiments.cluster`).
        python: interpreter of the subprocesses.
    """

    base: list[str]
    grid: Grid
    out: Path
    mode: str = "full"
    quick: bool = False
    seeds: int | list[int] | None = None
    overrides: list[str] = field(default_factory=list)
    test_checkpoint: str | None = None
    only: list[str] | None = None
    fail_fast: bool = False
    jobs: int = 1
    baseline: str | None = None
    logger: str = "csv"
    devices_per_run: int | None = None
    gpus: list[str] | None = None
    executor: str = "local"
    python: str = sys.executable

    def __post_init__(self) -> None:
        if self.quick:
            if self.mode not in ("full", "quick"):
                raise GridError(f"quick=True contradicts mode={self.mode!r}")
            self.mode = "quick"
        if self.mode not in MODES:
            raise GridError(f"mode must be one of {list(MODES)}, got {self.mode!r}")
        self.quick = self.mode == "quick"
        if self.logger not in LOGGERS:
            raise GridError(f"logger must be one of {list(LOGGERS)}, got {self.logger!r}")
        if self.executor not in EXECUTORS:
            raise GridError(f"executor must be one of {list(EXECUTORS)}, got {self.executor!r}")
        if self.devices_per_run is not None and self.devices_per_run < 1:
            raise GridError(f"devices_per_run must be >= 1, got {self.devices_per_run}")


# ---------------------------------------------------------------------- configs
def config_hash(config: dict[str, Any]) -> str:
    """A short stable hash of a config (its JSON with sorted keys)."""
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _without_progress_bars(callbacks: Any) -> Any:
    """Drop progress-bar callbacks (the runs log to files, with the progress bar off)."""
    if isinstance(callbacks, dict):
        callbacks = [callbacks]
    if not isinstance(callbacks, list):
        return callbacks
    return [
        c for c in callbacks
        if not (isinstance(c, dict) and str(c.get("class_path", "")).endswith("ProgressBar"))
    ]


def _wandb_init_args(logger: Any) -> dict[str, Any]:
    """``init_args`` of the first WandbLogger in a ``trainer.logger`` value (a block or a list)."""
    for block in logger if isinstance(logger, list) else [logger]:
        if isinstance(block, dict) and str(block.get("class_path", "")).endswith("WandbLogger"):
            return dict(block.get("init_args") or {})
    return {}


def harness_config(
    experiment: dict[str, Any], run_dir: Path, seed: int, wandb: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The config a run executes: ``experiment`` plus the harness's seed, folders and logger.

    Sets ``seed_everything``, ``trainer.default_root_dir`` and ``checkpoint.dirpath`` to the run
    folder, replaces ``trainer.logger`` with a CSVLogger in ``<run>/logs/fit`` and turns the
    progress bar off (dropping progress-bar callbacks).

    With ``wandb`` (``group``, ``job_type``, ``name``, ``id``, ``tags``), the logger is a list:
    a WandbLogger saving under ``<run>/wandb`` (its ``project`` and ``entity`` taken from the
    experiment's own WandbLogger, else project ``defectseg``; online or offline as
    ``WANDB_MODE`` says; ``resume: allow`` so a resumed fit and the test log to the same W&B
    run), then the CSVLogger, last, so ``--trainer.logger.init_args.version`` still names its
    folder. ``wandb.log_checkpoints`` defaults to false (the checkpoints stay in the run folder).
    """
    config = copy.deepcopy(experiment)
    config["seed_everything"] = int(seed)
    trainer = config.setdefault("trainer", {})
    if not isinstance(trainer, dict):
        raise GridError(f"'trainer' must be a mapping, got {trainer!r}")
    trainer["default_root_dir"] = str(run_dir)
    csv_logger = {
        "class_path": "lightning.pytorch.loggers.CSVLogger",
        "init_args": {"save_dir": str(run_dir), "name": "logs", "version": "fit"},
    }
    if wandb is None:
        trainer["logger"] = csv_logger
    else:
        own = _wandb_init_args(trainer.get("logger"))
        init_args = {"project": own.get("project") or "defectseg"}
        if own.get("entity"):
            init_args["entity"] = own["entity"]
        init_args.update({"save_dir": str(run_dir), "resume": "allow", **wandb})
        trainer["logger"] = [{"class_path": "lightning.pytorch.loggers.WandbLogger", "init_args": init_args}, csv_logger]
        extras = config.get("wandb") if isinstance(config.get("wandb"), dict) else {}
        config["wandb"] = {"log_checkpoints": False, **extras}
    trainer["enable_progress_bar"] = False
    if "callbacks" in trainer:
        trainer["callbacks"] = _without_progress_bars(trainer["callbacks"])
    checkpoint = config.setdefault("checkpoint", {}) or {}
    checkpoint["dirpath"] = str(run_dir / "checkpoints")
    config["checkpoint"] = checkpoint
    return config


def experiment_config(
    base: dict[str, Any], grid: Grid, mode: str, spec: RunSpec, overrides: Sequence[str] = ()
) -> dict[str, Any]:
    """Base, then the grid's ``common`` and mode fragments, then the configuration's fragment,
    then overrides (``${seed}`` in ``common`` and the mode fragment is the run's seed too)."""
    from defectseg.config import set_dotted

    config = merge_config(base, substitute_seed(grid.common, spec.seed))
    config = merge_config(config, substitute_seed(grid.modes.get(mode, {}), spec.seed))
    config = merge_config(config, spec.fragment)
    for item in overrides:
        if "=" not in item:
            raise GridError(f"override {item!r} must look like trainer.max_epochs=2")
        key, value = item.split("=", 1)
        set_dotted(config, key.lstrip("-"), yaml.safe_load(value))
    return config


def configured_devices(config: dict[str, Any], available: int) -> int:
    """How many GPUs a run's ``trainer.devices`` asks for: an int, a list of indices (its
    length), or ``auto`` / ``-1`` (all ``available``)."""
    trainer = config.get("trainer") if isinstance(config.get("trainer"), dict) else {}
    devices = trainer.get("devices", "auto")
    if isinstance(devices, (list, tuple)):
        return max(1, len(devices))
    if isinstance(devices, str):
        text = devices.strip()
        if "," in text:
            return max(1, len([part for part in text.split(",") if part.strip()]))
        devices = int(text) if text.lstrip("-").isdigit() else -1
    if isinstance(devices, int) and not isinstance(devices, bool):
        return available if devices < 0 else max(1, devices)
    return 1


def _trains_on_gpu(config: dict[str, Any]) -> bool:
    """Whether a run's config may train on a GPU (``trainer.accelerator`` other than ``cpu``)."""
    trainer = config.get("trainer") if isinstance(config.get("trainer"), dict) else {}
    return str(trainer.get("accelerator", "auto")).lower() != "cpu"


def validate_config(path: Path) -> str | None:
    """Check a run's config with the ``defectseg fit`` parser (``--print_config``, nothing is
    instantiated); the parser's error message, or ``None`` when it is valid."""
    from defectseg.config import DefectSegCLI

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            DefectSegCLI(args=["fit", "--config", str(path), "--print_config"])
        except SystemExit as exit_:
            if exit_.code in (0, None):
                return None
            return (err.getvalue() or out.getvalue()).strip()[-2000:] or f"exit code {exit_.code}"
        except Exception as error:  # a class that fails to import, a bad value...
            return f"{type(error).__name__}: {error}"
    return None


# ---------------------------------------------------------------------- files
def _write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (a temporary file renamed over the target)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def read_metrics_csv(path: Path) -> dict[str, float]:
    """The last value of each column of a CSVLogger ``metrics.csv`` (``epoch``/``step`` dropped)."""
    values: dict[str, float] = {}
    if not path.is_file():
        return values
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            for key, value in row.items():
                if key in ("epoch", "step") or value in (None, ""):
                    continue
                try:
                    values[key] = float(value)
                except ValueError:
                    continue
    return values


def fit_summary(run_dir: Path) -> dict[str, float]:
    """``val/miou_defect_best`` and ``epochs`` from the fit logs (every attempt)."""
    best, epochs = -math.inf, 0
    for path in sorted((run_dir / "logs").glob("fit*/metrics.csv")):
        with path.open(newline="") as handle:
            for row in csv.DictReader(handle):
                value = row.get("val/miou_defect")
                if value not in (None, ""):
                    best = max(best, float(value))
                epoch = row.get("epoch")
                if epoch not in (None, ""):
                    epochs = max(epochs, int(float(epoch)) + 1)
    out: dict[str, float] = {"epochs": float(epochs)}
    if best > -math.inf:
        out["val/miou_defect_best"] = best
    return out


def checkpoint_loads(path: Path) -> bool:
    """Whether ``path`` is a readable checkpoint (a run killed while saving leaves a broken one)."""
    import torch

    try:
        torch.load(path, map_location="cpu", weights_only=False)
    except Exception:
        return False
    return True


def best_checkpoint(checkpoints: Path) -> Path | None:
    """The best checkpoint of a run: ``best_model_path`` stored in ``last.ckpt`` by the
    checkpoint callback, else the newest ``*.ckpt`` other than ``last*.ckpt``."""
    import torch

    last = checkpoints / "last.ckpt"
    if last.is_file():
        try:
            state = torch.load(last, map_location="cpu", weights_only=False)
            for key, value in (state.get("callbacks") or {}).items():
                if "Checkpoint" in str(key) and isinstance(value, dict):
                    path = value.get("best_model_path")
                    if path and Path(path).is_file():
                        return Path(path)
        except Exception:
            pass
    candidates = [p for p in checkpoints.glob("*.ckpt") if not p.name.startswith("last")]
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


def environment_info() -> dict[str, Any]:
    """Hardware and software of this machine, for the records."""
    import lightning
    import torch

    info: dict[str, Any] = {
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    with contextlib.suppress(AttributeError, OSError):
        info["cpu_affinity"] = len(os.sched_getaffinity(0))
    return info


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def default_launcher(command: list[str], log_path: Path, env: dict[str, str]) -> LaunchResult:
    """Run ``command`` with its output appended to ``log_path``.

    Returns its exit code and the user + system CPU seconds of the process and the children it
    waited for (its data-loader workers). On Ctrl-C the child, which gets the same SIGINT from
    the terminal, is given time to write its ``last.ckpt`` before the interrupt goes on.
    """
    with log_path.open("a") as log:
        log.write(f"\n$ {' '.join(command)}\n# {dt.datetime.now().isoformat(timespec='seconds')}\n")
        log.flush()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        with _ACTIVE_LOCK:
            _ACTIVE.add(process)
        try:
            if hasattr(os, "wait4"):
                _, status, usage = os.wait4(process.pid, 0)
                process.returncode = os.waitstatus_to_exitcode(status)
                return LaunchResult(process.returncode, usage.ru_utime + usage.ru_stime)
            return LaunchResult(process.wait())  # pragma: no cover - no wait4 (Windows)
        except KeyboardInterrupt:
            _stop_gently([process], lambda timeout: _exited(process, timeout))
            raise
        finally:
            with _ACTIVE_LOCK:
                _ACTIVE.discard(process)


def _exited(process: subprocess.Popen, timeout: float) -> bool:
    try:
        process.wait(timeout=timeout)
        return True
    except subprocess.TimeoutExpired:
        return False


def _stop_gently(
    processes: Sequence[subprocess.Popen], wait_exited: Callable[[float], bool], grace: float = 5.0
) -> None:
    """Let interrupted runs finish writing ``last.ckpt``: give them ``grace`` seconds to exit
    (they got the terminal's SIGINT too), then send SIGINT, then kill them after two minutes.
    ``wait_exited(timeout)`` waits for all of them and says whether they have exited."""
    if wait_exited(grace):
        return
    for process in processes:
        if process.returncode is None:
            with contextlib.suppress(OSError):
                process.send_signal(signal.SIGINT)
    if wait_exited(120.0):
        return
    for process in processes:
        if process.returncode is None:
            with contextlib.suppress(OSError):
                process.kill()
    wait_exited(10.0)  # reap them


# ---------------------------------------------------------------------- runner
class CompareRunner:
    """Plans and runs a grid (see the module docstring for the output layout).

    Args:
        settings: what to run.
        launcher: runs one subprocess (tests replace it); default :func:`default_launcher`.
        printer: where progress lines go (default ``print``, flushed).
        executor: runs the unfinished runs somewhere else (an object with
            ``execute(runner, todo, failed, durations)``, such as
            :class:`defectseg.experiments.cluster.SubmititExecutor`); ``None``: subprocesses on
            this machine, ``settings.jobs`` at a time.
    """

    def __init__(
        self,
        settings: CompareSettings,
        launcher: Launcher | None = None,
        printer: Callable[[str], None] | None = None,
        executor: Any = None,
    ) -> None:
        self.settings = settings
        self.launcher = launcher or default_launcher
        self.printer = printer or (lambda line: print(line, flush=True))
        self.executor = executor
        self.out = Path(settings.out).resolve()
        self._plan: list[PlannedRun] | None = None
        self._invocation: int | None = None
        self._devices: DevicePlan | None = None

    def log(self, message: str) -> None:
        self.printer(f"[compare] {message}")

    # ------------------------------------------------------------------ planning
    def base_config(self) -> dict[str, Any]:
        from defectseg.config import merge_config, read_yaml_config

        if not self.settings.base:
            raise GridError("give a base config with --base CONFIG.yaml (data, model and trainer settings)")
        config: dict[str, Any] = {}
        for path in self.settings.base:
            try:
                config = merge_config(config, read_yaml_config(path))
            except (FileNotFoundError, ValueError) as err:
                raise GridError(str(err)) from None
        return config

    def plan(self) -> list[PlannedRun]:
        """Every run with its merged config and folder (nothing is written)."""
        if self._plan is None:
            s = self.settings
            base = self.base_config()
            planned = []
            for spec in s.grid.runs(s.mode, s.seeds, s.only):
                run_dir = self.out / "runs" / spec.config / f"seed_{spec.seed}"
                experiment = experiment_config(base, s.grid, s.mode, spec, s.overrides)
                experiment["seed_everything"] = spec.seed
                if s.devices_per_run is not None and _trains_on_gpu(experiment):
                    experiment.setdefault("trainer", {})["devices"] = s.devices_per_run
                wandb = self.wandb_run(spec) if s.logger == "wandb" else None
                planned.append(
                    PlannedRun(
                        spec, run_dir, harness_config(experiment, run_dir, spec.seed, wandb), config_hash(experiment)
                    )
                )
            self._plan = planned
        return self._plan

    def device_plan(self) -> DevicePlan:
        """How this invocation's local runs share the machine's GPUs or cores (see
        :mod:`defectseg.experiments.devices`)."""
        if self._devices is None:
            s = self.settings
            gpus = list(s.gpus) if s.gpus is not None else visible_gpus()
            gpu_runs = [run.config for run in self.plan() if _trains_on_gpu(run.config)]
            per_run = s.devices_per_run
            if per_run is None and gpus and gpu_runs:  # without --devices-per-run: what the configs ask
                per_run = max(configured_devices(config, len(gpus)) for config in gpu_runs)
            self._devices = plan_devices(
                s.jobs, gpus, per_run, on_gpu=bool(gpu_runs),
                source="--devices-per-run" if s.devices_per_run is not None else "trainer.devices",
            )
        return self._devices

    def wandb_group(self) -> str:
        """The W&B group of the grid's runs: ``<grid name>/<output folder name>``."""
        return f"{self.settings.grid.name}/{self.out.name}"

    def wandb_run(self, spec: RunSpec) -> dict[str, Any]:
        """WandbLogger settings of one run: the grid's group, the configuration as job type, the
        run key as name and an id stable across resumes (from the output folder and the key)."""
        run_id = hashlib.sha256(f"{self.out}/{spec.key}".encode()).hexdigest()[:16]
        return {
            "group": self.wandb_group(),
            "job_type": spec.config,
            "name": spec.key,
            "id": run_id,
            "tags": [self.settings.grid.name, self.settings.mode],
        }

    def notes(self) -> list[str]:
        """Lines worth saying before the grid runs: a mode the grid has no fragment for, a cpu
        mode whose base is not a CPU recipe, where the W&B runs go."""
        notes = []
        plan = self.plan()
        grid = self.settings.grid
        if self.settings.mode not in grid.defined_modes:
            notes.append(
                f"grid {grid.source!r} has no `{self.settings.mode}:` fragment: the runs take the base config's "
                "settings as they are"
            )
        if self.settings.mode == "cpu" and plan:
            accelerator = (plan[0].config.get("trainer") or {}).get("accelerator", "auto")
            if accelerator != "cpu":
                notes.append(
                    f"cpu mode, but the merged config has trainer.accelerator {accelerator!r}: cpu mode expects "
                    "a CPU training recipe as --base (configs/magnetic_tile_cpu.yaml, configs/neu_seg_cpu.yaml), "
                    "not the full-mode bases of configs/compare/"
                )
        if self.executor is None and plan:
            devices = self.device_plan()
            notes.extend(devices.notes)
            if devices.uses_gpus:
                notes.append(
                    "GPUs per run: " + "; ".join(f"slot {i}: CUDA_VISIBLE_DEVICES={','.join(g)}" for i, g in enumerate(devices.slots))
                )
        if self.settings.logger == "wandb":
            mode = os.environ.get("WANDB_MODE", "offline")
            notes.append(
                f"W&B ({mode}): group {self.wandb_group()!r}, job type = configuration; each run's W&B folder is "
                "runs/<configuration>/seed_<n>/wandb/"
                + (" (upload with `wandb sync <that folder>/offline-run-*`)" if mode in ("offline", "dryrun") else "")
            )
        return notes

    def comparisons(self) -> list[tuple[str, str]]:
        """``(configuration, baseline)`` pairs of the paired table, among the planned configurations."""
        configs = list(dict.fromkeys(run.spec.config for run in self.plan()))
        return self.settings.grid.comparisons(configs, self.settings.baseline)

    def check_out_dir(self) -> None:
        """Refuse an existing, non-empty output folder that ``defectseg compare`` did not make,
        and run folders made from another config."""
        if self.out.exists() and not self.out.is_dir():
            raise GridError(f"--out {str(self.out)!r} is a file; give a folder")
        if (
            self.out.is_dir()
            and any(p.name != ".compare.lock" for p in self.out.iterdir())
            and not (self.out / PLAN_FILE).is_file()
        ):
            raise GridError(
                f"--out {str(self.out)!r} is not empty and holds no {PLAN_FILE}: it is not a defectseg "
                "compare folder; give a new or empty folder (nothing in it is overwritten)"
            )
        conflicts = []
        for run in self.plan():
            state = _read_json(run.run_dir / STATE_FILE)
            if state.get("config_hash") and state["config_hash"] != run.config_hash:
                conflicts.append(str(run.run_dir))
        if conflicts:
            raise RunConflictError(
                f"{len(conflicts)} run folders were made from a different config (changed grid, base, mode "
                f"or overrides), e.g. {conflicts[0]}; use another --out, or delete those folders to redo them"
            )

    def validate(self) -> None:
        """Check each configuration's config with the ``defectseg fit`` parser (first seed)."""
        import tempfile

        seen = set()
        errors = []
        with tempfile.TemporaryDirectory(prefix="defectseg-compare-") as tmp:
            for run in self.plan():
                if run.spec.config in seen or run.finished:
                    continue
                seen.add(run.spec.config)
                path = Path(tmp) / f"{run.spec.config}.yaml"
                path.write_text(yaml.safe_dump(run.config, sort_keys=False))
                error = validate_config(path)
                if error:
                    errors.append(f"configuration {run.spec.config!r}: {error}")
        if errors:
            raise GridError(
                "the merged configs do not parse (fix the grid's fragments, the base or the overrides):\n"
                + "\n".join(errors)
            )

    # ------------------------------------------------------------------ running
    def run_env(self, slot: int | None = 0) -> dict[str, str]:
        """The environment of a run's worker: this one's, with ``WANDB_MODE`` offline unless
        set, and for ``slot`` (a local run) its GPUs (``CUDA_VISIBLE_DEVICES``) or its share of
        the cores (``OMP_NUM_THREADS``). ``slot=None`` (a cluster job): the devices are the
        scheduler's."""
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.setdefault("WANDB_MODE", "offline")
        if slot is not None:
            env = self.device_plan().env(slot, env)
        return env

    def run_one(self, run: PlannedRun, env: dict[str, str] | None = None) -> dict[str, Any]:
        """Fit (resuming from ``last.ckpt``) and test one run in a worker subprocess; its results.

        The worker (:mod:`defectseg.experiments.worker`) runs ``defectseg fit`` then
        ``defectseg test`` in one interpreter, with the commands stored in ``run.json``.

        Args:
            run: the run.
            env: the worker's environment (default: :meth:`run_env` of the first slot).

        Raises:
            RunFailedError: the fit or the test failed.
        """
        run.run_dir.mkdir(parents=True, exist_ok=True)
        state_path = run.run_dir / STATE_FILE
        config_path = run.run_dir / CONFIG_FILE
        checkpoints = run.run_dir / "checkpoints"
        state = _read_json(state_path) or {
            "config": run.spec.config,
            "seed": run.spec.seed,
            "config_hash": run.config_hash,
            "fit_done": False,
            "fit_attempts": 0,
            "fit_time_s": 0.0,
            "test_time_s": 0.0,
            "commands": [],
        }
        config_path.write_text(
            f"# defectseg compare run {run.spec.key} of grid {self.settings.grid.name!r} "
            f"({self.settings.mode} mode); reproduce with:\n#   defectseg fit --config {config_path}\n"
            + yaml.safe_dump(run.config, sort_keys=False)
        )
        if not state["fit_done"]:
            fit = ["fit", "--config", str(config_path)]
            last = checkpoints / "last.ckpt"
            if last.is_file():
                if checkpoint_loads(last):
                    fit += ["--ckpt_path", str(last)]
                    self.log(f"  {run.spec.key}: resuming the fit from {last}")
                else:
                    broken = last.with_name("last.ckpt.broken")
                    os.replace(last, broken)
                    self.log(f"  {run.spec.key}: {last} is unreadable (moved to {broken.name}); the fit starts over")
            state["fit_attempts"] += 1
            if state["fit_attempts"] > 1:  # keep the earlier attempts' logs
                fit += ["--trainer.logger.init_args.version", f"fit_{state['fit_attempts']}"]
            state["fit_command"] = fit
            state["commands"].append(["defectseg", *fit])
        state["test_command"] = ["test", "--config", str(config_path), "--trainer.logger.init_args.version", "test"]
        state["test_checkpoint"] = self.test_checkpoint_kind()
        state["checkpoint_dir"] = str(checkpoints)
        test_logs = run.run_dir / "logs" / "test"
        if test_logs.is_dir():
            for path in test_logs.iterdir():  # an earlier, failed test of this run
                if path.is_file():
                    path.unlink()
        _write_json(state_path, state)
        command = [self.settings.python, "-m", "defectseg.experiments.worker", str(run.run_dir)]
        start = time.perf_counter()
        result: int | LaunchResult = 1
        try:
            result = self.launcher(command, run.run_dir / "run.log", self.run_env() if env is None else env)
        finally:
            launched = result if isinstance(result, LaunchResult) else LaunchResult(int(result))
            state = _read_json(state_path) or state
            state["wall_time_s"] = state.get("wall_time_s", 0.0) + time.perf_counter() - start
            if launched.cpu_time_s is not None:
                state["cpu_time_s"] = state.get("cpu_time_s", 0.0) + launched.cpu_time_s
            _write_json(state_path, state)
        code = launched.code
        if code != 0:
            raise RunFailedError(self._failure(state.get("failed_stage", "fit"), run, code))
        metrics = read_metrics_csv(test_logs / "metrics.csv")
        metrics = {k: v for k, v in metrics.items() if k.startswith("test/")}
        if not metrics:
            raise RunFailedError(f"run {run.spec.key}: the test logged no test/ metric in {test_logs / 'metrics.csv'}")
        metrics.update(fit_summary(run.run_dir))
        results = {
            "grid": self.settings.grid.name,
            "mode": self.settings.mode,
            "config": run.spec.config,
            "seed": run.spec.seed,
            "metrics": metrics,
            "wall_time_s": state["wall_time_s"],
            "cpu_time_s": state.get("cpu_time_s", 0.0),
            "fit_time_s": state.get("fit_time_s", 0.0),
            "test_time_s": state.get("test_time_s", 0.0),
            "checkpoint": state.get("tested_checkpoint"),
            "config_hash": run.config_hash,
            "finished": dt.datetime.now().isoformat(timespec="seconds"),
        }
        _write_json(run.run_dir / RESULTS_FILE, results)
        return results

    def _log_start(
        self, number: int, total: int, run: PlannedRun, clock: float, durations: Sequence[float], running: int
    ) -> None:
        elapsed = time.perf_counter() - clock
        eta = ""
        if durations:
            left = (total - number + 1 + running) * (sum(durations) / len(durations)) / max(1, self.device_plan().jobs)
            eta = f", about {_format_seconds(left)} left"
        self.log(
            f"run {number}/{total}: {run.spec.config} seed {run.spec.seed} "
            f"({total - number} after this; elapsed {_format_seconds(elapsed)}{eta})"
        )

    def _log_done(self, run: PlannedRun, results: dict[str, Any]) -> None:
        m = results["metrics"]
        shown = ", ".join(
            f"{k} {m[k]:.4f}" for k in ("test/miou_defect", "test/global_defect_iou", "test/iou_imagewise") if k in m
        )
        prefix = f"{run.spec.key} " if self.settings.jobs > 1 or self.executor is not None else ""
        self.log(f"  {prefix}done in {results['wall_time_s']:.0f} s: {shown}")

    def _log_failure(self, run: PlannedRun, err: Exception, failed: list[tuple[str, str]]) -> None:
        failed.append((run.spec.key, str(err)))
        self.log(f"  FAILED: {err}")

    def _execute_parallel(
        self, todo: list[PlannedRun], clock: float, failed: list[tuple[str, str]], durations: list[float]
    ) -> None:
        """Run ``todo`` with ``jobs`` runs at a time (each a worker subprocess, waited for in a thread)."""
        from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

        jobs = self.device_plan().jobs
        queue = list(enumerate(todo, start=1))
        free_slots = list(range(jobs))
        running: dict[Any, tuple[PlannedRun, float, int]] = {}
        first_error: RunFailedError | None = None
        pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="defectseg-compare")
        try:
            while queue or running:
                while queue and free_slots and first_error is None:
                    number, run = queue.pop(0)
                    slot = free_slots.pop(0)
                    self._log_start(number, len(todo), run, clock, durations, running=len(running))
                    future = pool.submit(self.run_one, run, self.run_env(slot))
                    running[future] = (run, time.perf_counter(), slot)
                if not running:
                    break
                done, _ = wait(list(running), return_when=FIRST_COMPLETED)
                for future in done:
                    run, run_start, slot = running.pop(future)
                    free_slots.append(slot)
                    try:
                        results = future.result()
                    except RunFailedError as err:
                        self._log_failure(run, err, failed)
                        if self.settings.fail_fast and first_error is None:
                            first_error = err
                            queue.clear()
                        continue
                    durations.append(time.perf_counter() - run_start)
                    self._log_done(run, results)
            if first_error is not None:
                raise first_error
        except KeyboardInterrupt:
            # the runs got the terminal's SIGINT too: give them time to write last.ckpt (their
            # threads reap them, so wait on the futures rather than on the processes)
            with _ACTIVE_LOCK:
                active = list(_ACTIVE)
            _stop_gently(active, lambda timeout: not wait(list(running), timeout=timeout)[1])
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _failure(self, stage: str, run: PlannedRun, code: int) -> str:
        log = run.run_dir / "run.log"
        tail = ""
        with contextlib.suppress(OSError):
            tail = "\n".join(log.read_text().splitlines()[-15:])
        return f"run {run.spec.key}: `defectseg {stage}` exited with code {code}; see {log}\n{tail}"

    def test_checkpoint_kind(self) -> str:
        return self.settings.test_checkpoint or self.settings.grid.test_checkpoint[self.settings.mode]

    def _record_invocation(self, argv: Sequence[str] | None, started: dt.datetime, **extra: Any) -> None:
        path = self.out / PLAN_FILE
        data = _read_json(path)
        s = self.settings
        data.update(
            {
                "grid": s.grid.name,
                "grid_file": s.grid.source,
                "description": s.grid.description,
                "mode": s.mode,
                "base": list(s.base),
                "overrides": list(s.overrides),
                "seeds": s.grid.seed_list(s.mode, s.seeds),
                "test_checkpoint": self.test_checkpoint_kind(),
                "baseline": s.baseline if s.baseline is not None else s.grid.baseline,
                "comparisons": [list(pair) for pair in self.comparisons()],
                "logger": s.logger,
                "configurations": list(dict.fromkeys(r.spec.config for r in self.plan())),
                "runs": [r.spec.key for r in self.plan()],
            }
        )
        invocations = data.setdefault("invocations", [])
        if self._invocation is None:
            self._invocation = len(invocations)
        entry = {
            "command": list(argv) if argv is not None else None,
            "cwd": os.getcwd(),
            "started": started.isoformat(timespec="seconds"),
            "hardware": environment_info(),
            **extra,
        }
        if self._invocation < len(invocations):
            invocations[self._invocation] = entry
        else:
            invocations.append(entry)
        _write_json(path, data)

    def run(self, argv: Sequence[str] | None = None, validate: bool = True) -> dict[str, Any]:
        """Run every unfinished run, then write the CSV, summary and plots.

        Args:
            argv: the command line, recorded in ``compare.json``.
            validate: check the configs with the CLI parser before running.

        Returns:
            ``{"executed": n, "skipped": n, "failed": [(key, message)], "wall_time_s": s}``.
        """
        plan = self.plan()
        self.check_out_dir()
        todo = [run for run in plan if not run.finished]
        configs = len(dict.fromkeys(r.spec.config for r in plan))
        seeds = self.settings.grid.seed_list(self.settings.mode, self.settings.seeds)
        self.log(
            f"grid {self.settings.grid.name!r} ({self.settings.mode} mode): {configs} configurations x "
            f"{len(seeds)} seeds = {len(plan)} runs; {len(plan) - len(todo)} finished earlier, "
            f"{len(todo)} to run -> {self.out}"
        )
        for note in self.notes():
            self.log(note)
        if todo and validate:
            self.validate()
        self.out.mkdir(parents=True, exist_ok=True)
        with self._exclusive():
            return self._run(plan, argv)

    @contextlib.contextmanager
    def _exclusive(self):
        """Hold ``OUT/.compare.lock`` so two invocations never run the same grid folder at once."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: no lock
            yield
            return
        with (self.out / ".compare.lock").open("a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.seek(0)
                owner = handle.read().strip() or "another process"
                raise GridError(
                    f"another defectseg compare ({owner}) is running in {self.out}; wait for it or stop it"
                ) from None
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()} on {platform.node()}")
            handle.flush()
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _run(self, plan: list[PlannedRun], argv: Sequence[str] | None) -> dict[str, Any]:
        from defectseg.experiments.plots import write_reports

        started = dt.datetime.now()
        clock = time.perf_counter()
        self._record_invocation(argv, started, status="running")
        todo = [run for run in plan if not run.finished]  # again, now that the folder is ours
        failed: list[tuple[str, str]] = []
        durations: list[float] = []
        status = "finished"
        try:
            if self.executor is not None:
                self.executor.execute(self, todo, failed, durations)
            elif self.device_plan().jobs > 1:
                self._execute_parallel(todo, clock, failed, durations)
            else:
                for number, run in enumerate(todo, start=1):
                    self._log_start(number, len(todo), run, clock, durations, running=0)
                    run_start = time.perf_counter()
                    try:
                        results = self.run_one(run)
                    except RunFailedError as err:
                        self._log_failure(run, err, failed)
                        if self.settings.fail_fast:
                            raise
                        continue
                    durations.append(time.perf_counter() - run_start)
                    self._log_done(run, results)
        except KeyboardInterrupt:
            status = "interrupted"
            self.log("interrupted; run the same command again to resume (finished runs are kept)")
            raise
        except RunFailedError:
            status = "failed"
            raise
        finally:
            wall = time.perf_counter() - clock
            self._record_invocation(
                argv, started, status=status if not failed or status != "finished" else "finished with failures",
                finished=dt.datetime.now().isoformat(timespec="seconds"), wall_time_s=round(wall, 1),
                runs_executed=len(durations), runs_failed=[key for key, _ in failed], jobs=self.settings.jobs,
                executor=self.settings.executor,
            )
            if any(run.finished for run in plan):
                write_reports(self.out, plan, self.settings, _read_json(self.out / PLAN_FILE))
        self.log(
            f"{len(durations)} runs done, {len(plan) - len(todo)} skipped, {len(failed)} failed in "
            f"{_format_seconds(wall)}; results in {self.out / 'summary.md'}"
        )
        if failed:
            self.log("failed runs (run the same command again to retry them): " + ", ".join(k for k, _ in failed))
        return {"executed": len(durations), "skipped": len(plan) - len(todo), "failed": failed, "wall_time_s": wall}
