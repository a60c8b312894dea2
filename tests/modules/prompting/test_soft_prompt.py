"""The shared SoftPrompt mechanism and the prompt/prefix tuning baselines."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from zoo import backbone
from zoo.modules.prompting.prompt_tuning import PrefixTuningModule, PromptTuningModule
from zoo.modules.prompting.soft_prompt import insert_virtual, position_ids_from_mask


def test_insert_virtual_places_prompt_per_row_and_maps_real_positions():
    embeds = torch.arange(2 * 4, dtype=torch.float).view(2, 4, 1)  # row0: 0..3, row1: 4..7
    prompt = torch.full((2, 2, 1), -1.0)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    out, full, real = insert_virtual(embeds, mask, prompt, torch.tensor([0, 3]))
    assert out[0, :, 0].tolist() == [-1, -1, 0, 1, 2, 3]
    assert out[1, :, 0].tolist() == [4, 5, 6, -1, -1, 7]
    assert full.tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]
    assert real.tolist() == [[2, 3, 4, 5], [0, 1, 2, 5]]
    assert position_ids_from_mask(torch.tensor([[0, 0, 1, 1, 1]])).tolist() == [[0, 0, 0, 1, 2]]


def test_prompt_tuning_equals_backbone_on_concatenated_embeddings(tiny_module, make_batch):
    module = tiny_module(cls=PromptTuningModule, num_virtual_tokens=3)
    batch = make_batch()
    logits = module(batch).logits()
    embeds = module.model.get_input_embeddings()(batch["input_ids"])
    prompt = module.soft_prompt.weight.unsqueeze(0).expand(2, -1, -1)
    reference = module.model(inputs_embeds=torch.cat([prompt, embeds], 1)).logits[:, 3:]
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-5)
    # the loss is CE over the real supervised tokens only (virtual positions carry no label)
    loss = module.compute_loss(batch, module(batch), (batch["labels"] != -100).float())
    targets = batch["labels"][:, 1:]
    expected = F.cross_entropy(reference[:, :-1].reshape(-1, reference.shape[-1]), targets.reshape(-1))
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)


def test_without_prompt_the_wrapper_is_the_identity(tiny_module, make_batch):
    module = tiny_module(cls=PromptTuningModule, num_virtual_tokens=4)
    batch = make_batch()
    module.use_prompt = False
    plain = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(module(batch).logits(), plain, atol=1e-6, rtol=1e-6)


def test_prefix_tuning_on_one_layer_equals_prompt_tuning_with_projected_keys(tiny_module, make_batch):
    """One decoder layer: prefix K/V = the layer's own (RoPE'd) K/V of prompt embeddings P <=> prompt tuning P."""
    model, _ = backbone.tiny_llama(layers=1)
    prompt_module = tiny_module(cls=PromptTuningModule, num_virtual_tokens=3)
    prefix_module = tiny_module(cls=PrefixTuningModule, num_virtual_tokens=3)
    for module in (prompt_module, prefix_module):
        module.model = model
        module.build_prompt(model)
    attn = model.model.layers[0].self_attn
    p = prompt_module.soft_prompt.weight.detach()
    with torch.no_grad():
        h = model.model.layers[0].input_layernorm(p).unsqueeze(0)
        k = attn.k_proj(h).view(1, 3, -1, attn.head_dim).transpose(1, 2)
        v = attn.v_proj(h).view(1, 3, -1, attn.head_dim).transpose(1, 2)
        cos, sin = model.model.rotary_emb(h, torch.arange(3).unsqueeze(0))
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        k, _ = apply_rotary_pos_emb(k, k, cos, sin)
        prefix_module.prefix.keys.copy_(k)
        prefix_module.prefix.values.copy_(v)
    batch = make_batch()
    torch.testing.assert_close(prefix_module(batch).logits(), prompt_module(batch).logits(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cls", [PromptTuningModule, PrefixTuningModule])
def test_cached_and_uncached_greedy_generation_agree_with_left_padding(tiny_module, cls):
    module = tiny_module(cls=cls, num_virtual_tokens=3)
    with torch.no_grad():  # a larger prompt so that it visibly steers the random model
        for p in module.trainable_parameters().values():
            p.mul_(50)
    ids = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    cached, s1 = module.generate(ids, mask, 6, use_cache=True, eos_token_id=-1, output_scores=True)
    uncached, s2 = module.generate(ids, mask, 6, use_cache=False, eos_token_id=-1, output_scores=True)
    assert cached.tolist() == uncached.tolist()
    torch.testing.assert_close(s1, s2, atol=1e-4, rtol=1e-4)
    # the left-padded row decodes as it does alone (positions ignore padding)
    alone = module.generate(ids[:1, 2:], mask[:1, 2:], 6, use_cache=True, eos_token_id=-1)
    assert alone[0].tolist() == cached[0].tolist()


@pytest.mark.parametrize("cls", [PromptTuningModule, PrefixTuningModule])
def test_backbone_is_bitwise_frozen_and_prompt_trains(tiny_module, tiny_data, fit_tiny, cls):
    module = tiny_module(cls=cls, num_virtual_tokens=4, lr=1e-2)
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    prompt_before = {k: v.clone() for k, v in module.trainable_parameters().items()}
    fit_tiny(module, tiny_data(), max_steps=2)
    for key, value in module.model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(not torch.equal(p, prompt_before[k]) for k, p in module.trainable_parameters().items())


def test_trainable_counts_follow_the_formulas(tiny_module):
    m = 5
    prompt = tiny_module(cls=PromptTuningModule, num_virtual_tokens=m)
    prefix = tiny_module(cls=PrefixTuningModule, num_virtual_tokens=m)
    config = prompt.model.config
    hidden, layers = config.hidden_size, config.num_hidden_layers
    kv_dim = config.num_key_value_heads * hidden // config.num_attention_heads
    assert sum(p.numel() for p in prompt.trainable_parameters().values()) == m * hidden
    assert sum(p.numel() for p in prefix.trainable_parameters().values()) == layers * 2 * m * kv_dim
    assert not any(p.requires_grad for p in prompt.model.parameters())
