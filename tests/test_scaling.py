"""Beyond one process: GPUs per run on one node, grids as submitit jobs, DDP evaluation shards.

* the device plan of ``defectseg compare --jobs N --devices-per-run K`` (hand-worked cases) and
  the runner handing each run its own GPUs, with the device list faked (no GPU needed);
* the SLURM settings as they reach ``#SBATCH`` lines (a stand-in ``srun`` on the PATH), and the
  executor's bookkeeping with a fake scheduler (a queued job is waited for, not resubmitted);
* a grid through submitit's local executor, the same code path as SLURM: a run pre-empted
  mid-fit (the job's signal) is requeued and resumes from ``last.ckpt``, and a run killed outright
  resumes when the command is run again;
* DDP with ``use_distributed_sampler: false`` (as DLI needs): each rank validates its own share
  of the split, and the synced metrics equal a single-process validation.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import lightning as L
import pytest
import yaml
from helpers.trainer import trainer_config
from test_compare import FakeLauncher, fake_settings, run_compare, tiny_base, write_grid

from defectseg.data import SyntheticDefectsDataModule
from defectseg.data.streams import ShardSampler
from defectseg.experiments import CompareRunner, GridError
from defectseg.experiments.cluster import (
    ClusterSettings,
    SubmititExecutor,
    parse_time_minutes,
    worker_env,
)
from defectseg.experiments.devices import plan_devices, visible_gpus

TESTS = Path(__file__).resolve().parent


# ---------------------------------------------------------------------------- one node
def test_visible_gpus_reads_cuda_visible_devices():
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "0,2"}) == ["0", "2"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": " 3 , 1 "}) == ["3", "1"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "-1"}) == []
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "GPU-aa,GPU-bb"}) == ["GPU-aa", "GPU-bb"]


def test_device_plan_gives_each_run_its_own_gpus():
    # 4 GPUs, 2 per run: 2 slots; --jobs 4 is reduced to 2 and the user is told
    plan = plan_devices(jobs=4, gpus=["0", "1", "2", "3"], devices_per_run=2, cores=16)
    assert plan.slots == (("0", "1"), ("2", "3")) and plan.jobs == 2 and plan.threads == 8
    assert any("--jobs 4 reduced to 2" in note for note in plan.notes)
    env = plan.env(1, {"PATH": "/bin"})
    assert env["CUDA_VISIBLE_DEVICES"] == "2,3" and env["OMP_NUM_THREADS"] == "8"
    assert plan.env(0, {"OMP_NUM_THREADS": "3"})["OMP_NUM_THREADS"] == "3"  # the user's setting wins
    # 3 GPUs, one per run, 2 jobs: GPU "c" idle, said so
    plan = plan_devices(jobs=2, gpus=["a", "b", "c"], cores=2)
    assert plan.slots == (("a",), ("b",)) and plan.threads == 1
    assert any("1 of 3 GPUs stay idle" in note for note in plan.notes)
    # one job on a GPU machine: the first GPU, threads left alone
    plan = plan_devices(jobs=1, gpus=["0", "1"], cores=8)
    assert plan.slots == (("0",),) and plan.threads is None
    # CPU: today's thread split, no CUDA_VISIBLE_DEVICES
    plan = plan_devices(jobs=2, gpus=[], cores=16)
    assert plan.slots == ((), ()) and plan.threads == 8 and "CUDA_VISIBLE_DEVICES" not in plan.env(0, {})
    plan = plan_devices(jobs=2, gpus=["0"], cores=4, on_gpu=False)  # CPU runs on a GPU machine
    assert not plan.uses_gpus and plan.threads == 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"jobs": 1, "gpus": ["0", "1"], "devices_per_run": 3}, "more GPUs than are visible"),
        ({"jobs": 1, "gpus": [], "devices_per_run": 2}, "needs GPUs, but none is visible"),
        ({"jobs": 0, "gpus": []}, "--jobs must be >= 1"),
        ({"jobs": 1, "gpus": ["0"], "devices_per_run": 0}, "--devices-per-run must be >= 1"),
    ],
)
def test_device_plan_errors(kwargs, message):
    with pytest.raises(GridError, match=message):
        plan_devices(cores=4, **kwargs)


def test_runner_hands_each_run_its_own_gpus(tmp_path, monkeypatch):
    """4 faked GPUs, --jobs 4 --devices-per-run 2: two runs at a time, each on a GPU pair that no
    other running run holds, with trainer.devices 2 in its config."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    fake = FakeLauncher()
    lock = threading.Lock()
    held: list[str] = []
    seen: dict[str, str] = {}
    most = [0]

    def launcher(command, log_path, env):
        key = "/".join(Path(command[-1]).parts[-2:])
        gpus = env["CUDA_VISIBLE_DEVICES"]
        with lock:
            assert gpus not in held, f"{gpus} handed to two running runs"
            held.append(gpus)
            most[0] = max(most[0], len(held))
            seen[key] = gpus
        time.sleep(0.3)
        try:
            return fake(command, log_path, env)
        finally:
            with lock:
                held.remove(gpus)

    lines: list[str] = []
    settings = fake_settings(tmp_path, jobs=4, devices_per_run=2, gpus=["0", "1", "2", "3"])
    summary = CompareRunner(settings, launcher=launcher, printer=lines.append).run(validate=False)
    assert summary["executed"] == 4 and not summary["failed"]
    assert most[0] == 2 and set(seen.values()) == {"0,1", "2,3"}
    assert any("--jobs 4 reduced to 2" in line for line in lines)
    saved = yaml.safe_load((tmp_path / "out" / "runs" / "a" / "seed_0" / "config.yaml").read_text())
    assert saved["trainer"]["devices"] == 2


def test_without_devices_per_run_a_run_gets_the_gpus_its_config_asks_for(tmp_path):
    """trainer.devices 2 in the config, 4 faked GPUs, --jobs 2: each run sees 2 GPUs; `auto`
    takes them all (one run at a time); 3 asked of 2 is an error naming trainer.devices."""
    from defectseg.experiments.runner import configured_devices

    assert [configured_devices({"trainer": {"devices": d}}, 4) for d in (2, "2", [0, 3], "0,1,2", -1, "auto")] == [
        2, 2, 2, 3, 4, 4]
    assert configured_devices({}, 4) == 4  # Lightning's default is auto
    envs: list[str] = []
    fake = FakeLauncher()

    def launcher(command, log_path, env):
        envs.append(env["CUDA_VISIBLE_DEVICES"])
        return fake(command, log_path, env)

    settings = fake_settings(tmp_path, jobs=2, gpus=["0", "1", "2", "3"], overrides=["trainer.devices=2"])
    CompareRunner(settings, launcher=launcher, printer=lambda s: None).run(validate=False)
    assert sorted(set(envs)) == ["0,1", "2,3"] and len(envs) == 4
    (tmp_path / "auto").mkdir()
    (tmp_path / "three").mkdir()
    settings = fake_settings(tmp_path / "auto", jobs=2, gpus=["0", "1"])
    assert CompareRunner(settings, printer=lambda s: None).device_plan().slots == (("0", "1"),)
    settings = fake_settings(tmp_path / "three", gpus=["0", "1"], overrides=["trainer.devices=3"])
    with pytest.raises(GridError, match="trainer.devices 3 asks for more GPUs than are visible"):
        CompareRunner(settings, printer=lambda s: None).device_plan()


def test_cpu_runs_on_a_gpu_machine_split_the_cores_and_get_no_gpu(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    envs: list[dict] = []
    fake = FakeLauncher()

    def launcher(command, log_path, env):
        envs.append(env)
        return fake(command, log_path, env)

    settings = fake_settings(tmp_path, jobs=2, gpus=["0", "1"], overrides=["trainer.accelerator=cpu"])
    CompareRunner(settings, launcher=launcher, printer=lambda s: None).run(validate=False)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert len(envs) == 4
    assert all(e.get("OMP_NUM_THREADS") == str(max(1, cores // 2)) for e in envs)
    assert all(e.get("CUDA_VISIBLE_DEVICES") == os.environ.get("CUDA_VISIBLE_DEVICES") for e in envs)


# ---------------------------------------------------------------------------- SLURM settings
def test_slurm_time_limits():
    assert parse_time_minutes(90) == 90
    assert parse_time_minutes("45") == 45
    assert parse_time_minutes("1:30:00") == 90
    assert parse_time_minutes("0:10:30") == 11  # seconds round up
    assert parse_time_minutes("2-01:00:00") == 2 * 24 * 60 + 60
    for bad, message in (("1:30", "ambiguous"), ("soon", "minutes"), (0, "at least one minute")):
        with pytest.raises(GridError, match=message):
            parse_time_minutes(bad)


def test_cluster_settings_from_the_grid_and_the_command_line():
    grid = ClusterSettings.from_mapping(
        {"partition": "gpu", "time": "4:00:00", "cpus_per_job": 8, "sbatch": {"account": "lab"}, "setup": ["module load cuda"]}
    )
    merged = grid.merged({"time": "30", "sbatch": {"qos": "high"}, "setup": ["source venv/bin/activate"], "partition": None})
    assert merged.partition == "gpu" and merged.time == "30" and merged.cpus_per_job == 8
    assert merged.sbatch == {"account": "lab", "qos": "high"}
    assert merged.setup == ["module load cuda", "source venv/bin/activate"]
    with pytest.raises(GridError, match=r"unknown keys \['gpus'\]"):
        ClusterSettings.from_mapping({"gpus": 2})
    with pytest.raises(GridError, match="cpus_per_job must be an integer >= 1"):
        ClusterSettings.from_mapping({"cpus_per_job": 0})


def test_slurm_job_script_carries_the_settings(tmp_path, monkeypatch):
    """The sbatch script submitit would submit, with a stand-in `srun` on the PATH (submitit
    refuses to build a SLURM executor without one)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    grid_file = write_grid(tmp_path / "grid.yaml", {
        "name": "g", "configurations": {"a": {}},
        "slurm": {"partition": "gpu", "time": "1:30:00", "cpus_per_job": 8, "mem_gb": 32,
                  "sbatch": {"account": "lab"}, "setup": ["module load cuda"]},
    })
    from defectseg.experiments import Grid

    grid = Grid.from_yaml(grid_file)
    runner = CompareRunner(fake_settings(tmp_path, devices_per_run=2, executor="slurm"), printer=lambda s: None)
    executor = SubmititExecutor("slurm", ClusterSettings.from_mapping(grid.slurm).merged({"array_parallelism": 4}))
    submitit_executor = executor.make_executor(runner, runner.plan())
    script = submitit_executor._make_submission_file_text("python -m x", "uid")
    for line in ("--partition=gpu", "--time=90", "--gpus-per-node=2", "--cpus-per-task=8", "--mem=32GB",
                 "--account=lab", "--signal=USR2@120", "--job-name=defectseg-grid"):
        assert f"#SBATCH {line}\n" in script, line
    assert "module load cuda" in script
    assert submitit_executor.parameters["array_parallelism"] == 4  # the array line: --array=0-N%4


class FakeJob:
    def __init__(self, job_id: str, results: dict | None = None, error: str | None = None) -> None:
        self.job_id = job_id
        self.results = results
        self.error = error
        self.paths = type("P", (), {"stdout": Path(f"/logs/{job_id}.out"), "stderr": Path(f"/logs/{job_id}.err")})()

    def done(self) -> bool:
        return True

    def result(self):
        if self.error:
            raise RuntimeError(self.error)
        return self.results


def test_slurm_executor_needs_srun(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun here
    with pytest.raises(GridError, match="`srun` is not on the PATH.*--executor submitit-local"):
        SubmititExecutor("slurm")


def test_multinode_sbatch_example_matches_its_defectseg_command(monkeypatch, capsys):
    """configs/slurm/fit_multinode.sbatch: one task per GPU, nodes = num_nodes, tasks per node =
    devices, Lightning's requeue signal; its `defectseg fit` line parses."""
    from defectseg.config import DefectSegCLI

    text = (TESTS.parent / "configs" / "slurm" / "fit_multinode.sbatch").read_text()
    sbatch = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", text, flags=re.M))
    command = re.search(r"^srun (defectseg fit .*?)(?:\n(?!\s)|\Z)", text, flags=re.M | re.S).group(1)
    argv = command.replace("\\\n", " ").split()[1:]
    options = dict(zip(argv[1::2], argv[2::2]))
    assert sbatch["nodes"] == options["--trainer.num_nodes"] == "2"
    assert sbatch["ntasks-per-node"] == options["--trainer.devices"] == sbatch["gpus-per-node"] == "4"
    assert sbatch["signal"].startswith("SIGUSR1@") and "--requeue" in text  # Lightning's auto-requeue signal
    monkeypatch.chdir(TESTS.parent)
    with pytest.raises(SystemExit) as exit_:
        DefectSegCLI(args=[*argv, "--print_config"])
    assert exit_.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["num_nodes"] == 2 and printed["trainer"]["strategy"] == "ddp"


def test_slurm_executor_waits_for_queued_jobs_and_submits_the_rest(tmp_path, monkeypatch):
    """A fake scheduler: run a/seed_0 has a job that is still RUNNING from an earlier invocation
    (waited for, not resubmitted); the other three go out as one array; one of them fails."""
    settings = fake_settings(tmp_path, executor="slurm")
    runner = CompareRunner(settings, printer=lambda s: None)
    plan = runner.plan()
    executor = SubmititExecutor.__new__(SubmititExecutor)
    executor.kind, executor.cluster, executor.poll_s = "slurm", ClusterSettings(), 0.01
    plan[0].run_dir.mkdir(parents=True)
    (plan[0].run_dir / "job.json").write_text(json.dumps({"executor": "slurm", "job_id": "77_0"}))
    submitted: list[list[str]] = []

    class FakeSubmitit:
        def submit_array(self, jobs):
            submitted.append([job.run.spec.key for job in jobs])
            return [
                FakeJob(f"88_{i}", error="CUDA out of memory" if job.run.spec.key == "b/seed_1" else None,
                        results={"wall_time_s": 5.0, "metrics": {}})
                for i, job in enumerate(jobs)
            ]

    monkeypatch.setattr(SubmititExecutor, "make_executor", lambda self, runner, runs: FakeSubmitit())
    monkeypatch.setattr(SubmititExecutor, "job_state", lambda self, runner, job_id: {"77_0": "RUNNING"}.get(job_id, ""))
    monkeypatch.setattr(SubmititExecutor, "attach", lambda self, runner, job_id: FakeJob(job_id, results={"wall_time_s": 9.0, "metrics": {}}))
    failed: list = []
    durations: list = []
    executor.execute(runner, plan, failed, durations)
    assert submitted == [["a/seed_1", "b/seed_0", "b/seed_1"]]
    assert sorted(durations) == [5.0, 5.0, 9.0]
    assert [key for key, _ in failed] == ["b/seed_1"] and "CUDA out of memory" in failed[0][1]
    record = json.loads((plan[1].run_dir / "job.json").read_text())
    assert record["executor"] == "slurm" and record["job_id"] == "88_0"


def test_slurm_options_without_a_cluster_executor_are_refused(tmp_path, capsys):
    from defectseg.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["compare", "--base", "b.yaml", "--grid", "g.yaml", "--out", str(tmp_path / "out"),
              "--slurm-partition", "gpu", "--sbatch", "account=lab"])
    assert exit_.value.code == 2
    assert "--slurm-partition, --sbatch only apply to cluster jobs: add --executor slurm" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_worker_env_hides_the_task_variables_and_names_the_signal():
    env = worker_env({"SLURM_NTASKS": "1", "SLURM_JOB_ID": "5", "PATH": "/bin"}, "SIGUSR2")
    assert "SLURM_NTASKS" not in env and env["SLURM_JOB_ID"] == "5"
    assert env["DEFECTSEG_WORKER_IGNORE_SIGNAL"] == "SIGUSR2"


def test_cluster_executor_without_submitit_says_how_to_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_submitit(name, *args, **kwargs):
        if name == "submitit":
            raise ImportError("No module named 'submitit'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_submitit)
    with pytest.raises(GridError, match=r'pip install "defectseg\[cluster\]"'):
        SubmititExecutor("slurm")


# ---------------------------------------------------------------------------- submitit, local
class InterruptOnce(L.Callback):
    """At training step ``step`` of the first attempt (no ``marker`` file yet): ``preempt``
    sends the job process submitit's signal (as SLURM does before a time limit); ``kill``
    SIGKILLs the worker itself (a node that dies)."""

    def __init__(self, marker: str, step: int, how: str = "preempt") -> None:
        self.marker = Path(marker)
        self.step = step
        self.how = how

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step != self.step or self.marker.exists():
            return
        self.marker.write_text(str(os.getpid()))
        if self.how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        os.kill(os.getppid(), signal.SIGUSR2)  # the worker's parent is the job process
        time.sleep(30)  # the job stops this process (SIGINT) well before


@pytest.mark.slow
def test_submitit_local_grid_resumes_a_preempted_and_a_killed_run(tmp_path, monkeypatch, capsys):
    """Two runs as submitit jobs. Run `preempt` gets the job signal at step 4 (in epoch 2, after
    a validation wrote last.ckpt): its job stops the fit, is requeued and resumes in the same
    invocation. Run `kill` is SIGKILLed at step 4: that invocation reports it failed, and the
    same command run again resumes it from last.ckpt (written after epoch 1)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    base = tiny_base(tmp_path)  # 2 batches an epoch: made 3 batches x 3 epochs by the grid

    def callback(name: str, how: str) -> dict:
        return {"trainer": {"callbacks": [{"class_path": "test_scaling.InterruptOnce", "init_args": {
            "marker": str(tmp_path / f"{name}.marker"), "step": 4, "how": how}}]}}

    grid = write_grid(tmp_path / "grid.yaml", {
        "name": "cluster", "seeds": {"quick": 1}, "test_checkpoint": "last",
        "common": {"trainer": {"max_epochs": 3, "limit_train_batches": 3}},
        "configurations": {"preempt": callback("preempt", "preempt"), "kill": callback("kill", "kill")},
    })
    args = ["--base", str(base), "--grid", str(grid), "--out", "out", "--quick", "--executor", "submitit-local",
            "--jobs", "2"]
    code, stdout = run_compare(*args, capsys=capsys)
    out = tmp_path / "out"
    logs = "\n".join(p.read_text()[-2500:] for p in out.glob("runs/*/seed_*/run.log"))
    assert code == 1, stdout + logs
    assert (tmp_path / "preempt.marker").is_file() and (tmp_path / "kill.marker").is_file()
    assert "submitted" in stdout and "kill/seed_0" in stdout

    preempted = out / "runs" / "preempt" / "seed_0"
    assert (preempted / "results.json").is_file(), stdout + logs
    state = json.loads((preempted / "run.json").read_text())
    assert state["fit_attempts"] == 2
    resumed = state["commands"][1]
    assert resumed[resumed.index("--ckpt_path") + 1] == str(preempted / "checkpoints" / "last.ckpt")
    metrics = list(csv.DictReader((preempted / "logs" / "fit_2" / "metrics.csv").open()))
    assert min(int(r["step"]) for r in metrics) >= 3  # the second attempt continued, it did not start over
    assert json.loads((preempted / "job.json").read_text())["executor"] == "submitit-local"

    killed = out / "runs" / "kill" / "seed_0"
    assert not (killed / "results.json").exists()
    assert (killed / "checkpoints" / "last.ckpt").is_file()

    code, stdout = run_compare(*args, capsys=capsys)
    assert code == 0, stdout + "\n".join(p.read_text()[-2500:] for p in out.glob("runs/*/seed_*/run.log"))
    assert "1 finished earlier, 1 to run" in stdout
    state = json.loads((killed / "run.json").read_text())
    assert state["fit_attempts"] == 2 and (killed / "results.json").is_file()
    assert "--ckpt_path" in state["commands"][1]
    rows = list(csv.DictReader((out / "runs.csv").open()))
    assert sorted((r["config"], r["status"]) for r in rows) == [("kill", "finished"), ("preempt", "finished")]


# ---------------------------------------------------------------------------- DDP evaluation
def test_shard_sampler_splits_without_padding():
    shards = [list(ShardSampler(7, 3, rank)) for rank in range(3)]
    assert shards == [[0, 3, 6], [1, 4], [2, 5]]
    with pytest.raises(ValueError, match="rank 3 is not in 0..2"):
        ShardSampler(7, 3, 3)


class RecordValidationPaths(L.Callback):
    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        with open(os.path.join(self.out_dir, f"val_rank{trainer.global_rank}.txt"), "a") as handle:
            handle.write("\n".join(batch["path"]) + "\n")


@pytest.mark.slow
def test_ddp_with_dli_validates_each_image_once_across_ranks(tmp_path):
    """Two CPU processes (gloo) with DLI (use_distributed_sampler off): the ranks validate
    disjoint shares covering the split (an odd number of images: no padding), and the logged
    val/miou equals one process validating the same weights."""
    data = {"num_images": 28, "image_size": 32, "batch_size": 2, "val_fraction": 0.25, "test_fraction": 0.15,
            "class_weights": [0.4, 0.3, 0.2, 0.1]}
    val = SyntheticDefectsDataModule(**data).samples_of("val")
    assert len(val) % 2 == 1
    config = {
        "seed_everything": 0,
        "trainer": trainer_config(
            tmp_path, devices=2, strategy="ddp", use_distributed_sampler=False, limit_train_batches=2,
            num_sanity_val_steps=0,
            callbacks=[{"class_path": "test_scaling.RecordValidationPaths", "init_args": {"out_dir": str(tmp_path)}}],
        ),
        "checkpoint": {"dirpath": str(tmp_path / "ckpt")},
        "model": {"class_path": "defectseg.models.SegmentationModule",
                  "init_args": {"encoder_depth": 3, "decoder_channels": [8, 8, 8]}},
        "data": {"class_path": "defectseg.data.SyntheticDefectsDataModule", "init_args": {**data, "dli": True}},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "WANDB_MODE": "offline",
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "defectseg", "fit", "--config", str(path)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    shares = [(tmp_path / f"val_rank{rank}.txt").read_text().split() for rank in (0, 1)]
    assert not set(shares[0]) & set(shares[1])
    assert sorted(shares[0] + shares[1]) == sorted(s.image for s in val)
    assert abs(len(shares[0]) - len(shares[1])) == 1
    rows = list(csv.DictReader(next((tmp_path / "logs").rglob("metrics.csv")).open()))
    logged = [float(r["val/miou"]) for r in rows if r.get("val/miou")][-1]

    single = {**config, "trainer": trainer_config(tmp_path / "single", num_sanity_val_steps=0),
              "data": {"class_path": "defectseg.data.SyntheticDefectsDataModule", "init_args": data}}
    single_path = tmp_path / "single.yaml"
    single_path.write_text(yaml.safe_dump(single))
    result = subprocess.run(
        [sys.executable, "-m", "defectseg", "validate", "--config", str(single_path), "--ckpt_path",
         str(tmp_path / "ckpt" / "last.ckpt")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = list(csv.DictReader(next((tmp_path / "single" / "logs").rglob("metrics.csv")).open()))
    reference = [float(r["val/miou"]) for r in rows if r.get("val/miou")][-1]
    assert logged == pytest.approx(reference, abs=1e-6)
