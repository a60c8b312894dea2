"""``python -m zoo`` / ``zoo``: LightningCLI (fit, validate, test, predict) plus ``list`` and ``bench``.

Each fit/validate/test/predict run gets its own run directory, ``runs/<config name>/<timestamp>``
(or ``--trainer.default_root_dir``), holding ``config.yaml``, ``metrics.csv``, ``checkpoints/`` and,
after fit, ``export/`` (an HF model or peft adapter with tokenizer).
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from pathlib import Path

from lightning.pytorch import Callback
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from zoo.errors import ZooError

EXTRA_COMMANDS = {
    "list": "Print the registered methods (name, kind, spec, config, paper).",
    "bench": "Train configs on one budget, evaluate them and the base model, write results.{jsonl,md,png}.",
}


class ZooCLI(LightningCLI):
    """LightningCLI with a run directory per run and the zoo's extra subcommands in ``--help``."""

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs) -> None:
        super()._add_subcommands(parser, **kwargs)
        for name, description in EXTRA_COMMANDS.items():
            sub = LightningArgumentParser(description=description)
            parser._subcommands_action.add_subcommand(name, sub, help=description)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.init_args.model", "data.init_args.tokenizer")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config["trainer"]
        if trainer.get("default_root_dir") is None:
            trainer["default_root_dir"] = run_directory(config.get("config") or [])
        if trainer.get("logger") in (None, True):
            from jsonargparse import Namespace

            trainer["logger"] = Namespace(
                class_path="lightning.pytorch.loggers.CSVLogger",
                init_args=Namespace(save_dir=trainer["default_root_dir"], name="", version=""),
            )


class FinalCheckpoint(Callback):
    """Save ``checkpoints/last.ckpt`` when fit ends, whatever the validation cadence was."""

    def on_train_end(self, trainer, pl_module) -> None:
        trainer.save_checkpoint(Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt")


class PredictionsWriter(BasePredictionWriter):
    """``zoo predict``: append each prompt and its completion to ``<run dir>/predictions.jsonl``."""

    def __init__(self) -> None:
        super().__init__(write_interval="batch")

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx,
                           dataloader_idx=0) -> None:
        path = Path(trainer.default_root_dir) / ("predictions.jsonl" if trainer.world_size == 1
                                                 else f"predictions.rank{trainer.global_rank}.jsonl")
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as handle:
            for prompt, completion in zip(batch.get("prompt_text", []), prediction):
                handle.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")


def run_directory(config_files: list) -> str:
    """``runs/<name>/<timestamp>``, shared by all ranks of one launch through ``ZOO_RUN_DIR``."""
    if os.environ.get("ZOO_RUN_DIR"):
        return os.environ["ZOO_RUN_DIR"]
    name = Path(str(config_files[0])).stem if config_files else "run"
    path = Path("runs") / name / time.strftime("%Y%m%d-%H%M%S")
    suffix = 0
    while path.exists():
        suffix += 1
        path = path.with_name(f"{time.strftime('%Y%m%d-%H%M%S')}-{suffix}")
    os.environ["ZOO_RUN_DIR"] = str(path)  # inherited by DDP child ranks launched from this process
    return str(path)


def lightning_main(args: list[str] | None = None, run: bool = True) -> ZooCLI:
    """Build the CLI from ``args``; ``run=False`` only instantiates (no subcommand; the harness drives fit)."""
    from zoo.datamodules import SFTDataModule  # noqa: F401  (registers the default classes)
    from zoo.modules import CausalLMModule

    if args is not None:  # in-process use (bench, tests): args and the host's sys.argv differ on purpose
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    return ZooCLI(
        model_class=CausalLMModule,
        datamodule_class=SFTDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        trainer_defaults={"callbacks": [FinalCheckpoint(), PredictionsWriter()]},
        parser_kwargs={"prog": "zoo", "parser_mode": "omegaconf"} if _has_omegaconf() else {"prog": "zoo"},
        args=args,
        run=run,
    )


def _has_omegaconf() -> bool:
    import importlib.util

    return importlib.util.find_spec("omegaconf") is not None


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
        preset_run_dir = os.environ.get("ZOO_RUN_DIR")  # set by a DDP launcher (child rank) or the user
        try:
            lightning_main(None if argv == sys.argv[1:] else argv)
        finally:
            if preset_run_dir is None:  # the next in-process run (bench, notebook) gets its own run dir
                os.environ.pop("ZOO_RUN_DIR", None)
        return 0
    except Exception as err:  # one clear line for what the user can fix; a traceback for bugs
        cause = _zoo_error_in_chain(err)  # jsonargparse wraps errors raised while instantiating classes
        if cause is None:
            raise
        print(f"zoo: error: {cause}", file=sys.stderr)
        return 1


def _zoo_error_in_chain(err: BaseException | None) -> ZooError | None:
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, ZooError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


if __name__ == "__main__":
    sys.exit(main())
