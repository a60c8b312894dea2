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


def test_conjugate_per_item_scores_and_paired_drop_interval():
    import argparse

    from zoo.datamodules.transforms import ICLvsIFData, make_transform
    from zoo.harness.analyze.conjugate import drop_interval, score

    data = ICLvsIFData(num_test=4)
    records = data.eval_records()
    args = argparse.Namespace(max_new_tokens=10, batch_size=4)
    identity = make_transform("identity")
    every = EchoModule({r["prompt"]: " " + r["answer"] for r in records})
    first_only = EchoModule({r["prompt"]: " " + r["answer"] for r in records[:1]})
    base_items = score(every, data, records, identity, args)[3]
    tuned_items = score(first_only, data, records, identity, args)[3]
    assert (base_items, tuned_items) == ([1.0] * 4, [1.0, 0.0, 0.0, 0.0])
    interval = drop_interval(base_items, tuned_items)  # per-item drops 0, 1, 1, 1
    assert interval["drop"] == 0.75 and (interval["base_better"], interval["tuned_better"]) == (3, 0)
    assert interval["sign_p"] == 0.25  # two-sided exact sign test, 3 of 3: 2 / 2**3
    assert 0.0 <= interval["low"] <= 0.75 <= interval["high"] <= 1.0
    assert drop_interval(None, tuned_items) is None


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


def test_token_shift_hand_made_logits():
    from zoo.harness.analyze.urial_shift import shift_classes, token_shift

    base = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0, 0.0],    # token 1 is 2nd -> marginal
                         [5.0, 4.0, 3.0, 2.0, 1.0, 0.0],    # token 4 is 5th -> shifted
                         [5.0, 4.0, 3.0, 2.0, 1.0, 0.0],    # token 0 is 1st -> unshifted
                         [1.0, 3.0, 3.0, 0.0, 0.0, 0.0]])   # tie for 1st: token 2 shares rank 1
    tokens = torch.tensor([1, 4, 0, 2])
    stats = token_shift(base, base, tokens)
    assert stats["rank"].tolist() == [2, 5, 1, 1]
    assert torch.equal(stats["kl"], torch.zeros(4, dtype=torch.float64))
    expected = base.double().softmax(-1)[torch.arange(4), tokens]
    torch.testing.assert_close(stats["base_prob"], expected)
    assert shift_classes(stats["rank"]) == {"unshifted": 0.5, "marginal": 0.25, "shifted": 0.25}
    align = base.clone()
    align[0] = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0])  # uniform vs base: KL = sum u log(u / p)
    kl = token_shift(align, base, tokens)["kl"][0]
    p = base[0].double().softmax(-1)
    assert float(kl) == pytest.approx(float((torch.full((6,), 1 / 6, dtype=torch.float64)
                                             * (torch.log(torch.tensor(1 / 6, dtype=torch.float64))
                                                - p.log())).sum()), rel=1e-12)


def test_style_token_bonus_shifts_exactly_where_it_changes_the_top1():
    from zoo import backbone
    from zoo.harness.analyze.urial_shift import token_shift

    model, tokenizer = backbone.tiny_llama()
    ids = torch.tensor([tokenizer("Hello there, how are you today?", add_special_tokens=False)["input_ids"]])
    base = model(input_ids=ids).logits[0].detach()
    style = tokenizer("HRT", add_special_tokens=False)["input_ids"]
    align = base.clone()
    align[:, style] += 2.0 * base.std()  # a fixed bonus on a few 'style' tokens
    tokens = align.argmax(-1)
    stats = token_shift(align, base, tokens)
    changed = tokens != base.argmax(-1)
    assert bool(changed.any()) and bool((~changed).any())
    assert torch.equal(stats["rank"] == 1, ~changed)
    assert set(tokens[changed].tolist()) <= set(style)
    assert bool((stats["kl"][changed] > 0).all())


def test_urial_shift_against_itself_and_against_a_tuned_copy(full_export, tmp_path):
    from zoo.harness.load import load_run
    from zoo.modules import CausalLMModule

    prompts = tmp_path / "q.txt"
    prompts.write_text("What is 2 + 3?\nhello\n")
    same = ["--tuned", "tiny-llama", "--base", "tiny-llama"]
    assert main(["urial-shift", *same, "--prompts", str(prompts), "--max-new-tokens", "6",
                 "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "urial-shift.json").read_text())
    assert record["ratios"]["unshifted"] == 1.0 and record["mean_kl"] == 0.0 and record["positions"] > 0
    assert (tmp_path / "urial-shift.png").exists()
    assert main(["urial-shift", "--tuned", str(full_export), "--prompts", str(prompts),
                 "--max-new-tokens", "6", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "urial-shift.json").read_text())
    assert sum(record["ratios"].values()) == pytest.approx(1.0)
    # reference for the first prompt: plain HF forwards of both models, ranks by sorting
    tuned, base = load_run(full_export).model, CausalLMModule(model="tiny-llama", export=False).model
    first = record["prompts"][0]
    from zoo.chat import render_prompt_ids

    prompt = render_prompt_ids(load_run(full_export).tokenizer, "What is 2 + 3?")
    ids = torch.tensor([prompt + first["tokens"]])
    n = len(first["tokens"])
    base_logits = base(input_ids=ids).logits[0, len(prompt) - 1:-1].detach()
    tuned_logits = tuned(input_ids=ids).logits[0, len(prompt) - 1:-1].detach()
    assert tuned_logits.argmax(-1).tolist() == first["tokens"]  # the aligned model's greedy output
    order = base_logits.argsort(-1, descending=True)
    ranks = [int((order[t] == first["tokens"][t]).nonzero()) + 1 for t in range(n)]
    assert first["rank"] == ranks


def test_urial_shift_of_a_urial_export_uses_the_prefix_switched_off(tmp_path):
    from zoo.modules.analysis.urial import URIALModule

    urial = URIALModule(model="tiny-llama", k=1, export=False)
    export = urial.export(tmp_path / "urial")
    assert main(["urial-shift", "--tuned", str(export), "--max-new-tokens", "4", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "urial-shift.json").read_text())
    assert record["shared_backbone"] is True and record["positions"] > 0
    assert record["mean_kl"] > 1e-6  # the prefix changes the distribution the base model predicts


def test_tuco_steering_endpoints_are_the_tuned_and_the_base_generation(lora_export, tmp_path):
    """--alphas: alpha = 1 completes like the LoRA run, alpha = 0 like the plain backbone (cached decoding
    with the scaler's hooks and the base blocks' own KV cache)."""
    from zoo.harness.generation import generate_for_module
    from zoo.harness.load import load_run
    from zoo.modules import CausalLMModule

    prompts = tmp_path / "p.txt"
    prompts.write_text("What is 2 + 3?\nName a colour.\n")
    assert main(["tuco", "--tuned", str(lora_export), "--prompts", str(prompts), "--alphas", "1,0",
                 "--max-new-tokens", "8", "--out", str(tmp_path)]) == 0
    steering = json.loads((tmp_path / "tuco.json").read_text())["steering"]
    texts = ["What is 2 + 3?", "Name a colour."]
    tuned = generate_for_module(load_run(lora_export), texts, max_new_tokens=8)
    base = generate_for_module(CausalLMModule(model="tiny-llama", export=False), texts, max_new_tokens=8)
    assert tuned != base
    assert [s["completion"] for s in steering if s["alpha"] == 1.0] == tuned
    assert [s["completion"] for s in steering if s["alpha"] == 0.0] == base
