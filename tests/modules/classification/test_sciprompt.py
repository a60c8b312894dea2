"""SciPrompt invariants: the builder's threshold rule, the weighted verbalizer's reductions, calibration."""

from __future__ import annotations

import json

import pytest
import torch

from zoo.modules.classification.sciprompt import (
    FIELD_SENTENCE,
    SciPromptModule,
    calibrated_word_log_probs,
    filter_terms,
    low_prior_words,
    slot_word_logits,
    soft_verbalizer_init,
    weighted_label_scores,
)


def _similarity(table):
    """A hand-made bi-encoder: similarity looked up by (class sentence, term sentence)."""

    def similarity(a, b):
        return torch.tensor([[table.get((x, y), 0.0) for y in b] for x in a], dtype=torch.float64)

    return similarity


def test_builder_keeps_terms_by_the_threshold_rule_offline():
    s = lambda phrase: FIELD_SENTENCE.format(phrase=phrase)  # noqa: E731
    table = {(s("genetics"), s("genes")): 0.9, (s("genetics"), s("dna")): 0.7,
             (s("genetics"), s("pasta")): 0.2,
             (s("genetics"), s("heredity")): 1.3, (s("genetics"), s("crispr")): 0.8,
             (s("ecology"), s("genes")): 0.95, (s("ecology"), s("species")): 0.6}
    candidates = {"genetics": [("genes", 0.9), ("dna", 0.5), ("pasta", 0.1), ("heredity", 0.4), ("ab", 0.9),
                               ("crispr", 0.6), ("mutation", -0.2)],
                  "ecology": [("genes", 0.3), ("species", 0.8)]}
    ce = {"genetics": {"crispr": 0.95, "dna": 0.2}}
    kept = filter_terms(candidates, _similarity(table), semantic_threshold=0.5, ce_threshold=0.9,
                        ce_scores=ce)
    # pasta: s <= 0.5; ab: shorter than 3; mutation: relatedness <= 0; crispr: cross-encoder c >= 0.9;
    # heredity: s clipped at 1; genes already kept for genetics, so not for ecology
    assert kept == {"genetics": [("genes", 0.9), ("dna", 0.7), ("heredity", 1.0)],
                    "ecology": [("species", 0.6)]}


def test_weighted_scores_reduce_to_the_plain_verbalizer_and_to_a_single_word():
    log_p = torch.tensor([[-0.5, -1.5, -2.0, -3.0]]).log_softmax(-1)
    one_each = weighted_label_scores(log_p, torch.tensor([0, 1, 2, 3]), torch.ones(4), 4)
    assert torch.equal(one_each, log_p)
    # class 0 = words 0, 1 with weights 3:1; class 1 = words 2, 3 with a one-hot weight on word 3
    scores = weighted_label_scores(log_p, torch.tensor([0, 0, 1, 1]), torch.tensor([3.0, 1.0, 0.0, 2.0]), 2)
    assert torch.allclose(scores, torch.stack([0.75 * log_p[:, 0] + 0.25 * log_p[:, 1], log_p[:, 3]], -1))


def test_uniform_prior_changes_nothing_and_a_prior_divides_and_renormalises():
    scores = torch.tensor([[0.3, -1.2, 2.0], [1.0, 1.0, -0.5]], dtype=torch.float64)
    assert torch.allclose(calibrated_word_log_probs(scores, torch.full((3,), 1 / 3, dtype=torch.float64)),
                          scores.log_softmax(-1), atol=1e-12)
    prior = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)
    p = scores.softmax(-1) / prior
    assert torch.allclose(calibrated_word_log_probs(scores, prior).exp(), p / p.sum(-1, keepdim=True))


def test_low_prior_filter_drops_exactly_the_words_with_a_bottom_token():
    prior = torch.tensor([5.0, -1.0, 3.0, -2.0, 0.5, 4.0, -0.5, 2.0, 1.0, -3.0])  # bottom half: 9, 3, 1, 6, 4
    words = [[0], [2, 3], [5, 7], [4], [8, 0]]
    assert low_prior_words(prior, words, 0.5) == [1, 3]


def test_soft_verbalizer_rows_are_the_weighted_mean_of_word_rows():
    table = torch.arange(12, dtype=torch.float32).view(6, 2)
    rows = soft_verbalizer_init(table, [[0], [1, 2], [5]], torch.tensor([0, 0, 1]),
                                torch.tensor([1.0, 3.0, 2.0]), 2)
    word1 = (table[1] + table[2]) / 2
    assert torch.allclose(rows, torch.stack([0.25 * table[0] + 0.75 * word1, table[5]]))


def test_module_with_one_word_per_label_scores_the_log_softmax_over_label_words(tmp_path):
    file = tmp_path / "verbalizer.json"
    file.write_text(json.dumps({"a": {}, "b": {}, "c": {}}))
    module = SciPromptModule(model="tiny-llama", labels=["a", "b", "c"], verbalizer_file=str(file),
                             export=False)
    module.eval()
    prompts = [[40, 41, 42], [50, 51, 52, 53, 54]]
    got = module.scores_from_hidden(prompts)
    ids = [module.tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in "abc"]
    for row, prompt in enumerate(prompts):  # reference: the LM's next-token logits, restricted to the words
        logits = module.model(input_ids=torch.tensor([prompt])).logits[0, -1]
        assert torch.allclose(got[row], logits[ids].log_softmax(-1), atol=1e-5)
    with torch.no_grad():
        module.word_prior.copy_(torch.tensor([0.2, 0.5, 0.3]))
    calibrated = module.scores_from_hidden(prompts)
    assert not torch.allclose(calibrated, got)


def test_a_multi_token_word_scores_the_mean_of_its_sub_token_logits_at_the_one_slot():
    logits = torch.tensor([[1.0, 2.0, 4.0, -1.0, 0.5], [0.0, -3.0, 3.0, 6.0, 1.0]])
    got = slot_word_logits(logits, [[2], [0, 3], [1, 4, 2]])
    expected = torch.tensor([[4.0, (1.0 - 1.0) / 2, (2.0 + 0.5 + 4.0) / 3],
                             [3.0, (0.0 + 6.0) / 2, (-3.0 + 1.0 + 3.0) / 3]])  # worked by hand
    assert torch.allclose(got, expected)


def test_module_scores_multi_token_words_from_one_forward_per_prompt(tmp_path):
    file = tmp_path / "verbalizer.json"
    file.write_text(json.dumps({"a": {"alpha beta": 0.9}, "b": {"gamma delta epsilon": 0.8}}))
    module = SciPromptModule(model="tiny-llama", labels=["a", "b"], verbalizer_file=str(file), export=False)
    module.eval()
    assert not module.verbalizer.single_token
    calls = []
    forward_hidden = module.forward_hidden
    module.forward_hidden = lambda batch: calls.append(batch["input_ids"].shape[0]) or forward_hidden(batch)
    prompts = [[40, 41, 42], [50, 51, 52, 53, 54]]
    got = module.scores_from_hidden(prompts)
    assert calls == [2]  # one row per prompt, not one per (prompt, word)
    words = module.verbalizer.word_ids
    for row, prompt in enumerate(prompts):  # reference: next-token logits, word = mean of its sub-tokens
        slot = module.model(input_ids=torch.tensor([prompt])).logits[0, -1]
        log_p = torch.stack([slot[ids].mean() for ids in words]).log_softmax(-1)
        alpha = module.verbalizer.word_weight
        label = torch.tensor(module.verbalizer.word_label)
        expected = torch.stack([(alpha[label == c] / alpha[label == c].sum() * log_p[label == c]).sum()
                                for c in range(2)])
        assert torch.allclose(got[row], expected, atol=1e-5)


@pytest.mark.slow
def test_minilm_filter_keeps_related_terms_and_drops_unrelated_ones():
    from zoo.modules.classification.sciprompt import encoder_similarity, minilm_encoder

    similarity = encoder_similarity(minilm_encoder())
    kept = filter_terms({"particle_physics": [("particles", 0.9), ("collider", 0.8), ("pasta", 0.5)]},
                        similarity, {"particle_physics": "particle physics"})
    assert [t for t, _ in kept["particle_physics"]] == ["particles", "collider"]
