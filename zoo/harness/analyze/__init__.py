"""``zoo analyze NAME ...``: analysis tools that compare models (a base and a tuned one) or probe one.

    python -m zoo analyze --help                                   # lists the tools
    python -m zoo analyze tuco --tuned runs/sft/20261201-120000 --out runs/analyze
    python -m zoo analyze tuco --base tiny-llama --tuned runs/lora/20261201-120000

Every tool prints a table, writes ``OUT/<name>.png`` (matplotlib) and ``OUT/<name>.json`` (its record).
Models are given as a zoo run directory, an export folder or a backbone alias (``tiny-llama``,
``smollm2-135m``, a hub id / HF folder): :func:`zoo.harness.analyze.common.load_pair`. With an
adapter/peft run as the tuned model and no ``--base``, the base is the same module inside
``adapter.disabled()`` (no second copy of the backbone).

Adding a tool
-------------
1. Write ``zoo/harness/analyze/<tool>.py`` (harness layer: it may import core, datamodules, modules) with

   ``HELP = "one line for --help"``
   ``def add_arguments(parser: argparse.ArgumentParser) -> None``  the tool's own options
   ``def run(args: argparse.Namespace) -> Report``  the work (``ConfigError`` for bad input)

   :class:`Report` (``zoo.harness.analyze.common``) holds ``table`` (text printed), ``record``
   (JSON-serialisable dict) and ``figure`` (a matplotlib Figure or None); :func:`main` prints and writes
   them, so tools never write outputs themselves. ``common.add_model_arguments(parser)`` adds the shared
   ``--base/--tuned/--device`` options and ``common.load_pair(args)`` turns them into modules.
2. Add ONE line to :data:`TOOLS` below: ``"name": ("zoo.harness.analyze.<tool>", "one-line help")``.
   The module is imported only when its tool runs (``--help`` imports nothing heavy).
3. Add a fast test on ``tiny-llama`` under ``tests/zoo/`` calling ``main(["name", ..., "--out", tmp])``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from zoo.errors import ConfigError, zoo_error_in_chain

__all__ = ["TOOLS", "build_parser", "main"]

#: tool name -> (module implementing HELP / add_arguments / run, one-line help shown by ``--help``).
TOOLS: dict[str, tuple[str, str]] = {
    "tuco": ("zoo.harness.analyze.tuco",
             "Tuning Contribution: per-layer pre-training/fine-tuning components, TuCo per prompt (spec 10)"),
    "conjugate": ("zoo.harness.analyze.conjugate",
                  "Conjugate prompting: a task under prompt transforms, base vs tuned gap (spec 17)."),
    "urial-shift": ("zoo.harness.analyze.urial_shift",
                    "Token distribution shift: rank of the tuned model's tokens under the base (spec 31)."),
    "rag": ("zoo.harness.rag.tool",
            "RAG evaluation: models in one frozen retrieval pipeline, paired CIs (spec 29)."),
    "checklist": ("zoo.harness.checklist",
                  "Alignment checklist: per-axis tasks, mean ± CI, paired deltas, contamination (spec 19)."),
}

DESCRIPTION = "Analysis tools. Each prints a table and writes OUT/<tool>.png and OUT/<tool>.json."


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zoo analyze", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="tools:\n" + "\n".join(f"  {name:<14} {text}"
                                                                   for name, (_, text) in TOOLS.items()))
    parser.add_argument("tool", choices=sorted(TOOLS), metavar="TOOL", help="one of: " + ", ".join(TOOLS))
    return parser


def tool_module(name: str):
    if name not in TOOLS:
        raise ConfigError(f"unknown analysis tool {name!r}; choose one of {', '.join(TOOLS)}")
    try:
        return importlib.import_module(TOOLS[name][0])
    except ModuleNotFoundError as err:
        if err.name != TOOLS[name][0]:
            raise
        raise ConfigError(f"analysis tool {name!r} is registered but {TOOLS[name][0]} is missing") from err


def main(argv: list[str] | None = None) -> int:
    """Run one tool: ``main(["tuco", "--tuned", RUN, "--out", DIR])``. Returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in TOOLS:
        parser = build_parser()
        if argv and argv[0] not in ("-h", "--help"):
            print(f"zoo analyze: error: unknown tool {argv[0]!r}; choose one of {', '.join(TOOLS)}",
                  file=sys.stderr)
            return 2
        parser.print_help()
        return 0 if argv else 2
    name = argv[0]
    try:
        from zoo.harness.analyze import common

        module = tool_module(name)
        parser = argparse.ArgumentParser(prog=f"zoo analyze {name}", description=module.HELP)
        parser.add_argument("--out", default="runs/analyze", help="output folder (default runs/analyze)")
        module.add_arguments(parser)
        args = parser.parse_args(argv[1:])
        report = module.run(args)
        common.write_report(name, report, args.out)
        return 0
    except Exception as err:  # one line for what the user can fix; a traceback for bugs
        cause = zoo_error_in_chain(err)
        if cause is None:
            raise
        print(f"zoo analyze: error: {cause}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
