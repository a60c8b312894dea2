"""URIAL (spec 31): byte-exact format, stop/fence handling, the cached prefix equals recomputing it, nothing
trains."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from zoo import decoding
from zoo.errors import ConfigError
from zoo.modules.analysis.urial import URIALModule, clean_answer, render_prefix, render_query

ONE = [{"query": "Name a fruit.", "answer": "Hello! Here is one:\n1. Apple: crunchy and sweet."}]


def test_golden_format_of_a_one_example_prefix_and_query():
    text = render_prefix("# Instruction\n\nBe helpful.\n", ONE) + render_query("What is 2 + 3?")
    expected = ("# Instruction\n\nBe helpful.\n"
                "\n# Query:\n```\nName a fruit.\n```\n"
                "\n# Answer:\n```\nHello! Here is one:\n1. Apple: crunchy and sweet.\n```\n"
                "\n# Query:\n```\nWhat is 2 + 3?\n```\n"
                "\n# Answer:\n```\n")
    assert text == expected


def test_stop_strings_and_fences():
    assert clean_answer("Five.\n```\n\n# Query:\n```\nmore") == "Five."
    assert clean_answer("A\n# User: hi") == "A"
    assert clean_answer("no stop here ```  ") == "no stop here"


@pytest.fixture(scope="module")
def urial():
    return URIALModule(model="tiny-llama", k=1, examples=ONE, system_text="# Instruction\n\nBe helpful.\n",
                       export=False).eval()


def test_urial_trains_nothing(urial):
    assert urial.trainable_parameters() == {} and urial.trainable_count() == 0
    assert urial.configure_optimizers() is None
    with pytest.raises(ConfigError, match="k=5"):
        URIALModule(model="tiny-llama", k=5, examples=ONE, export=False)


def test_fit_leaves_every_weight_bit_identical(tmp_path):
    from zoo.datamodules import SFTDataModule

    module = URIALModule(model="tiny-llama", k=1, examples=ONE, export=False)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    data = SFTDataModule(dataset="chain_sum", tokenizer="tiny-llama", num_train=4, num_val=2, num_test=2,
                         max_length=128, batch_size=2)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=tmp_path)
    trainer.fit(module, datamodule=data)
    after = module.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_cached_prefix_logits_equal_full_recompute(urial):
    """The prefill with the cached prefix gives the same next-token logits as the whole text through the
    model (prefix + query, recomputed, no cache), row by row, under left padding."""
    tokenizer = urial.tokenizer
    queries = ["What is 2 + 3?", "hi"]
    encoded = [tokenizer(render_query(q), add_special_tokens=False)["input_ids"] for q in queries]
    ids, mask = decoding.left_pad(encoded, tokenizer.pad_token_id)
    _, cached = decoding.decode_ids(urial.model, ids, mask, max_new_tokens=4, eos=set(), pad_id=0,
                                    hooks=urial.adapter, use_cache=True, output_scores=True)
    for row in range(len(queries)):  # reference: the full text, one row, plain decoding, no cache
        full = tokenizer(urial.adapter.prefix, add_special_tokens=False)["input_ids"] + encoded[row]
        full_ids = torch.tensor([full])
        _, reference = decoding.decode_ids(urial.model, full_ids, torch.ones_like(full_ids), max_new_tokens=4,
                                           eos=set(), pad_id=0, use_cache=False, output_scores=True)
        torch.testing.assert_close(cached[row], reference[0], rtol=0, atol=1e-5)


def test_cached_generation_equals_uncached_and_prefix_is_computed_once(urial):
    prompts = ["What is 2 + 3?", "hi", "Tell me a story."]
    urial.adapter._kv = None
    count = urial.adapter.prefix_computations
    cached = urial.generate_text(prompts, max_new_tokens=8, batch_size=2, use_cache=True)
    again = urial.generate_text(prompts[:1], max_new_tokens=8)
    assert urial.adapter.prefix_computations == count + 1  # once, shared by both batches and calls
    assert cached == urial.generate_text(prompts, max_new_tokens=8, batch_size=2, use_cache=False)
    assert again == cached[:1]


def test_generation_cuts_at_the_stop_string(urial, monkeypatch):
    """A model that 'continues the conversation': the answer ends before the next '# Query'."""
    text = "Five.\n```\n\n# Query:\n```\nnext"
    ids = urial.tokenizer(text, add_special_tokens=False)["input_ids"]

    def scripted(model, input_ids, attention_mask, **kwargs):
        return torch.tensor([ids] * input_ids.shape[0])

    monkeypatch.setattr(decoding, "decode_ids", scripted)
    assert urial.generate_text(["What is 2 + 3?"]) == ["Five."]


def test_disabled_prefix_is_the_base_model(urial, tiny_module):
    base = tiny_module().eval()
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    with urial.adapter.disabled():
        torch.testing.assert_close(urial.forward_hidden(batch), base.forward_hidden(batch))
        assert urial.generate_text(["hi"], max_new_tokens=4) == base.generate_text(["hi"], max_new_tokens=4)
    assert not torch.allclose(urial.forward_hidden(batch), base.forward_hidden(batch))  # the prefix is read


def test_export_reload_rebuilds_urial(urial, tmp_path):
    from zoo.harness.load import load_run

    urial.export(tmp_path / "export")
    reloaded = load_run(tmp_path / "export")
    assert type(reloaded) is URIALModule and reloaded.adapter.prefix == urial.adapter.prefix
    assert reloaded.generate_text(["hi"], max_new_tokens=6) == urial.generate_text(["hi"], max_new_tokens=6)
