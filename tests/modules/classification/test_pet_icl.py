"""PET + adapters (spec 35) and the in-context-learning baseline: their own invariants."""

from __future__ import annotations

import pytest
import torch

from zoo.modules.classification import ClassificationModule
from zoo.modules.classification.icl import ICLClassifier, interleave
from zoo.modules.classification.pet import PETClassifier, load_matching
from zoo.modules.sparse.unified_adapters import ParallelAdapters


def batch_for(module, texts: list[str], labels: list[int]) -> dict:
    prompts = module.render(texts)
    rows = [p + module.tokenizer("yes")["input_ids"] for p in prompts]
    width = max(map(len, rows))
    pad = module.tokenizer.pad_token_id
    return {"input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in rows]),
            "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
            "labels": torch.tensor([[-100] * len(p) + r[len(p):] + [-100] * (width - len(r))
                                    for p, r in zip(prompts, rows)]),
            "class_index": torch.tensor(labels), "prompt_text": texts, "text": texts}


def test_pet_with_zero_up_projection_scores_like_the_frozen_backbone_and_only_the_adapter_trains():
    torch.manual_seed(0)
    pet = PETClassifier(model="tiny-llama", labels=["yes", "no"], export=False,
                        adapter=ParallelAdapters(placement="ffn", bottleneck=4, scale=1.0))
    plain = ClassificationModule(model="tiny-llama", labels=["yes", "no"], export=False)
    batch = batch_for(pet, ["is it?", "maybe not"], [0, 1])
    with torch.no_grad():
        assert torch.allclose(pet.label_scores(batch), plain.label_scores(batch), atol=1e-5)
    trainable = pet.trainable_parameters()
    assert trainable and all(name.startswith("adapter.") for name in trainable)
    pet.compute_loss(batch, pet(batch), None).backward()
    assert all(p.grad is None for p in pet.model.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.values())


def test_pet_init_from_copies_the_stage_one_adapter(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    pet = PETClassifier(model="tiny-llama", labels=["yes", "no"], export=False,
                        adapter=ParallelAdapters(placement="ffn", bottleneck=4, scale=1.0))
    name = next(iter(pet.trainable_parameters()))
    value = torch.full_like(pet.trainable_parameters()[name], 0.25)
    save_file({name: value, "verbalizer.prior": torch.tensor([0.9, 0.1]), "other": torch.zeros(3)},
              str(tmp_path / "zoo_state.safetensors"))
    assert load_matching(pet, tmp_path) == [name]
    assert torch.equal(pet.trainable_parameters()[name].detach(), value)
    assert torch.equal(pet.verbalizer.prior, torch.tensor([0.5, 0.5]))  # the prior is never transferred


def test_icl_scores_the_demonstration_prompt_and_trains_nothing():
    torch.manual_seed(0)
    demos = [{"text": "good", "label": "yes"}, {"text": "bad", "label": "no"}]
    icl = ICLClassifier(model="tiny-llama", labels=["yes", "no"], demonstrations=demos, export=False)
    plain = ClassificationModule(model="tiny-llama", labels=["yes", "no"], export=False)
    assert not icl.trainable_parameters() and icl.configure_optimizers() is None
    assert icl.training_step({}, 0) is None
    context = "Examples:\nText: good\nAnswer: yes\nText: bad\nAnswer: no\n\n"
    assert icl.context() == context
    batch = batch_for(icl, ["fine?"], [0])
    with torch.no_grad():
        expected = plain.label_scores(batch_for(plain, [context + "fine?"], [0]))
        assert torch.allclose(icl.label_scores(batch), expected, atol=1e-6)
        assert not torch.allclose(icl.label_scores(batch), plain.label_scores(batch), atol=1e-4)
    assert icl.export_init_args()["demonstrations"] == demos


def test_interleave_alternates_labels_and_caps():
    rows = [{"text": str(i), "label": lab} for i, lab in enumerate("aaabbc")]
    assert [r["text"] for r in interleave(rows, 5)] == ["0", "3", "5", "1", "4"]


@pytest.mark.parametrize("bad", [{"zzz": ["x"]}])
def test_label_words_for_unknown_labels_is_a_config_error(bad):
    from zoo.errors import ConfigError

    with pytest.raises(ConfigError, match="not in labels"):
        ClassificationModule(model="tiny-llama", labels=["yes", "no"], label_words=bad, export=False)


def test_single_token_scores_softmax_equals_the_head_logits_restricted_to_the_label_tokens():
    from zoo.modules.classification import Verbalizer

    torch.manual_seed(0)
    module = ClassificationModule(model="tiny-llama", labels=["yes", "no"], export=False)
    tok = module.tokenizer
    verbalizer = Verbalizer(["a", "b", "c"]).bind(tok)
    prompt = tok("pick one: ")["input_ids"]
    with torch.no_grad():
        scores = verbalizer.score(module.forward_hidden, module.lm_head_weight(), [prompt], tok.pad_token_id)
        logits = module.model(input_ids=torch.tensor([prompt])).logits[0, -1]
    ids = [w[0] for w in verbalizer.word_ids]
    assert torch.allclose(scores.softmax(-1)[0], logits[ids].softmax(-1), atol=1e-5)


def test_reduced_vocab_head_normalises_over_the_label_tokens_and_trains():
    torch.manual_seed(0)
    pet = PETClassifier(model="tiny-llama", labels=["yes", "no"], head="reduced_vocab", export=False,
                        adapter=ParallelAdapters(placement="ffn", bottleneck=4, scale=1.0))
    head = pet.verbalizer.reduced_head
    vocab = pet.verbalizer.vocab.tolist()
    assert vocab == sorted({t for w in pet.verbalizer.word_ids for t in w})
    hidden = torch.randn(3, pet.model.config.hidden_size)
    total = sum(pet.verbalizer.token_logprobs(hidden, torch.full((3,), t), pet.lm_head_weight()).exp()
                for t in vocab)
    assert torch.allclose(total, torch.ones(3), atol=1e-5)  # a distribution over T, not the vocabulary
    names = {f"verbalizer.reduced_head.{n}" for n, _ in head.named_parameters()}
    assert names <= set(pet.trainable_parameters())
    batch = batch_for(pet, ["is it?"], [1])
    pet.compute_loss(batch, pet(batch), None).backward()
    assert head[-1].weight.grad is not None and head[-1].weight.grad.abs().sum() > 0
