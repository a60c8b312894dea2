"""The shared soft-prompt adapter (SoftPromptAdapter) and the prompt/prefix tuning baselines.

The decoding, export and objective tests run over every soft-prompt adapter of this family (ADAPTERS).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from zoo import backbone
from zoo.decoding import decode_ids, left_pad
from zoo.harness.load import load_run
from zoo.modules import CausalLMModule
from zoo.modules.base import target_mask
from zoo.modules.prompting.dept import DePT
from zoo.modules.prompting.ept import EPT
from zoo.modules.prompting.prompt_tuning import PrefixTuning, PromptTuning
from zoo.modules.prompting.soft_prompt import SoftPromptAdapter, insert_virtual, position_ids_from_mask

ADAPTERS = {
    "prompt_tuning": lambda: PromptTuning(num_virtual_tokens=3),
    "prefix_tuning": lambda: PrefixTuning(num_virtual_tokens=3),
    "dept": lambda: DePT(num_virtual_tokens=2, rank=2, max_seq_length=96),  # tiny_data max_length
    "ept": lambda: EPT(num_virtual_tokens=2, rank=2, max_seq_length=96, num_subspaces=2, subspace_rank=2),
}


def with_adapter(tiny_module, adapter: SoftPromptAdapter, **kwargs) -> CausalLMModule:
    return tiny_module(adapter=adapter, **kwargs)


def sharpen(module: CausalLMModule, seed: int = 0, backbone_too: bool = False) -> None:
    """Redraw every adapter tensor from N(0, 1) so the adapter visibly steers the random tiny model; with
    ``backbone_too`` also the backbone's matrices (N(0, 0.3^2)), so greedy continuations depend on the input."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=generator))
        for p in module.model.parameters() if backbone_too else ():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)


def nll(module: CausalLMModule, batch: dict[str, torch.Tensor]) -> float:
    """Token-mean response NLL of ``batch`` through the module's own forward (eval mode, no grad)."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            weights = target_mask(batch["labels"]).float()
            return float(module.weighted_token_loss(module(batch), weights).sum() / weights.sum())
    finally:
        module.train(was_training)


# ---------------------------------------------------------------------------- mechanism
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
    module = with_adapter(tiny_module, PromptTuning(num_virtual_tokens=3))
    batch = make_batch()
    logits = module(batch).logits()
    embeds = module.model.get_input_embeddings()(batch["input_ids"])
    prompt = module.adapter.soft_prompt.weight.unsqueeze(0).expand(2, -1, -1)
    reference = module.model(inputs_embeds=torch.cat([prompt, embeds], 1)).logits[:, 3:]
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-5)
    # the loss is CE over the real supervised tokens only (virtual positions carry no label)
    loss = module.compute_loss(batch, module(batch), (batch["labels"] != -100).float())
    targets = batch["labels"][:, 1:]
    expected = F.cross_entropy(reference[:, :-1].reshape(-1, reference.shape[-1]), targets.reshape(-1))
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ADAPTERS)
def test_disabled_adapter_is_the_plain_backbone(tiny_module, make_batch, name):
    module = with_adapter(tiny_module, ADAPTERS[name]())
    sharpen(module)
    batch = make_batch()
    plain = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    with module.adapter.disabled():
        torch.testing.assert_close(module(batch).logits(), plain, atol=1e-6, rtol=1e-6)
    assert module.adapter.use_prompt  # restored on exit
    assert (module(batch).logits() - plain).abs().max() > 1e-3


def test_prefix_tuning_on_one_layer_equals_prompt_tuning_with_projected_keys(tiny_module, make_batch):
    """One decoder layer: prefix K/V = the layer's own (RoPE'd) K/V of prompt embeddings P <=> prompt tuning P."""
    model, _ = backbone.tiny_llama(layers=1)
    prompt_module = with_adapter(tiny_module, PromptTuning(num_virtual_tokens=3))
    prefix_module = with_adapter(tiny_module, PrefixTuning(num_virtual_tokens=3))
    for module in (prompt_module, prefix_module):
        module.model = module.adapter.attach(model, module.tokenizer)
    attn = model.model.layers[0].self_attn
    p = prompt_module.adapter.soft_prompt.weight.detach()
    with torch.no_grad():
        h = model.model.layers[0].input_layernorm(p).unsqueeze(0)
        k = attn.k_proj(h).view(1, 3, -1, attn.head_dim).transpose(1, 2)
        v = attn.v_proj(h).view(1, 3, -1, attn.head_dim).transpose(1, 2)
        cos, sin = model.model.rotary_emb(h, torch.arange(3).unsqueeze(0))
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        k, _ = apply_rotary_pos_emb(k, k, cos, sin)
        prefix_module.adapter.prefix.keys.copy_(k)
        prefix_module.adapter.prefix.values.copy_(v)
    batch = make_batch()
    torch.testing.assert_close(prefix_module(batch).logits(), prompt_module(batch).logits(), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- decoding (zoo.decoding)
@pytest.mark.parametrize("name", ADAPTERS)
def test_cached_and_uncached_greedy_decoding_agree_with_left_padding(tiny_module, name):
    module = with_adapter(tiny_module, ADAPTERS[name]())
    sharpen(module, backbone_too=True)
    module.eval()
    ids = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    run = dict(max_new_tokens=6, eos={-1}, pad_id=0, hooks=module.adapter, output_scores=True)
    cached, s1 = decode_ids(module.model, ids, mask, use_cache=True, **run)
    uncached, s2 = decode_ids(module.model, ids, mask, use_cache=False, **run)
    assert cached.tolist() == uncached.tolist()
    torch.testing.assert_close(s1, s2, atol=1e-4, rtol=1e-4)
    # the left-padded row decodes as it does alone (positions ignore padding)
    alone = decode_ids(module.model, ids[:1, 2:], mask[:1, 2:], **{**run, "output_scores": False})
    assert alone[0].tolist() == cached[0].tolist()
    with module.adapter.disabled():  # the adapter steers decoding, so the comparison above has teeth
        plain = decode_ids(module.model, ids, mask, use_cache=True, **{**run, "output_scores": False})
    assert plain.tolist() != cached.tolist()


@pytest.mark.parametrize("name", ADAPTERS)
def test_first_decoding_step_equals_training_forward_at_the_last_prompt_token(tiny_module, name):
    """The decoding hooks agree with training: right-padded forward vs left-padded prefill, row by row."""
    module = with_adapter(tiny_module, ADAPTERS[name]())
    sharpen(module, seed=3)
    module.eval()
    generator = torch.Generator().manual_seed(4)
    rows = [torch.randint(0, 256, (n,), generator=generator).tolist() for n in (5, 9)]
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    with torch.no_grad():
        train_logits = module({"input_ids": ids, "attention_mask": mask, "labels": ids.clone()}).logits()
    last = torch.stack([train_logits[i, len(r) - 1] for i, r in enumerate(rows)])
    left_ids, left_mask = left_pad(rows, 0)
    _, scores = decode_ids(module.model, left_ids, left_mask, max_new_tokens=1, eos={-1}, pad_id=0,
                           hooks=module.adapter, output_scores=True)
    torch.testing.assert_close(scores[:, 0], last, atol=1e-4, rtol=1e-4)


def test_generate_text_goes_through_the_adapter_with_the_system_prompt(tiny_module):
    from zoo.chat import render_prompt_ids
    from zoo.decoding import cut_at_eos, eos_ids

    module = with_adapter(tiny_module, PromptTuning(num_virtual_tokens=3))
    sharpen(module, backbone_too=True)
    tok, prompts, system = module.tokenizer, ["What is 2 + 3?", "hi"], "Answer tersely."

    def reference(system_prompt):
        ids, mask = left_pad([render_prompt_ids(tok, p, system_prompt) for p in prompts], tok.pad_token_id)
        eos = eos_ids(module.model, tok)
        new = decode_ids(module.model, ids, mask, max_new_tokens=8, eos=eos, pad_id=tok.pad_token_id,
                         hooks=module.adapter)
        return [tok.decode(cut_at_eos(row, eos), skip_special_tokens=True) for row in new.tolist()]

    assert module.generate_text(prompts, max_new_tokens=8, system_prompt=system) == reference(system)
    assert reference(system) != reference(None)  # the system prompt changes the output: the check has teeth
    assert not hasattr(module.adapter, "generate") and not hasattr(module.adapter, "generate_text")


# ---------------------------------------------------------------------------- training, counts, export
@pytest.mark.parametrize("name", ["prompt_tuning", "prefix_tuning"])
def test_backbone_is_bitwise_frozen_and_prompt_trains(tiny_module, tiny_data, fit_tiny, name):
    module = with_adapter(tiny_module, ADAPTERS[name](), lr=1e-2)
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    prompt_before = {k: v.clone() for k, v in module.trainable_parameters().items()}
    assert prompt_before and all(k.startswith("adapter.") for k in prompt_before)
    fit_tiny(module, tiny_data(), max_steps=2)
    for key, value in module.model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(not torch.equal(p, prompt_before[k]) for k, p in module.trainable_parameters().items())


def test_trainable_counts_follow_the_formulas(tiny_module):
    m = 5
    prompt = with_adapter(tiny_module, PromptTuning(num_virtual_tokens=m))
    prefix = with_adapter(tiny_module, PrefixTuning(num_virtual_tokens=m))
    config = prompt.model.config
    hidden, layers = config.hidden_size, config.num_hidden_layers
    kv_dim = config.num_key_value_heads * hidden // config.num_attention_heads
    assert sum(p.numel() for p in prompt.trainable_parameters().values()) == m * hidden
    assert sum(p.numel() for p in prefix.trainable_parameters().values()) == layers * 2 * m * kv_dim
    assert not any(p.requires_grad for p in prompt.model.parameters())


@pytest.mark.parametrize("name", ADAPTERS)
def test_export_reloads_with_zoo_load_and_scores_the_same(tiny_module, tiny_data, fit_tiny, make_batch, tmp_path,
                                                         name):
    module = with_adapter(tiny_module, ADAPTERS[name](), lr=1e-2)
    batch = make_batch(length=16)
    untrained = nll(module, batch)
    fit_tiny(module, tiny_data(), max_steps=2)
    trained = nll(module, batch)
    export = module.export(tmp_path / "export")
    manifest = json.loads((export / "zoo.json").read_text())
    assert manifest["weights"] == "none" and manifest["init_args"]["adapter"]["class_path"].endswith(
        type(module.adapter).__name__)
    reloaded = load_run(export)
    assert type(reloaded.adapter) is type(module.adapter)
    assert nll(reloaded, batch) == pytest.approx(trained, abs=1e-5)
    base = nll(tiny_module(), batch)
    assert abs(trained - base) > 1e-4 and abs(trained - untrained) > 1e-6
    # prompt.pt: the adapter's tensors under its own state-dict names (prompt transfer)
    saved = torch.load(export / "prompt.pt", weights_only=True)
    assert saved.keys() == module.adapter.state_dict().keys()
    assert all(torch.equal(saved[k], v) for k, v in module.adapter.state_dict().items())


def test_init_prompt_starts_from_an_exported_prompt(tiny_module, tmp_path, make_batch):
    source = with_adapter(tiny_module, PromptTuning(num_virtual_tokens=3, init_seed=1))
    sharpen(source, seed=5)
    source.adapter.export_extras(tmp_path)
    target = with_adapter(tiny_module, PromptTuning(num_virtual_tokens=3, init_prompt=str(tmp_path / "prompt.pt")))
    assert torch.equal(target.adapter.soft_prompt.weight, source.adapter.soft_prompt.weight)
    assert target.adapter.soft_prompt.weight.requires_grad
    from zoo.errors import ConfigError

    with pytest.raises(ConfigError, match="does not match"):
        with_adapter(tiny_module, PromptTuning(num_virtual_tokens=4, init_prompt=str(tmp_path / "prompt.pt")))
    with pytest.raises(ConfigError, match="does not exist"):
        with_adapter(tiny_module, PromptTuning(init_prompt=str(tmp_path / "missing.pt")))


# ---------------------------------------------------------------------------- another objective
@pytest.fixture(scope="module")
def pref_data():
    from zoo.datamodules.preference import PreferenceDataModule

    data = PreferenceDataModule(tokenizer="tiny-llama", num_train=8, num_val=2, num_test=4, max_length=256,
                                batch_size=4, eval_batch_size=4)
    data.setup("fit")
    return data


def test_dpo_trains_a_prompt_tuning_adapter(pref_data, fit_tiny):
    from zoo.modules.objectives.dpo import DPOModule

    module = DPOModule(model="tiny-llama", adapter=PromptTuning(num_virtual_tokens=4), lr=1e-2, export=False)
    assert set(module.trainable_parameters()) == {"adapter.soft_prompt.weight"}
    backbone_before = {k: v.clone() for k, v in module.model.state_dict().items()}
    prompt_before = module.adapter.soft_prompt.weight.detach().clone()
    fit_tiny(module, pref_data, max_steps=1)
    assert not torch.equal(module.adapter.soft_prompt.weight, prompt_before)
    assert all(torch.equal(v, backbone_before[k]) for k, v in module.model.state_dict().items())


def test_dpo_reference_of_a_prompt_adapter_is_the_prompt_free_base(pref_data):
    """DPO's reference must not carry the trained prompt (else the implicit reward is always 0)."""
    from zoo.modules.objectives.dpo import DPOModule

    module = DPOModule(model="tiny-llama", adapter=PromptTuning(num_virtual_tokens=4), export=False)
    sharpen(module)
    batch = next(iter(pref_data.train_dataloader()))
    mask = target_mask(batch["labels"]).float()
    reference = module.reference_token_logps(batch, mask)
    with module.adapter.disabled(), torch.no_grad():
        base = -module.weighted_token_loss(module(batch), mask)
    torch.testing.assert_close(reference, base, atol=1e-5, rtol=1e-5)
