"""Run state and interruptions: ``run.json`` in every fit's run directory, and SIGTERM / SIGINT that stop a
fit at the next step boundary with a resumable checkpoint and a non-zero exit code.

``run.json`` holds ``{"state": "running" | "finished" | "failed" | "interrupted", ...}`` (with ``error`` for a
failed run, ``checkpoint`` and ``resume`` for an interrupted one), written atomically (write, then rename), so
``zoo bench --ckpt`` and users can tell a finished run from a dead one.

A signal during training only raises a flag (Lightning's own SIGTERM flag; SIGINT is routed to it): the step
in flight completes, :class:`RunState` saves ``checkpoints/interrupted.ckpt`` at that step's end (the same
point a step-cadence ``ModelCheckpoint`` saves, so the resume is bitwise), and Lightning stops the fit. A
signal outside training (loading, setup, export) raises :class:`Interrupted` at once.

Under several processes (DDP, FSDP) a signal may reach one rank only, or the ranks at different steps, and a
checkpoint save is a collective every rank must enter. So there the signal sets this process's flag only,
the ranks agree on it at every step's end (one all-reduce of a bit: stop if any rank was signalled), and then
every rank saves and stops at the same step. Lightning's own SIGTERM notifier is switched off for the fit
(where the zoo's handler is installed), since it broadcasts from inside the handler (a collective at
whatever point the signal lands) and stops the signalled rank alone (Lightning issue #20806). After an
agreed stop the other ranks exit 0 (rank 0 reports), so that a launcher watching its children does not kill
rank 0 before it has said how to resume.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback

RUN_FILE = "run.json"
INTERRUPTED_CKPT = "interrupted.ckpt"
_handlers_installed = False  # install_signal_handlers is in place (graceful or not): the zoo handles signals


class Interrupted(Exception):
    """The process got SIGTERM or SIGINT; ``exit_code`` is 128 + the signal number."""

    def __init__(self, signum: int, message: str = "") -> None:
        self.signum = int(signum)
        self.exit_code = 128 + self.signum
        name = signal.Signals(self.signum).name
        super().__init__(message or f"interrupted by {name}")


def write_run_state(run_dir: str | Path, state: str, **fields: Any) -> Path:
    """Write ``run_dir/run.json`` atomically (keeps the earlier fields, e.g. ``started``)."""
    path = Path(run_dir) / RUN_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    record = read_run_state(run_dir) or {}
    record.update(fields, state=state, updated=time.strftime("%Y-%m-%dT%H:%M:%S"))
    staging = path.with_name(f".{RUN_FILE}.{os.getpid()}.tmp")
    staging.write_text(json.dumps(record, indent=1, default=str) + "\n", encoding="utf-8")
    os.replace(staging, path)
    return path


def read_run_state(run_dir: str | Path) -> dict[str, Any] | None:
    """The run's ``run.json`` as a dict, or None (no file, or a run from before run states existed)."""
    path = Path(run_dir) / RUN_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def resume_command(run_dir: str | Path, checkpoint: str | Path) -> str:
    return f"python -m zoo fit --config {Path(run_dir) / 'config.yaml'} --ckpt_path {checkpoint}"


class RunState(Callback):
    """Records the fit's state in ``run.json``; on SIGTERM / SIGINT saves ``checkpoints/interrupted.ckpt``.

    Args:
        keep_checkpoints: keep ``checkpoints/`` after a fit that exported (default: removed, the export is the
            result; a run that fails or is interrupted always keeps them).
    """

    #: the RunState of the fit in progress in this process (the signal handler's target), or None
    active: RunState | None = None
    #: the RunState of the last fit that ended with an exception (the CLI reads its checkpoint and signal)
    last: RunState | None = None

    def __init__(self, keep_checkpoints: bool = False) -> None:
        self.keep_checkpoints = keep_checkpoints
        self.trainer = None
        self.signum: int | None = None
        self.saved: Path | None = None

    # ------------------------------------------------------------------ state
    def run_dir(self, trainer) -> Path:
        return Path(trainer.default_root_dir)

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        self.trainer, self.signum, self.saved = trainer, None, None
        RunState.active = self  # every rank: each process handles its own signals
        if trainer.world_size > 1 and _handlers_installed:
            # before Lightning registers its handlers (after setup): its notifier broadcasts from inside the
            # handler; ours, still chained after it, raises the flag the ranks agree on (the bench's handler:
            # Interrupted)
            trainer._signal_connector._sigterm_notifier_fn = lambda signum, frame: None
        if trainer.global_rank != 0:
            return
        write_run_state(self.run_dir(trainer), "running", pid=os.getpid(), command=" ".join(sys.argv),
                        started=time.strftime("%Y-%m-%dT%H:%M:%S"), error=None, checkpoint=None, resume=None,
                        signal=None, steps=None)

    def teardown(self, trainer, pl_module, stage: str) -> None:  # the success path only (after export)
        if stage != "fit":
            return
        RunState.active = None
        if trainer.global_rank != 0:
            return
        run_dir = self.run_dir(trainer)
        removed = []
        exported = (run_dir / "export").is_dir()
        if exported and not self.keep_checkpoints:
            for ckpt in sorted((run_dir / "checkpoints").glob("*.ckpt")):
                if ckpt.is_dir():  # a sharded (FSDP) checkpoint
                    shutil.rmtree(ckpt)
                else:
                    ckpt.unlink()
                removed.append(ckpt.name)
        write_run_state(run_dir, "finished", steps=int(trainer.global_step), exported=exported,
                        checkpoints_removed=removed)

    # ------------------------------------------------------------------ interruptions
    def request_stop(self, signum: int) -> None:
        """Called by the signal handler: stop at the end of the step in flight (Lightning's SIGTERM flag;
        under several processes this process's flag only, which the ranks agree on at the step's end)."""
        self.signum = int(signum)
        if self.trainer.world_size == 1:
            self.trainer._signal_connector.received_sigterm = True

    def stop_agreed(self, trainer) -> bool:
        """Whether to stop at this step's end: under several processes, whether any rank was signalled (every
        rank calls this at every step's end, so the all-reduce always has all of them)."""
        if trainer.world_size == 1:
            return trainer.received_sigterm
        stop = trainer.strategy.reduce_boolean_decision(self.signum is not None, all=False)
        if stop:
            self.signum = self.signum or int(signal.SIGTERM)
            trainer._signal_connector.received_sigterm = True  # every rank leaves the loop after this step
        return stop

    def save(self, trainer) -> Path:
        path = self.run_dir(trainer) / "checkpoints" / INTERRUPTED_CKPT
        trainer.save_checkpoint(path)
        self.saved = path
        return path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.trainer is trainer and self.saved is None and self.stop_agreed(trainer):
            self.save(trainer)  # the point a step-cadence ModelCheckpoint saves at: resumes bitwise

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        RunState.active = None
        RunState.last = self
        if trainer.global_rank != 0:
            return
        run_dir = self.run_dir(trainer)
        interrupted = trainer.received_sigterm or isinstance(exception, (KeyboardInterrupt, Interrupted))
        if not interrupted:
            error = f"{type(exception).__name__}: {exception}".splitlines()[0]
            write_run_state(run_dir, "failed", error=error)
            return
        if self.saved is None and self.trainer is trainer and trainer.world_size > 1:
            # a save is a collective, and an exception need not have reached the other ranks
            write_run_state(run_dir, "interrupted", signal=signal.Signals(self.signum or signal.SIGTERM).name,
                            steps=0, error="no checkpoint saved: interrupted outside a training step under "
                            f"{trainer.world_size} processes; the run starts again")
            return
        if self.saved is None and self.trainer is trainer:
            try:  # a signal that arrived after the step's end: the loop state is still the finished step's
                self.save(trainer)
            except Exception as err:  # noqa: BLE001 (the run is already going down; say what is missing)
                write_run_state(run_dir, "interrupted", error=f"no checkpoint saved: {err}")
                return
        signum = getattr(exception, "signum", None) or self.signum or int(signal.SIGTERM)
        self.signum = signum
        if self.saved is None:  # before the first step: nothing to resume, the run starts again
            write_run_state(run_dir, "interrupted", signal=signal.Signals(signum).name, steps=0)
            return
        write_run_state(run_dir, "interrupted", signal=signal.Signals(signum).name,
                        checkpoint=str(self.saved), steps=int(trainer.global_step),
                        resume=resume_command(run_dir, self.saved))


def install_signal_handlers(graceful: bool = True) -> dict[int, Any]:
    """SIGTERM / SIGINT: during a fit (``graceful``), stop at the next step boundary
    (:meth:`RunState.request_stop`); else raise :class:`Interrupted` (the bench: its finished records are
    already written). Returns the previous handlers (for :func:`restore_signal_handlers`)."""

    def handler(signum, frame) -> None:
        state = RunState.active
        if graceful and state is not None and state.trainer is not None:
            if state.signum is not None and signum == signal.SIGINT:  # a second Ctrl+C: stop now
                raise Interrupted(signum)
            state.request_stop(signum)
            return
        raise Interrupted(signum)

    global _handlers_installed
    _handlers_installed = True
    previous = {}
    for signum in (signal.SIGTERM, signal.SIGINT):
        try:
            previous[signum] = signal.signal(signum, handler)
        except ValueError:  # not the main thread: leave the handlers alone
            break
    return previous


def restore_signal_handlers(previous: dict[int, Any]) -> None:
    global _handlers_installed
    _handlers_installed = False
    for signum, handler in previous.items():
        signal.signal(signum, handler)
