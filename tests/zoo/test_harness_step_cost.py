"""``python -m zoo.harness.step_cost``: the same batch through each config, saved activations and sequence."""

from __future__ import annotations

import pytest

from zoo.errors import ZooError
from zoo.harness import step_cost
from zoo.registry import REPO_ROOT

PROMPT = REPO_ROOT / "configs" / "bench" / "prompt_gsm"


@pytest.fixture(scope="module")
def table():
    rows = {}
    for name in ("prompt_tuning", "dept", "lora_r1"):
        module = step_cost.build_module(PROMPT / f"{name}.yaml", "tiny-llama")
        batch = step_cost.make_batch(module.model.config.vocab_size, 2, 32)
        rows[name] = (module, step_cost.measure(module, batch, repeats=1))
    return rows


def test_backbone_sees_real_plus_virtual_tokens(table):
    assert table["prompt_tuning"][1]["sequence"] == 32 + 100
    assert table["dept"][1]["sequence"] == 32 + 50
    assert table["lora_r1"][1]["sequence"] == 32


def test_shorter_prompt_saves_activations_and_trainable_count_is_the_modules(table):
    saved = {name: rows[1]["saved_mib"] for name, rows in table.items()}
    assert saved["prompt_tuning"] > saved["dept"] > saved["lora_r1"]
    for module, result in table.values():
        assert result["trainable"] == sum(p.numel() for p in module.trainable_parameters().values())
        assert result["step_s"] > 0


def test_missing_config_is_a_clear_error(tmp_path):
    with pytest.raises(ZooError, match="not found"):
        step_cost.main([str(tmp_path / "nope.yaml")])
