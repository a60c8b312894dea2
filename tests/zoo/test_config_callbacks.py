"""Method configs add callbacks without copying the trainer block (``config: base/fit.yaml`` first, then
``trainer.callbacks+:``, jsonargparse's list append), and the result is the base block plus the callbacks."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from zoo.registry import REPO_ROOT

CONFIGS = REPO_ROOT / "configs"
BASE = yaml.safe_load((CONFIGS / "base" / "trainer.yaml").read_text())
TINY = ["--model.init_args.model", "tiny-llama", "--data.init_args.dataset", "chain_sum"]


def build(tmp_path: Path, *args: str):
    from zoo.harness.runner import lightning_main

    return lightning_main([*args, *TINY, "--trainer.default_root_dir", str(tmp_path / "run")], run=False)


def callback_names(trainer) -> list[str]:
    return [type(callback).__name__ for callback in trainer.callbacks]


def test_appended_callback_keeps_every_base_trainer_setting(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = build(tmp_path, "--config", str(CONFIGS / "masked_thought.yaml"))
    trainer = cli.trainer
    # the base block, read from configs/base/trainer.yaml with plain YAML
    assert (trainer.max_steps, trainer.val_check_interval, trainer.log_every_n_steps) == (
        BASE["max_steps"], BASE["val_check_interval"], BASE["log_every_n_steps"])
    assert trainer.gradient_clip_val == BASE["gradient_clip_val"] and trainer.num_devices == BASE["devices"]
    assert trainer.num_sanity_val_steps == BASE["num_sanity_val_steps"]
    assert trainer.check_val_every_n_epoch is None and trainer.precision == BASE["precision"]
    # plus the method's callback, with the arguments written in the config, and the zoo's defaults kept
    (masked,) = [c for c in trainer.callbacks if type(c).__name__ == "MaskedThoughtCallback"]
    assert (masked.max_rate, masked.warmup_ratio, masked.corruption) == (0.4, 0.66, "mask_token")
    assert {"FinalCheckpoint", "PredictionsWriter"} <= set(callback_names(trainer))


def test_layered_configs_and_the_command_line_keep_appending(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = build(tmp_path, "--config", str(CONFIGS / "masked_thought.yaml"),
                "--config", str(CONFIGS / "hft.yaml"),
                "--trainer.callbacks+=zoo.modules.sparse.stability.FinetuneStabilizer",
                "--trainer.max_steps", "7")
    names = callback_names(cli.trainer)
    assert names.index("MaskedThoughtCallback") < names.index("HalfFineTuningCallback") < names.index(
        "FinetuneStabilizer")
    assert cli.trainer.max_steps == 7 and cli.trainer.val_check_interval == BASE["val_check_interval"]


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_a_config_that_appends_callbacks_names_its_base_first(path):
    config = yaml.safe_load(path.read_text()) or {}
    if not any(str(key).startswith("trainer.") for key in config):
        return
    # keys before `config:` would be overwritten by the included file: it must come first
    assert next(iter(config)) == "config", f"{path}: put `config: .../base/fit.yaml` first"
    assert "trainer" not in config, f"{path}: a nested trainer block replaces the base one; use dotted keys"
