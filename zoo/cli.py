"""``python -m zoo`` / ``zoo``: LightningCLI (fit, validate, test, predict) plus ``list`` and ``bench``.

Each fit/validate/test/predict run gets its own run directory, ``runs/<config name>/<timestamp>``
(or ``--trainer.default_root_dir``), holding ``config.yaml``, ``metrics.csv``, ``checkpoints/`` and,
after fit, ``export/`` (an HF model or peft adapter with tokenizer).
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import traceback
from pathlib import Path

from zoo.errors import UsageError, zoo_error_in_chain
from zoo.harness import runner
from zoo.harness.cli_errors import join_negative_values
from zoo.harness.run_state import (
    Interrupted,
    RunState,
    install_signal_handlers,
    read_run_state,
    restore_signal_handlers,
    resume_command,
    write_run_state,
)
from zoo.harness.runner import FinalCheckpoint, PredictionsWriter, ZooCLI, run_directory

__all__ = ["EXTRA_COMMANDS", "FinalCheckpoint", "PredictionsWriter", "ZooCLI", "lightning_main", "main",
           "run_directory"]

#: set (to 1) by ``--keep_checkpoints``: keep ``checkpoints/`` after a fit that exported
KEEP_CHECKPOINTS_ENV = "ZOO_KEEP_CHECKPOINTS"

EXTRA_COMMANDS = {
    "list": "Print the registered methods (name, kind, spec, config, paper).",
    "bench": "Train configs on one budget, evaluate them and the base model, write results.{jsonl,md,png}.",
    "analyze": "Analysis tools (TuCo, conjugate prompting, ...) on base and tuned models; --help lists them.",
}


def lightning_main(args: list[str] | None = None, run: bool = True) -> ZooCLI:
    """Build the LightningCLI (:func:`zoo.harness.runner.lightning_main`) with ``list`` and ``bench`` in
    ``--help``; a fit records its state in ``run.json`` and stops cleanly on SIGTERM / SIGINT
    (:class:`zoo.harness.run_state.RunState`)."""
    keep = os.environ.get(KEEP_CHECKPOINTS_ENV, "0") not in ("0", "", "false")
    return runner.lightning_main(args, run=run, extra_commands=EXTRA_COMMANDS,
                                 callbacks=[RunState(keep_checkpoints=keep)])


def _flag(argv: list[str], name: str) -> bool:
    """Remove ``name`` from ``argv``; True if it was there."""
    found = name in argv
    argv[:] = [token for token in argv if token != name]
    return found


def _one_line(err: BaseException) -> tuple[str, int] | None:
    """(message, exit code) for an error the user can fix, None for a bug (shown with its traceback)."""
    cause = zoo_error_in_chain(err)
    if cause is not None:
        return str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__, (
            2 if isinstance(cause, UsageError) else 1)
    try:
        from lightning.fabric.utilities.exceptions import MisconfigurationException
    except ImportError:  # pragma: no cover
        MisconfigurationException = ()  # noqa: N806
    frames = traceback.extract_tb(err.__traceback__)
    from_connector = bool(frames) and "trainer/connectors" in frames[-1].filename.replace(os.sep, "/")
    if isinstance(err, MisconfigurationException) or (isinstance(err, ValueError) and from_connector):
        text = " ".join(str(err).split())
        if any(s in text for s in ("not available", "can not run on your system", "No supported gpu")):
            text += "; set trainer.accelerator: cpu (or auto)"
        return f"trainer config: {text}", 1
    if isinstance(err, ValueError) and frames and "torch/optim/" in frames[-1].filename.replace(os.sep, "/"):
        return f"optimizer config: {err} (check model.init_args.lr and the optimizer arguments)", 1
    if isinstance(err, OSError) and err.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC,
                                                  errno.ENOTDIR, errno.EISDIR, errno.ENOENT):
        return (f"{err.strerror}: {err.filename or 'the run directory'}; check the path (a run writes under "
                "--trainer.default_root_dir, which must be a writable folder)"), 1
    return None


def _mark_failed(message: str) -> None:
    """A run folder created before the fit started (model, data or config error) records the failure."""
    run_dir = os.environ.get(runner.RUN_DIR_ENV)
    state = read_run_state(run_dir) if run_dir else None
    if run_dir and Path(run_dir).is_dir() and (state is None or state.get("state") == "running"):
        write_run_state(run_dir, "failed", error=message)


def _interrupted(signum: int) -> int:
    """Print how the interrupted fit resumes; the exit code 128 + signal."""
    name = signal.Signals(signum).name
    state = RunState.last
    if state is not None and state.trainer is not None and state.trainer.global_rank != 0:
        # rank 0 tells the user; after an agreed stop with a checkpoint this rank did its part: exit 0, or a
        # launcher watching its children (Lightning's) would kill rank 0 before it says how to resume
        return 0 if state.saved is not None else 128 + signum
    if state is not None and state.saved is not None:
        run_dir = state.saved.parent.parent
        print(f"zoo: interrupted by {name}; checkpoint saved, resume with:\n"
              f"{resume_command(run_dir, state.saved)}", file=sys.stderr)
    else:
        print(f"zoo: interrupted by {name} outside a training step, before any checkpoint of this fit; "
              "nothing to resume, run the command again", file=sys.stderr)
    return 128 + signum


def main(argv: list[str] | None = None) -> int:
    """``zoo COMMAND ...``: one line on stderr for what the user can fix (exit 1; 2 for a wrong command line),
    the traceback with ``--debug`` or ``ZOO_DEBUG=1``; 128 + the signal number after SIGTERM / SIGINT."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = _flag(argv, "--debug") or os.environ.get("ZOO_DEBUG", "0") not in ("0", "", "false")
    if _flag(argv, "--keep_checkpoints"):
        os.environ[KEEP_CHECKPOINTS_ENV] = "1"  # DDP child ranks inherit it
    try:
        if argv and argv[0] == "list":
            from zoo import registry

            if "--update-readme" in argv:
                registry.update_readme()
                print("README.md method table updated from the registry")
                return 0
            print(registry.markdown_table() if "--markdown" in argv else registry.text_table())
            return 0
        if argv and argv[0] == "bench":
            from zoo.harness.bench import main as bench_main

            return bench_main(argv[1:])
        if argv and argv[0] == "analyze":
            from zoo.harness.analyze import main as analyze_main

            return analyze_main(argv[1:])
        preset_run_dir = os.environ.get(runner.RUN_DIR_ENV)  # set by a DDP launcher (child rank) or the user
        previous = install_signal_handlers()
        RunState.last = None
        try:
            lightning_main(join_negative_values(argv))
        finally:
            restore_signal_handlers(previous)
            if preset_run_dir is None:  # the next in-process run (bench, notebook) gets its own run dir
                os.environ.pop(runner.RUN_DIR_ENV, None)
        return 0
    except Interrupted as err:
        if debug:
            raise
        return _interrupted(err.signum)
    except SystemExit as err:  # Lightning ends a fit stopped by SIGTERM with SystemExit(None): not a success
        if type(err).__name__ == "SIGTERMException" or (RunState.last is not None and RunState.last.signum):
            return _interrupted(RunState.last.signum if RunState.last and RunState.last.signum else
                                int(signal.SIGTERM))
        raise
    except Exception as err:  # one clear line for what the user can fix; a traceback for bugs
        explained = None if debug else _one_line(err)
        if explained is None:
            if not debug:
                _mark_failed(f"{type(err).__name__}: {err}".splitlines()[0])
            raise
        message, code = explained
        _mark_failed(message)
        print(f"zoo: error: {message}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
