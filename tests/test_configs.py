"""Every registered method's config runs ``fit --trainer.fast_dev_run 1`` on the tiny backbone; README table.

Methods are collected from :func:`zoo.registry.methods` at collection time, so methods other sessions add are
picked up automatically. The data is overridden to a tiny ``chain_sum`` set only when the config's data class
is
``SFTDataModule`` (or a subclass): other DataModules (preference, classification, ...) have other arguments,
so
their own data block runs unchanged (their configs must already be small enough for a fast_dev_run).
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml

from zoo import registry

REPO = Path(__file__).resolve().parent.parent
TINY_DATA = [  # byte tokenizer: 96 tokens would drop every chain_sum preference pair
    "--data.init_args.dataset", "chain_sum", "--data.init_args.num_train", "16",
    "--data.init_args.num_val", "4", "--data.init_args.num_test", "4",
    "--data.init_args.max_length", "128", "--data.init_args.batch_size", "2",
]


def _method_names() -> list[str]:
    try:
        return [m.name for m in registry.methods()]
    except Exception as err:  # a broken method file must fail loudly, not hide the other tests
        return [f"<registry import failed: {type(err).__name__}: {err}>"]


def _data_class(config_path: Path) -> type | None:
    """The config's data class (following ``data: base/x.yaml`` links); None if it cannot be resolved."""
    config = yaml.safe_load(config_path.read_text()) or {}
    data = config.get("data")
    if isinstance(data, str):
        data = yaml.safe_load((config_path.parent / data).read_text())
    if not isinstance(data, dict) or "class_path" not in data:
        return None
    module, _, name = data["class_path"].rpartition(".")
    if not module:  # short class name
        import zoo.datamodules as datamodules

        return getattr(datamodules, name, None)
    return getattr(importlib.import_module(module), name, None)


@pytest.mark.parametrize("name", _method_names())
def test_config_runs_fast_dev_run_on_tiny_backbone(name, tmp_path, monkeypatch):
    from zoo.cli import main
    from zoo.datamodules import SFTDataModule

    method = registry.get(name)  # raises for the "<registry import failed>" placeholder
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ZOO_RUN_DIR", raising=False)
    data_class = _data_class(method.config_path)
    data_args = TINY_DATA if data_class is None or issubclass(data_class, SFTDataModule) else []
    code = main(["fit", "--config", str(method.config_path), "--model.init_args.model", "tiny-llama",
                 *data_args, "--trainer.fast_dev_run", "1", "--trainer.accelerator", "cpu",
                 "--trainer.default_root_dir", str(tmp_path / "run"),
                 "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"])
    assert code == 0


def test_readme_method_table_matches_registry():
    readme = REPO / "README.md"
    if not readme.exists():
        pytest.skip("README.md not written yet")
    current = registry.readme_table(readme)
    if current is None:
        pytest.skip("README.md has no <!-- methods:start --> / <!-- methods:end --> markers yet")
    assert current == registry.markdown_table().strip(), "run `python -m zoo list --update-readme`"
