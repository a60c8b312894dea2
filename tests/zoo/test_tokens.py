"""zoo.tokens: special tokens added once, one id each, embeddings resized once with mean-initialised rows."""

from __future__ import annotations

import pytest
import torch

from zoo import backbone
from zoo.errors import ConfigError
from zoo.tokens import add_special_tokens, extend_vocabulary

NEW = ["<|good|>", "<|bad|>", "<|lang_feedback|>", "<|/lang_feedback|>"]


def test_each_token_gets_one_new_id_in_order_and_encodes_to_it():
    tokenizer = backbone.byte_tokenizer()
    size = len(tokenizer)
    ids = add_special_tokens(tokenizer, NEW)
    assert ids == list(range(size, size + 4))  # appended after the 258 byte-level entries, in order
    text = "x<|bad|>y<|lang_feedback|>"
    assert tokenizer.encode(text, add_special_tokens=False) == [
        tokenizer.encode("x", add_special_tokens=False)[0], size + 1,
        tokenizer.encode("y", add_special_tokens=False)[0], size + 2]


def test_two_tokenizer_copies_agree_and_a_second_call_adds_nothing():
    first, second = backbone.byte_tokenizer(), backbone.byte_tokenizer()
    assert add_special_tokens(first, NEW) == add_special_tokens(second, NEW)
    size = len(first)
    assert add_special_tokens(first, NEW[::-1]) == add_special_tokens(second, NEW)[::-1]
    assert len(first) == size


def test_extend_resizes_once_with_mean_rows_and_keeps_old_rows():
    model, tokenizer = backbone.tiny_llama()
    old = model.get_input_embeddings().weight.detach().clone()
    expected_row = old.double().mean(0)
    ids = extend_vocabulary(model, tokenizer, NEW)
    weight = model.get_input_embeddings().weight
    assert weight.shape[0] == old.shape[0] + 4 == model.config.vocab_size
    assert torch.equal(weight[: old.shape[0]], old)
    for i in ids:
        torch.testing.assert_close(weight[i].double(), expected_row, atol=1e-6, rtol=0)
    assert model.get_output_embeddings().weight is weight  # tied head follows
    before = weight
    assert extend_vocabulary(model, tokenizer, NEW) == ids  # already there: no second resize
    assert model.get_input_embeddings().weight is before


def test_untied_output_head_gets_mean_rows_too():
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = backbone.byte_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    head = model.get_output_embeddings().weight.detach().clone()
    ids = extend_vocabulary(model, tokenizer, NEW[:2])
    new_head = model.get_output_embeddings().weight
    assert new_head is not model.get_input_embeddings().weight
    assert torch.equal(new_head[: head.shape[0]], head)
    torch.testing.assert_close(new_head[ids[1]], head.mean(0), atol=1e-6, rtol=0)


def test_bad_token_is_a_config_error():
    with pytest.raises(ConfigError, match="non-empty"):
        add_special_tokens(backbone.byte_tokenizer(), ["<|ok|>", ""])
