"""``zoo analyze``: the tool registry and the TuCo / conjugate / urial-shift commands on tiny-llama."""

from __future__ import annotations

import json

import pytest
import torch

from zoo.cli import main as zoo_main
from zoo.harness.analyze import TOOLS, main


@pytest.fixture(scope="module")
def lora_export(tmp_path_factory):
    """A LoRA 'run' export on tiny-llama whose LoRA B matrices are non-zero (so the tuning is visible)."""
    from zoo.modules import CausalLMModule
    from zoo.modules.adapters import LoRA

    adapter = LoRA(r=4, target_modules=["q_proj", "v_proj", "down_proj"])
    module = CausalLMModule(model="tiny-llama", export=False, adapter=adapter)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    return module.export(tmp_path_factory.mktemp("lora") / "export")


@pytest.fixture(scope="module")
def full_export(tmp_path_factory):
    """A fully fine-tuned tiny-llama export: every block weight moved (zoo.json records model=tiny-llama)."""
    from zoo import backbone
    from zoo.modules import CausalLMModule

    module = CausalLMModule(model="tiny-llama", export=False)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in backbone.decoder_layers(module.model).parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return module.export(tmp_path_factory.mktemp("full") / "export")


def test_help_lists_every_tool(capsys):
    assert zoo_main(["analyze", "--help"]) == 0
    out = capsys.readouterr().out
    for name in TOOLS:
        assert name in out


def test_unknown_tool_is_one_line_error(capsys):
    assert main(["no-such-tool"]) == 2
    assert "choose one of" in capsys.readouterr().err


def test_missing_base_for_an_alias_is_a_config_error(tmp_path, capsys):
    assert main(["tuco", "--tuned", "tiny-llama", "--out", str(tmp_path)]) == 1
    assert "pass --base" in capsys.readouterr().err


def test_tuco_on_a_lora_run_uses_the_disabled_adapter_and_matches_two_copies(lora_export, tmp_path, capsys):
    from zoo.harness.load import load_run
    from zoo.modules import CausalLMModule
    from zoo.modules.analysis.tuco import BlockPair, decompose, encode_prompts, tuco

    prompts = tmp_path / "chat.txt"
    prompts.write_text("What is 2 + 3?\nName a colour.\n")
    assert zoo_main(["analyze", "tuco", "--tuned", str(lora_export), "--prompts", str(prompts),
                     "--out", str(tmp_path)]) == 0
    assert "TuCo" in capsys.readouterr().out
    record = json.loads((tmp_path / "tuco.json").read_text())
    assert (tmp_path / "tuco.png").stat().st_size > 0
    assert record["shared_backbone"] is True
    # reference: two separate models, the LoRA merged into one copy, the plain backbone as the other
    tuned = load_run(lora_export)
    merged = tuned.model.merge_and_unload()
    base = CausalLMModule(model="tiny-llama", export=False).eval()
    batch = encode_prompts(base.tokenizer, ["What is 2 + 3?", "Name a colour."], chat=True)
    result = decompose(BlockPair(merged, base=base.model),
                       lambda: merged(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]))
    expected = tuco(result, batch["last"])[0]
    got = [p["tuco"] for p in record["prompts"]]
    assert got == pytest.approx(expected.tolist(), abs=1e-5)
    assert all(0 < v < 1 for v in got)


def test_tuco_full_finetune_defaults_to_its_recorded_backbone(full_export, tmp_path):
    assert main(["tuco", "--tuned", str(full_export), "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "tuco.json").read_text())
    assert record["shared_backbone"] is False and record["base"] == "tiny-llama"
    assert set(record["groups"]) == {"instruction", "web-text"}
    assert all(0 < p["tuco"] < 1 for p in record["prompts"])
    # against itself TuCo is exactly 0
    same = ["--tuned", str(full_export), "--base", str(full_export)]
    assert main(["tuco", *same, "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "tuco.json").read_text())
    assert all(p["tuco"] == 0.0 for p in record["prompts"])
