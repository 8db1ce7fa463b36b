"""Grid runs as cluster jobs: a SLURM job array through submitit (``defectseg compare --executor
slurm``), or submitit's local executor (``--executor submitit-local``: the same code path on one
machine, used by the tests).

Each run stays what it is locally: ``defectseg fit`` then ``defectseg test`` in its own folder,
driven by :meth:`CompareRunner.run_one <defectseg.experiments.runner.CompareRunner.run_one>`, now
inside a job. A job that SLURM pre-empts or that reaches its time limit gets submitit's signal
(``USR2``, ``signal_delay_s`` before the end); :meth:`RunJob.checkpoint` lets the fit write
``last.ckpt`` and requeues the job, which resumes the fit from it. The submitting command waits
for the jobs and writes ``runs.csv`` / ``summary.md`` as a local grid does; if it is stopped, the
jobs go on, and running the same command again waits for them (it does not submit a run whose
job is still queued or running), or ``--report-only`` collects what has finished.

``submitit`` is an optional dependency: ``pip install "defectseg[cluster]"``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import os
import re
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from defectseg.experiments.grid import GridError
from defectseg.experiments.runner import (
    _ACTIVE,
    _ACTIVE_LOCK,
    CompareRunner,
    CompareSettings,
    PlannedRun,
    RunFailedError,
    _exited,
    _stop_gently,
)

#: A run's record of the job that runs it (next to ``run.json``).
JOB_FILE = "job.json"
#: Folder (under the grid's output folder) of submitit's pickles and job logs.
SUBMITIT_FOLDER = "submitit"
#: SLURM states of a job that is still queued or running (``sacct``/``squeue`` spelling).
ACTIVE_STATES = frozenset(
    {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
     "RESIZING", "SUSPENDED", "SIGNALING", "STAGE_OUT"}
)
#: Environment variables hidden from a job's worker so that Lightning does not take the job for a
#: multi-task ``srun`` launch and launches its own processes for ``trainer.devices > 1``.
SLURM_TASK_VARIABLES = ("SLURM_NTASKS", "SLURM_NTASKS_PER_NODE", "SLURM_STEP_NUM_TASKS", "SLURM_TASKS_PER_NODE")
#: The worker ignores this signal (its name), which submitit sends to the whole job step: the job
#: process handles it and stops the worker gently.
IGNORE_SIGNAL_VARIABLE = "DEFECTSEG_WORKER_IGNORE_SIGNAL"


def _install_hint() -> str:
    return 'the cluster executors need submitit: pip install "defectseg[cluster]" (or pip install submitit)'


def import_submitit() -> Any:
    """``submitit``, or a :class:`GridError` that says how to install it."""
    try:
        import submitit
    except ImportError:
        raise GridError(_install_hint()) from None
    return submitit


def parse_time_minutes(value: Any) -> int:
    """A SLURM time limit in whole minutes: ``90``, ``"90"``, ``"1:30:00"``, ``"2-00:00:00"``.

    Raises:
        GridError: a value that is none of these, or not positive.
    """
    if isinstance(value, bool):
        raise GridError(f"slurm time must be minutes or [D-]HH:MM:SS, got {value!r}")
    if isinstance(value, (int, float)):
        minutes = math.ceil(value)
    else:
        text = str(value).strip()
        match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
        if not match:
            raise GridError(f"slurm time must be minutes (90) or [D-]HH:MM:SS (1:30:00, 2-00:00:00), got {value!r}")
        days, first, second, third = match.groups()
        if second is None and days is None:
            minutes = int(first)
        elif third is None and days is None:  # HH:MM as SLURM reads MM:SS: ask for the unambiguous form
            raise GridError(f"slurm time {text!r} is ambiguous (SLURM reads MM:SS); give minutes or HH:MM:SS")
        else:
            hours, mins, secs = int(first), int(second or 0), int(third or 0)
            minutes = int(days or 0) * 24 * 60 + hours * 60 + mins + math.ceil(secs / 60)
    if minutes < 1:
        raise GridError(f"slurm time must be at least one minute, got {value!r}")
    return int(minutes)


@dataclass
class ClusterSettings:
    """What each job of a grid asks the scheduler for (``slurm:`` in a grid file, or the
    ``--slurm-*`` / ``--sbatch`` options of ``defectseg compare``, which win).

    Attributes:
        partition: SLURM partition (``--partition``).
        time: time limit of one job, minutes or ``[D-]HH:MM:SS``; a run that needs longer is
            requeued and resumes from its ``last.ckpt`` (at most ``max_requeues`` times).
        gpus_per_job: GPUs of each job (default: ``devices_per_run``, else 1 for runs that train
            on a GPU and 0 for CPU runs).
        cpus_per_job: CPU cores of each job (``--cpus-per-task``; data-loader workers need them).
        mem_gb: memory of each job in GB.
        array_parallelism: jobs of the array running at once (default: the scheduler's limit).
        sbatch: more ``#SBATCH`` options, e.g. ``{account: lab, qos: high, constraint: a100}``.
        setup: shell lines run in the job before the run (``module load cuda``, ``source venv``).
        max_requeues: how many times a job may be requeued after a time-out or pre-emption.
        signal_delay_s: seconds before the end of the time limit at which the job is told to
            stop (it then saves ``last.ckpt`` and is requeued).
    """

    partition: str | None = None
    time: str | int | None = None
    gpus_per_job: int | None = None
    cpus_per_job: int | None = None
    mem_gb: float | None = None
    array_parallelism: int | None = None
    sbatch: dict[str, Any] = field(default_factory=dict)
    setup: list[str] = field(default_factory=list)
    max_requeues: int = 3
    signal_delay_s: int = 120

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None, source: str = "slurm") -> ClusterSettings:
        """Settings from a mapping (a grid's ``slurm:`` section), checked.

        Raises:
            GridError: unknown keys or values of the wrong kind.
        """
        data = dict(data or {})
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise GridError(f"{source}: unknown keys {unknown}; allowed keys: {known}")
        settings = cls(**data)
        settings.check(source)
        return settings

    def merged(self, overrides: Mapping[str, Any]) -> ClusterSettings:
        """These settings with the non-``None`` values of ``overrides`` (command-line options);
        ``sbatch`` options merge key by key and ``setup`` lines add up."""
        data = asdict(self)
        for key, value in overrides.items():
            if value is None:
                continue
            if key == "sbatch":
                data["sbatch"] = {**data["sbatch"], **dict(value)}
            elif key == "setup":
                data["setup"] = [*data["setup"], *value]
            else:
                data[key] = value
        merged = ClusterSettings(**data)
        merged.check("command line")
        return merged

    def check(self, source: str) -> None:
        if self.time is not None:
            parse_time_minutes(self.time)
        for name in ("gpus_per_job", "cpus_per_job", "array_parallelism", "max_requeues", "signal_delay_s"):
            value = getattr(self, name)
            minimum = 0 if name in ("gpus_per_job", "max_requeues", "signal_delay_s") else 1
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < minimum):
                raise GridError(f"{source}: {name} must be an integer >= {minimum}, got {value!r}")
        if self.mem_gb is not None and (not isinstance(self.mem_gb, (int, float)) or self.mem_gb <= 0):
            raise GridError(f"{source}: mem_gb must be a positive number, got {self.mem_gb!r}")
        if not isinstance(self.sbatch, Mapping):
            raise GridError(f"{source}: sbatch must map option names to values, e.g. {{account: lab}}, got {self.sbatch!r}")
        if isinstance(self.setup, str) or not isinstance(self.setup, Sequence):
            raise GridError(f"{source}: setup must be a list of shell lines, got {self.setup!r}")

    def slurm_parameters(self, gpus: int, job_name: str) -> dict[str, Any]:
        """``SlurmExecutor.update_parameters`` keywords (submitit's names)."""
        params: dict[str, Any] = {"job_name": job_name, "signal_delay_s": self.signal_delay_s}
        if self.partition:
            params["partition"] = self.partition
        if self.time is not None:
            params["time"] = parse_time_minutes(self.time)
        if gpus:
            params["gpus_per_node"] = gpus
        if self.cpus_per_job:
            params["cpus_per_task"] = self.cpus_per_job
        if self.mem_gb:
            params["mem"] = f"{int(math.ceil(self.mem_gb))}GB"
        if self.array_parallelism:
            params["array_parallelism"] = self.array_parallelism
        if self.setup:
            params["setup"] = list(self.setup)
        if self.sbatch:
            params["additional_parameters"] = {str(k).lstrip("-").replace("-", "_"): v for k, v in self.sbatch.items()}
        return params

    def local_parameters(self, gpus: int) -> dict[str, Any]:
        """``LocalExecutor.update_parameters`` keywords."""
        params: dict[str, Any] = {"signal_delay_s": self.signal_delay_s}
        params["timeout_min"] = parse_time_minutes(self.time) if self.time is not None else 24 * 60
        if gpus:
            params["gpus_per_node"] = gpus
        return params


def worker_env(env: Mapping[str, str], signal_name: str | None) -> dict[str, str]:
    """A job's worker environment: the scheduler's task variables hidden (Lightning launches its
    own processes), and the signal submitit sends to the job step ignored by the worker."""
    env = {k: v for k, v in env.items() if k not in SLURM_TASK_VARIABLES}
    if signal_name:
        env[IGNORE_SIGNAL_VARIABLE] = signal_name
    return env


class RunJob:
    """One grid run as a submitit job (picklable; submitit calls it on the node).

    Calling it runs the run as a local grid does (:meth:`CompareRunner.run_one`: the fit, resumed
    from ``last.ckpt`` when there is one, then the test) and returns its results. On a time-out
    or pre-emption, :meth:`checkpoint` stops the worker gently (it writes ``last.ckpt``) and
    returns the same job for submitit to requeue.
    """

    def __init__(self, settings: CompareSettings, run: PlannedRun) -> None:
        self.settings = settings
        self.run = run

    def __call__(self) -> dict[str, Any]:
        signal_name = None
        with contextlib.suppress(Exception):  # outside a submitit job: no signal to ignore
            signal_name = import_submitit().JobEnvironment._usr_sig().name
        runner = CompareRunner(self.settings)
        env = worker_env(runner.run_env(slot=None), signal_name)
        return runner.run_one(self.run, env)

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """Stop the worker (it writes ``last.ckpt``) and hand submitit the job to requeue."""
        with _ACTIVE_LOCK:
            active = list(_ACTIVE)
        if active:  # the worker ignores submitit's signal: SIGINT it, then wait for last.ckpt
            _stop_gently(active, lambda timeout: all(_exited(p, timeout) for p in active), grace=0.5)
        return import_submitit().helpers.DelayedSubmission(RunJob(self.settings, self.run))


class SubmititExecutor:
    """Runs a grid's unfinished runs as submitit jobs and waits for them.

    Args:
        kind: ``slurm`` (a SLURM job array) or ``submitit-local`` (local processes, at most
            ``settings.jobs`` at a time: for tests and for trying a cluster set-up).
        cluster: what each job asks for.
        poll_s: seconds between looks at the jobs' states.
    """

    def __init__(self, kind: str, cluster: ClusterSettings | None = None, poll_s: float = 5.0) -> None:
        if kind not in ("slurm", "submitit-local"):
            raise GridError(f"executor must be 'slurm' or 'submitit-local', got {kind!r}")
        self.kind = kind
        self.cluster = cluster or ClusterSettings()
        self.poll_s = poll_s
        import_submitit()  # fail early, with the install hint
        if kind == "slurm" and shutil.which("srun") is None:
            raise GridError(
                "--executor slurm needs SLURM (`srun` is not on the PATH): run the command on the cluster's "
                "login node, or try the set-up here with --executor submitit-local"
            )

    # ------------------------------------------------------------------ building
    def gpus_per_job(self, runner: CompareRunner, runs: Sequence[PlannedRun]) -> int:
        """``gpus_per_job``, else ``--devices-per-run``, else what the runs' ``trainer.devices``
        asks for (``auto``: one), else 0 for runs that train on the CPU."""
        from defectseg.experiments.runner import _trains_on_gpu, configured_devices

        if self.cluster.gpus_per_job is not None:
            return self.cluster.gpus_per_job
        gpu_runs = [run.config for run in runs if _trains_on_gpu(run.config)]
        if not gpu_runs:
            return 0
        return runner.settings.devices_per_run or max(configured_devices(config, 1) for config in gpu_runs)

    def make_executor(self, runner: CompareRunner, runs: Sequence[PlannedRun]) -> Any:
        """The submitit executor, its parameters set."""
        submitit = import_submitit()
        folder = runner.out / SUBMITIT_FOLDER / "%j"
        gpus = self.gpus_per_job(runner, runs)
        if self.kind == "slurm":
            executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=self.cluster.max_requeues)
            executor.update_parameters(**self.cluster.slurm_parameters(gpus, f"defectseg-{runner.settings.grid.name}"))
        else:
            executor = submitit.LocalExecutor(folder=folder, max_num_timeout=self.cluster.max_requeues)
            executor.update_parameters(**self.cluster.local_parameters(gpus))
        return executor

    # ------------------------------------------------------------------ job records
    @staticmethod
    def read_job(run: PlannedRun) -> dict[str, Any]:
        path = run.run_dir / JOB_FILE
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return {}

    def write_job(self, run: PlannedRun, job: Any) -> None:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        record = {
            "executor": self.kind,
            "job_id": str(job.job_id),
            "submitted": dt.datetime.now().isoformat(timespec="seconds"),
            "stdout": str(job.paths.stdout),
            "stderr": str(job.paths.stderr),
        }
        tmp = run.run_dir / f"{JOB_FILE}.tmp"
        tmp.write_text(json.dumps(record, indent=2))
        os.replace(tmp, run.run_dir / JOB_FILE)

    def job_state(self, runner: CompareRunner, job_id: str) -> str:
        """The scheduler's state of an earlier job (``UNKNOWN`` when it cannot say)."""
        if self.kind != "slurm":
            return "UNKNOWN"  # local jobs do not outlive the command that started them
        submitit = import_submitit()
        try:
            return str(submitit.SlurmJob(folder=runner.out / SUBMITIT_FOLDER / "%j", job_id=job_id).state).upper()
        except Exception:  # sacct unreachable: do not resubmit blindly
            return "UNKNOWN"

    def attach(self, runner: CompareRunner, job_id: str) -> Any:
        submitit = import_submitit()
        return submitit.SlurmJob(folder=runner.out / SUBMITIT_FOLDER / "%j", job_id=job_id)

    # ------------------------------------------------------------------ running
    def execute(
        self, runner: CompareRunner, todo: list[PlannedRun], failed: list[tuple[str, str]], durations: list[float]
    ) -> None:
        """Submit ``todo`` (or wait for the jobs that already run them), wait for every job,
        and record results and failures as a local grid does."""
        waiting: dict[str, tuple[PlannedRun, Any]] = {}
        to_submit: list[PlannedRun] = []
        for run in todo:
            record = self.read_job(run)
            job_id = record.get("job_id") if record.get("executor") == self.kind else None
            state = self.job_state(runner, job_id) if job_id else ""
            if job_id and state.split()[0] in ACTIVE_STATES:
                runner.log(f"  {run.spec.key}: job {job_id} is still {state.lower()}; waiting for it (not resubmitted)")
                waiting[run.spec.key] = (run, self.attach(runner, job_id))
            else:
                to_submit.append(run)
        executor = self.make_executor(runner, to_submit or todo)
        try:
            if self.kind == "slurm":
                self._submit(runner, executor, to_submit, waiting)
                self._wait(runner, waiting, failed, durations, len(todo))
            else:  # local processes: at most --jobs at a time
                queue = list(to_submit)
                while queue or waiting:
                    free = max(1, runner.settings.jobs) - len(waiting)
                    if queue and free > 0:
                        batch, queue = queue[:free], queue[free:]
                        self._submit(runner, executor, batch, waiting)
                    self._wait(runner, waiting, failed, durations, len(todo), until_one=bool(queue))
                    if runner.settings.fail_fast and failed:
                        raise RunFailedError(failed[0][1])
        except KeyboardInterrupt:
            if self.kind == "slurm":
                ids = sorted({str(job.job_id).split("_")[0] for _, job in waiting.values()})
                runner.log(
                    "stopped waiting; the SLURM jobs go on. Run the same command again to wait for them "
                    f"(running jobs are not resubmitted), or cancel them: scancel {' '.join(ids)}"
                )
            else:
                for _, job in waiting.values():
                    with contextlib.suppress(Exception):
                        job.cancel()
            raise
        if runner.settings.fail_fast and failed:
            raise RunFailedError(failed[0][1])

    def _submit(
        self, runner: CompareRunner, executor: Any, runs: list[PlannedRun], waiting: dict[str, tuple[PlannedRun, Any]]
    ) -> None:
        if not runs:
            return
        jobs = executor.submit_array([RunJob(runner.settings, run) for run in runs])
        for run, job in zip(runs, jobs):
            self.write_job(run, job)
            waiting[run.spec.key] = (run, job)
        first = str(jobs[0].job_id)
        what = f"SLURM job array {first.split('_')[0]}" if self.kind == "slurm" else f"local jobs {', '.join(str(j.job_id) for j in jobs)}"
        runner.log(f"submitted {len(runs)} run(s) as {what} (logs in {runner.out / SUBMITIT_FOLDER})")

    def _wait(
        self,
        runner: CompareRunner,
        waiting: dict[str, tuple[PlannedRun, Any]],
        failed: list[tuple[str, str]],
        durations: list[float],
        total: int,
        until_one: bool = False,
    ) -> None:
        """Wait for the jobs in ``waiting`` (for all, or with ``until_one`` for the next to end)."""
        while waiting:
            ended = [key for key, (_, job) in waiting.items() if job.done()]
            for key in ended:
                run, job = waiting.pop(key)
                self._collect(runner, run, job, failed, durations)
                runner.log(f"{len(durations) + len(failed)}/{total} runs ended ({len(failed)} failed)")
            if ended and until_one:
                return
            if waiting:
                time.sleep(self.poll_s)

    def _collect(
        self, runner: CompareRunner, run: PlannedRun, job: Any, failed: list[tuple[str, str]], durations: list[float]
    ) -> None:
        try:
            results = job.result()
        except Exception as error:  # the run failed, or the job died
            message = str(error).strip().splitlines()
            tail = "\n".join(message[-15:])
            runner._log_failure(
                run,
                RunFailedError(f"run {run.spec.key}: job {job.job_id} failed; see {run.run_dir / 'run.log'} and {job.paths.stderr}\n{tail}"),
                failed,
            )
            return
        durations.append(float(results.get("wall_time_s", 0.0)))
        runner._log_done(run, results)
