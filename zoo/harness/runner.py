"""Build a run from YAML configs: the zoo's ``LightningCLI`` with a run directory per run.

``zoo fit/validate/test/predict`` (:mod:`zoo.cli`), ``zoo bench`` and ``zoo.harness.step_cost`` all build
their trainer, module and data here, so a config means the same thing everywhere. Each run gets its own
directory, ``runs/<config name>/<timestamp>`` unless the caller passes ``run_dir`` (the bench does) or the
config sets ``trainer.default_root_dir``; it holds ``config.yaml``, ``metrics.csv``, ``checkpoints/`` and,
after fit, ``export/``.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path

from lightning.pytorch import Callback
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

#: Set by :func:`run_directory` for the DDP child ranks Lightning launches from the same ``zoo fit``
#: process (they re-run the command and must write into the same directory); read by nothing else.
RUN_DIR_ENV = "ZOO_RUN_DIR"


class ZooCLI(LightningCLI):
    """LightningCLI with a run directory per run and extra subcommands listed in ``--help``.

    Args:
        extra_commands: name -> description of subcommands the caller handles itself (``list``, ``bench``).
        run_dir: the run directory when the config does not set ``trainer.default_root_dir``.
    """

    def __init__(self, *args, extra_commands: dict[str, str] | None = None, run_dir: str | Path | None = None,
                 **kwargs) -> None:
        self.extra_commands = dict(extra_commands or {})
        self.run_dir = None if run_dir is None else str(run_dir)
        super().__init__(*args, **kwargs)

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs) -> None:
        super()._add_subcommands(parser, **kwargs)
        for name, description in self.extra_commands.items():
            sub = LightningArgumentParser(description=description)
            parser._subcommands_action.add_subcommand(name, sub, help=description)

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        """jsonargparse's errors as one :class:`~zoo.errors.UsageError` line (:mod:`zoo.harness.cli_errors`)
        instead of the usage text and a ``Union`` dump."""
        from jsonargparse import ArgumentError

        from zoo.harness.cli_errors import explain_parse_error, join_negative_values

        subcommands = getattr(parser, "_subcommands_action", None)
        for sub in [parser, *(getattr(subcommands, "_name_parser_map", None) or {}).values()]:
            sub.exit_on_error = False
        try:
            args = join_negative_values(list(args)) if isinstance(args, list) else args
            super().parse_arguments(parser, args)
        except ArgumentError as err:
            raise explain_parse_error(str(err), parser) from err

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.init_args.model", "data.init_args.tokenizer")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config["trainer"]
        if trainer.get("default_root_dir") is None:
            trainer["default_root_dir"] = self.run_dir or run_directory(config.get("config") or [])
        add_step_checkpoints(trainer)
        if trainer.get("logger") in (None, True):
            from jsonargparse import Namespace

            trainer["logger"] = Namespace(
                class_path="lightning.pytorch.loggers.CSVLogger",
                init_args=Namespace(save_dir=trainer["default_root_dir"], name="", version=""),
            )


#: the default checkpoint cadence (optimizer steps) when the config names no ModelCheckpoint
CHECKPOINT_EVERY_N_STEPS = 50


def add_step_checkpoints(trainer) -> None:
    """Give a trainer config without a ``ModelCheckpoint`` one that saves every ``CHECKPOINT_EVERY_N_STEPS``
    steps (the newest only) into ``<run dir>/checkpoints/``: a run preempted mid-epoch loses at most that
    many steps. A config's own ``ModelCheckpoint`` (its ``every_n_train_steps``) or
    ``trainer.enable_checkpointing: false`` replaces it."""
    from jsonargparse import Namespace

    if trainer.get("enable_checkpointing") is False or trainer.get("fast_dev_run"):
        return
    callbacks = list(trainer.get("callbacks") or [])
    if any(str(getattr(c, "class_path", type(c).__name__)).endswith("ModelCheckpoint") for c in callbacks):
        return
    cadence = Namespace(every_n_train_steps=CHECKPOINT_EVERY_N_STEPS, save_top_k=1)
    callbacks.append(Namespace(class_path="lightning.pytorch.callbacks.ModelCheckpoint", init_args=cadence))
    trainer["callbacks"] = callbacks


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
    if os.environ.get(RUN_DIR_ENV):
        return os.environ[RUN_DIR_ENV]
    name = Path(str(config_files[0])).stem if config_files else "run"
    path = Path("runs") / name / time.strftime("%Y%m%d-%H%M%S")
    suffix = 0
    while path.exists():
        suffix += 1
        path = path.with_name(f"{time.strftime('%Y%m%d-%H%M%S')}-{suffix}")
    os.environ[RUN_DIR_ENV] = str(path)  # inherited by DDP child ranks launched from this process
    return str(path)


def lightning_main(args: list[str] | None = None, run: bool = True, run_dir: str | Path | None = None,
                   extra_commands: dict[str, str] | None = None, callbacks: list | None = None) -> ZooCLI:
    """Build the CLI from ``args``; ``run=False`` only instantiates (no subcommand; the harness drives fit).

    ``run_dir`` is the run directory when the config sets no ``trainer.default_root_dir`` (default: a new
    ``runs/<config>/<timestamp>``); ``extra_commands`` are listed in ``--help`` (the top-level CLI's own);
    ``callbacks`` join every trainer (``zoo fit``'s run state, :mod:`zoo.harness.run_state`)."""
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
        trainer_defaults={"callbacks": [FinalCheckpoint(), PredictionsWriter(), *(callbacks or [])]},
        save_config_kwargs={"overwrite": True},  # a resume into its own run dir rewrites the same config
        parser_kwargs={"prog": "zoo", "parser_mode": "omegaconf"} if _has_omegaconf() else {"prog": "zoo"},
        args=args,
        run=run,
        run_dir=run_dir,
        extra_commands=extra_commands,
    )


def _has_omegaconf() -> bool:
    import importlib.util

    return importlib.util.find_spec("omegaconf") is not None
