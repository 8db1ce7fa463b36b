"""One grid run in its own process: ``defectseg fit`` then ``defectseg test``.

``python -m defectseg.experiments.worker RUN_DIR`` reads ``RUN_DIR/run.json`` (written by
:class:`~defectseg.experiments.runner.CompareRunner`), runs the fit command stored there unless
the fit is already done, then ``defectseg test`` on the chosen checkpoint, through the same
parser as the ``defectseg`` command (:class:`defectseg.config.DefectSegCLI`, with ``sys.argv``
set to that command line). Both stages share one interpreter, which saves a start-up of torch and
Lightning per run; each stage's exact command is recorded in ``run.json``, so either can be
rerun by hand. The state file is updated after each stage (``fit_done``, times,
``failed_stage``).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from defectseg.experiments.runner import (
    STATE_FILE,
    _read_json,
    _write_json,
    best_checkpoint,
)


def _defectseg(argv: list[str]) -> None:
    """Run ``defectseg <argv>`` (a Lightning subcommand) in this process; raise when it fails."""
    from defectseg.config import DefectSegCLI

    saved = sys.argv
    sys.argv = ["defectseg", *argv]
    try:
        DefectSegCLI(args=None)  # reads sys.argv, as from the console
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    finally:
        sys.argv = saved
    if code not in (0, None):
        raise SystemExit(code if isinstance(code, int) else 1)


def run(run_dir: Path) -> int:
    """Fit (unless done) and test the run in ``run_dir``; 0 on success."""
    state_path = run_dir / STATE_FILE
    state = _read_json(state_path)
    if not state.get("fit_command"):
        print(f"{state_path} holds no fit_command: not a defectseg compare run folder", file=sys.stderr)
        return 2
    stage = "fit"
    try:
        if not state.get("fit_done"):
            print(f"$ defectseg {' '.join(state['fit_command'])}", flush=True)
            start = time.perf_counter()
            try:
                _defectseg(list(state["fit_command"]))
            finally:
                state["fit_time_s"] = state.get("fit_time_s", 0.0) + time.perf_counter() - start
                _write_json(state_path, state)
            state["fit_done"] = True
            _write_json(state_path, state)
        stage = "test"
        checkpoints = Path(state["checkpoint_dir"])
        if state.get("test_checkpoint") == "last":
            ckpt = checkpoints / "last.ckpt"
            ckpt = ckpt if ckpt.is_file() else None
        else:
            ckpt = best_checkpoint(checkpoints)
        if ckpt is None:
            raise FileNotFoundError(f"the fit wrote no checkpoint in {checkpoints}")
        test_command = [*state["test_command"], "--ckpt_path", str(ckpt)]
        state["tested_checkpoint"] = str(ckpt)
        state.setdefault("commands", []).append(["defectseg", *test_command])
        _write_json(state_path, state)
        print(f"$ defectseg {' '.join(test_command)}", flush=True)
        start = time.perf_counter()
        try:
            _defectseg(test_command)
        finally:
            state["test_time_s"] = state.get("test_time_s", 0.0) + time.perf_counter() - start
            _write_json(state_path, state)
    except BaseException:
        state["failed_stage"] = stage
        _write_json(state_path, state)
        raise
    state.pop("failed_stage", None)
    _write_json(state_path, state)
    return 0


#: Lightning subcommands: a multi-process strategy (DDP) relaunches this module with the
#: command line of the stage being run, which is then passed straight to ``defectseg``.
_SUBCOMMANDS = ("fit", "validate", "test", "predict")


def _ignore_job_signal() -> None:
    """Ignore the signal a cluster job's step gets before its time limit (named by the job in
    ``DEFECTSEG_WORKER_IGNORE_SIGNAL``): the job process stops this worker gently itself."""
    name = os.environ.get("DEFECTSEG_WORKER_IGNORE_SIGNAL")
    number = getattr(signal, name, None) if name else None
    if isinstance(number, signal.Signals):
        signal.signal(number, signal.SIG_IGN)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _ignore_job_signal()
    if argv and argv[0] in _SUBCOMMANDS:
        from defectseg.config import DefectSegCLI

        DefectSegCLI(args=argv)
        return 0
    if len(argv) != 1:
        print("usage: python -m defectseg.experiments.worker RUN_DIR", file=sys.stderr)
        return 2
    return run(Path(argv[0]))


if __name__ == "__main__":  # pragma: no cover - run as a subprocess by the runner
    sys.exit(main())
