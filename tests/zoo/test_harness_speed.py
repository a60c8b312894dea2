"""The speed script runs end to end on the tiny backbone and compares like with like (no timed asserts)."""

from __future__ import annotations

import re

import torch

from zoo.harness.speed import main, make_batch


def test_speed_script_prints_both_sides_and_the_ratio(capsys):
    assert main(["--model", "tiny-llama", "--steps", "2", "--warmup", "1", "--batch", "2",
                 "--seq", "16"]) == 0
    out = capsys.readouterr().out
    lightning = float(re.search(r"lightning CausalLMModule :\s+([\d,]+) tokens/s", out).group(1)
                      .replace(",", ""))
    bare = float(re.search(r"bare PyTorch loop\s+:\s+([\d,]+) tokens/s", out).group(1).replace(",", ""))
    ratio = float(re.search(r"ratio lightning / bare\s+:\s+([\d.]+)", out).group(1))
    assert lightning > 0 and bare > 0
    assert abs(ratio - lightning / bare) < 0.02 * ratio + 1e-3  # the printed ratio is lightning over bare


def test_both_sides_optimise_the_same_loss():
    """The bare loop's HF loss equals CausalLMModule's token-mean loss on the benchmark batch."""
    from zoo.modules import CausalLMModule
    from zoo.modules.base import target_mask

    module = CausalLMModule(model="tiny-llama", export=False)
    batch = make_batch(module.model.config.vocab_size, batch=2, seq=16)
    with torch.no_grad():
        ours = module.compute_loss(batch, module(batch), target_mask(batch["labels"]).float())
        hf = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          labels=batch["labels"]).loss
    assert torch.allclose(ours, hf, rtol=1e-5)
