"""Which devices and threads each run of a grid gets on one machine.

On a machine with G visible GPUs, ``defectseg compare --jobs N --devices-per-run K`` gives every
run its own K GPUs through ``CUDA_VISIBLE_DEVICES`` and runs at most ``G // K`` of them at once;
on a CPU (or for runs whose config trains on the CPU) the cores are split between the runs
through ``OMP_NUM_THREADS``, as before.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from defectseg.experiments.grid import GridError


def visible_gpus(environ: Mapping[str, str] | None = None) -> list[str]:
    """The GPUs this process may hand out, as ``CUDA_VISIBLE_DEVICES`` entries.

    ``CUDA_VISIBLE_DEVICES`` when it is set (indices or UUIDs; empty or ``-1`` means none), else
    ``0 .. torch.cuda.device_count() - 1``.
    """
    environ = os.environ if environ is None else environ
    listed = environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        entries = [part.strip() for part in listed.split(",") if part.strip()]
        if entries and entries[0].startswith("-"):  # "-1": CUDA's spelling of "no device"
            return []
        return entries
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return []
    return [str(index) for index in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def cpu_cores() -> int:
    """Cores this process may use (its affinity where the OS says, else the CPU count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1  # pragma: no cover - macOS, Windows


@dataclass(frozen=True)
class DevicePlan:
    """How the runs of one invocation share the machine.

    Attributes:
        slots: one entry per run that may be running at once: the GPUs it gets (a list of
            ``CUDA_VISIBLE_DEVICES`` entries), or an empty list for a CPU run.
        threads: ``OMP_NUM_THREADS`` of each run (``None``: leave the environment's).
        notes: lines worth telling the user (a ``--jobs`` that was reduced, GPUs left idle).
    """

    slots: tuple[tuple[str, ...], ...]
    threads: int | None
    notes: tuple[str, ...] = ()

    @property
    def jobs(self) -> int:
        """Runs at the same time."""
        return len(self.slots)

    @property
    def uses_gpus(self) -> bool:
        return any(self.slots)

    def env(self, slot: int, base: Mapping[str, str]) -> dict[str, str]:
        """The environment of a run in ``slot`` (``CUDA_VISIBLE_DEVICES``, ``OMP_NUM_THREADS``)."""
        env = dict(base)
        if self.uses_gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(self.slots[slot])
        if self.threads is not None and "OMP_NUM_THREADS" not in base:
            env["OMP_NUM_THREADS"] = str(self.threads)
        return env


def plan_devices(
    jobs: int,
    gpus: Sequence[str],
    devices_per_run: int | None = None,
    cores: int | None = None,
    on_gpu: bool = True,
    source: str = "--devices-per-run",
) -> DevicePlan:
    """Split the machine between ``jobs`` runs.

    Args:
        jobs: runs the user asked to run at once (``--jobs``).
        gpus: the GPUs to hand out (:func:`visible_gpus`, or ``--gpus``).
        devices_per_run: GPUs per run (``--devices-per-run``; default 1).
        cores: CPU cores (default: :func:`cpu_cores`).
        on_gpu: whether the runs train on a GPU (``False`` for a config with
            ``trainer.accelerator: cpu``: the cores are split and no GPU is handed out).
        source: where ``devices_per_run`` came from, for messages (``--devices-per-run`` or
            the configs' ``trainer.devices``).

    Raises:
        GridError: ``jobs`` or ``devices_per_run`` below 1, or more GPUs per run than there are.
    """
    if jobs < 1:
        raise GridError(f"--jobs must be >= 1, got {jobs}")
    per_run = 1 if devices_per_run is None else devices_per_run
    if per_run < 1:
        raise GridError(f"{source} must be >= 1, got {devices_per_run}")
    cores = cpu_cores() if cores is None else cores
    notes: list[str] = []
    if not on_gpu or not gpus:
        if devices_per_run is not None and devices_per_run > 1 and on_gpu:
            raise GridError(
                f"{source} {devices_per_run} needs GPUs, but none is visible "
                "(CUDA_VISIBLE_DEVICES, torch.cuda.device_count()); drop the option to run on the CPU"
            )
        threads = max(1, cores // jobs) if jobs > 1 else None
        return DevicePlan(slots=tuple(() for _ in range(jobs)), threads=threads)
    if per_run > len(gpus):
        raise GridError(
            f"{source} {per_run} asks for more GPUs than are visible ({len(gpus)}: {','.join(gpus)})"
        )
    free = len(gpus) // per_run
    if jobs > free:
        notes.append(
            f"--jobs {jobs} reduced to {free}: {len(gpus)} GPUs ({','.join(gpus)}) hold {free} runs of "
            f"{per_run} GPU(s) at once"
        )
    count = min(jobs, free)
    slots = tuple(tuple(gpus[i * per_run:(i + 1) * per_run]) for i in range(count))
    idle = len(gpus) - count * per_run
    if idle:
        notes.append(f"{idle} of {len(gpus)} GPUs stay idle (raise --jobs to use them)")
    threads = max(1, cores // count) if count > 1 else None
    return DevicePlan(slots=slots, threads=threads, notes=tuple(notes))
