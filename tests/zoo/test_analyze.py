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


class EchoModule(torch.nn.Module):
    """A stand-in model answering every prompt with ``answers[prompt]`` (for the probe's plumbing)."""

    def __init__(self, answers):
        super().__init__()
        self.answers = answers

    def generate_text(self, prompts, max_new_tokens=256, system_prompt=None, batch_size=16, **sampling):
        return [self.answers.get(p, "nothing") for p in prompts]


def test_conjugate_probe_maps_answers_back_before_scoring():
    import argparse

    from zoo.datamodules.transforms import ICLvsIFData, make_transform
    from zoo.harness.analyze.conjugate import score

    data = ICLvsIFData(num_test=8)
    records = data.eval_records()
    args = argparse.Namespace(max_new_tokens=10, batch_size=4)
    for spec in ("identity", "leetspeak", "piglatin"):
        transform = make_transform(spec)
        # a model that answers in the transformed space: correct once map_answer brings it back
        fluent = EchoModule({transform.apply(r["prompt"]): " " + transform.apply_answer(r["answer"]) + " x"
                             for r in records})
        assert score(fluent, data, records, transform, args)[:2] == ("icl_match", 1.0)
    # answering the instruction-following way (the arithmetic result) scores 0
    literal = EchoModule({r["prompt"]: " 12" for r in records})
    assert score(literal, data, records, make_transform("identity"), args)[1] == 0.0


def test_conjugate_identity_reproduces_the_bench_harness(lora_export, tmp_path):
    import argparse

    from zoo.harness.bench.evaluation import build_datamodule, evaluate
    from zoo.harness.load import load_run

    config = tmp_path / "data.yaml"
    config.write_text("data:\n  class_path: zoo.datamodules.SFTDataModule\n  init_args: {dataset: chain_sum, "
                      "num_train: 8, num_val: 2, num_test: 3, max_length: 128}\n")
    assert main(["conjugate", "--tuned", str(lora_export), "--data-config", str(config), "--limit", "3",
                 "--max-new-tokens", "6", "--transforms", "identity,piglatin", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "conjugate.json").read_text())
    assert [t["transform"] for t in record["transforms"]] == ["identity", "piglatin"]
    assert (tmp_path / "conjugate.png").exists()
    module = load_run(lora_export)
    datamodule, _ = build_datamodule(argparse.Namespace(data_config=str(config)), None, "tiny-llama", [])
    completions = tmp_path / "bench.jsonl"
    bench = evaluate(module, datamodule, argparse.Namespace(limit=3, max_new_tokens=6, batch_size=16),
                     completions_path=completions)
    identity = record["transforms"][0]
    assert identity["tuned"] == bench["metrics"]["exact_match"]
    bench_outputs = [json.loads(line)["completion"] for line in completions.read_text().splitlines()]
    assert [e["tuned"] for e in identity["examples"]] == bench_outputs[:3]
    assert any(e["tuned"] != e["base"] for e in identity["examples"])  # the adapter was on, then off
