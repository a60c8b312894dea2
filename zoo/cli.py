"""``python -m zoo`` / ``zoo``: LightningCLI (fit, validate, test, predict) plus ``list`` and ``bench``.

Each fit/validate/test/predict run gets its own run directory, ``runs/<config name>/<timestamp>``
(or ``--trainer.default_root_dir``), holding ``config.yaml``, ``metrics.csv``, ``checkpoints/`` and,
after fit, ``export/`` (an HF model or peft adapter with tokenizer).
"""

from __future__ import annotations

import os
import sys

from zoo.errors import zoo_error_in_chain
from zoo.harness import runner
from zoo.harness.runner import FinalCheckpoint, PredictionsWriter, ZooCLI, run_directory

__all__ = ["EXTRA_COMMANDS", "FinalCheckpoint", "PredictionsWriter", "ZooCLI", "lightning_main", "main",
           "run_directory"]

EXTRA_COMMANDS = {
    "list": "Print the registered methods (name, kind, spec, config, paper).",
    "bench": "Train configs on one budget, evaluate them and the base model, write results.{jsonl,md,png}.",
    "analyze": "Analysis tools (TuCo, conjugate prompting, ...) on base and tuned models; --help lists them.",
}


def lightning_main(args: list[str] | None = None, run: bool = True) -> ZooCLI:
    """Build the LightningCLI (:func:`zoo.harness.runner.lightning_main`) with ``list`` and ``bench`` in
    ``--help``."""
    return runner.lightning_main(args, run=run, extra_commands=EXTRA_COMMANDS)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
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
        try:
            lightning_main(None if argv == sys.argv[1:] else argv)
        finally:
            if preset_run_dir is None:  # the next in-process run (bench, notebook) gets its own run dir
                os.environ.pop(runner.RUN_DIR_ENV, None)
        return 0
    except Exception as err:  # one clear line for what the user can fix; a traceback for bugs
        cause = zoo_error_in_chain(err)  # jsonargparse wraps errors raised while instantiating classes
        if cause is None:
            raise
        print(f"zoo: error: {cause}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
