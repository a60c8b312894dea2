"""PTEC invariants: last real token under any padding, pos_weight BCE by hand, the trie decoder's
constraint."""

from __future__ import annotations

import math

import torch

from zoo.modules.classification.ptec import (
    TokenTrie,
    class_pos_weight,
    label_token_init,
    last_real_index,
    ptec_loss,
    trie_greedy_decode,
)


def test_last_real_index_under_left_and_right_padding():
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]])
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    assert last_real_index(left).tolist() == [3, 3, 3]
    assert last_real_index(right).tolist() == [1, 3, 0]


def test_pos_weight_bce_matches_a_hand_computed_2x3_batch():
    targets = torch.tensor([[1.0, 0.0, 1.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    weight = class_pos_weight(targets)  # counts 3, 1, 1 -> 1, 3, 3
    assert weight.tolist() == [1.0, 3.0, 3.0]
    logits = torch.tensor([[0.5, -1.0, 2.0], [-0.3, 0.2, 0.0]])
    y = targets[:2]
    total = 0.0
    for b in range(2):
        for c in range(3):
            sig = 1 / (1 + math.exp(-logits[b, c].item()))
            w, t = weight[c].item(), y[b, c].item()
            total += -(w * t * math.log(sig) + (1 - t) * math.log(1 - sig))
    assert abs(ptec_loss(logits, y, weight).item() - total / 6) < 1e-6


def test_ptec_loss_is_invariant_to_the_order_labels_are_listed_in():
    logits = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))
    listed = [["b", "a"], ["d"]]
    other_order = [["a", "b"], ["d"]]
    classes = ["a", "b", "c", "d"]

    def multi_hot(rows):
        return torch.tensor([[float(c in r) for c in classes] for r in rows])

    assert torch.equal(ptec_loss(logits, multi_hot(listed)), ptec_loss(logits, multi_hot(other_order)))


def test_label_token_init_takes_label_rows_then_fill_rows():
    table = torch.arange(40, dtype=torch.float32).view(10, 4)
    init = label_token_init(table, [[3, 4], [4, 5]], length=5, fill_ids=[9, 8])
    assert init[:, 0].tolist() == [12.0, 16.0, 20.0, 36.0, 32.0]  # rows 3, 4, 5 (distinct), then 9, 8
    subset = label_token_init(table, [[1, 2, 3], [4, 5]], length=2, fill_ids=[0], seed=1)
    assert subset.shape == (2, 4) and set((subset[:, 0] / 4).long().tolist()) <= {1, 2, 3, 4, 5}


# ---------------------------------------------------------------------------- the trie decoder
V, EOS, SEP = 12, 0, [9, 10]
LABELS = [[1, 2], [1, 3], [4], [1]]  # "1" is a prefix of two other labels


def _logits(context: tuple[int, ...]) -> torch.Tensor:
    """Deterministic pseudo-random next-token logits of a context (a causal 'model')."""
    seed = hash(context) % (2**31)
    return torch.randn(V, generator=torch.Generator().manual_seed(seed))


def _score(emitted, continuations):
    return [torch.stack([_logits(tuple(emitted) + tuple(c[:j])) for j in range(len(c))])
            for c in continuations]


def _reference(max_labels=None):
    """Step-by-step constrained greedy: allowed tokens computed from the label strings directly."""
    out: list[int] = []
    used: list[int] = []
    limit = max_labels or len(LABELS)
    while True:
        last = len(used) + 1 >= limit or len(used) == len(LABELS) - 1
        ends = [[EOS]] if last else [SEP, [EOS]]
        full = [LABELS[i] + e for i in range(len(LABELS)) if i not in used for e in ends]
        current: list[int] = []
        while current not in full:
            allowed = sorted({f[len(current)] for f in full
                              if f[:len(current)] == current and len(f) > len(current)})
            logits = _logits(tuple(out + current))
            current.append(max(allowed, key=lambda t: logits[t].item()))
        used.append(next(i for i in range(len(LABELS)) for e in ends if LABELS[i] + e == current))
        out += current
        if current[-1] == EOS:
            return used, out


def test_trie_decoder_equals_stepwise_constrained_greedy_and_emits_only_label_strings():
    for max_labels in (None, 2):
        chosen, emitted = trie_greedy_decode(_score, LABELS, SEP, EOS, max_labels=max_labels)
        assert (chosen, emitted) == _reference(max_labels)
        assert len(set(chosen)) == len(chosen) and emitted[-1] == EOS
        rebuilt = [t for k, i in enumerate(chosen)
                   for t in LABELS[i] + (SEP if k < len(chosen) - 1 else [EOS])]
        assert emitted == rebuilt
    # the constraint matters: the unconstrained argmax after the empty context is no label's first token
    assert int(_logits(()).argmax()) not in {1, 4}


def test_token_trie_children():
    trie = TokenTrie([[1, 2, 0], [1, 3], [4]])
    assert trie.children([]) == [1, 4]
    assert trie.children([1]) == [2, 3]
    assert trie.children([1, 2, 0]) == [] and trie.is_complete([1, 3]) and not trie.is_complete([1])


# ---------------------------------------------------------------------------- the module
def _module(**kwargs):
    from zoo.modules.adapters import PromptTuning
    from zoo.modules.classification.ptec import PTECClassifier

    return PTECClassifier(model="tiny-llama", labels=["energy", "media", "retail"], export=False,
                          adapter=PromptTuning(num_virtual_tokens=4), **kwargs)


def test_head_sees_the_last_real_token_under_left_padding():
    module = _module().eval()
    short, long = [40, 41, 42, 43], [50, 51, 52, 53, 54, 55, 56, 57, 58]
    batched = module.head_logits([short, long])
    # reference without padding: the soft prompt + the short row alone, hidden state of its final column
    ids = torch.tensor([short])
    hidden = module.forward_hidden({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    reference = module.head(hidden[0, -1])
    assert torch.allclose(batched[0], reference, atol=1e-5)
    # a head reading the last column of a RIGHT-padded batch would see a pad token: it differs
    right = torch.tensor([short + [module.tokenizer.pad_token_id] * 5, long])
    mask = torch.tensor([[1] * 4 + [0] * 5, [1] * 9])
    wrong = module.head(module.forward_hidden({"input_ids": right, "attention_mask": mask})[0, -1])
    assert not torch.allclose(wrong, reference, atol=1e-3)


def test_soft_prompt_starts_from_the_label_tokens_and_multi_label_loss_is_pos_weighted_bce():
    module = _module()
    table = module.model.get_input_embeddings().weight
    label_ids = {t for w in ("energy", "media", "retail")
                 for t in module.tokenizer(w, add_special_tokens=False)["input_ids"]}
    rows = module.adapter.soft_prompt.weight.detach()  # p = 4 < 10 distinct label tokens: a subset of them
    matched = [next(i for i in range(table.shape[0]) if torch.equal(table[i], row)) for row in rows]
    assert set(matched) <= label_ids and len(set(matched)) == 4
    module.multi_label = True
    module.class_weight = torch.tensor([1.0, 2.0, 4.0])
    logits = torch.tensor([[0.3, -2.0, 25.0], [-0.4, 1.5, -30.0]], dtype=torch.float64)
    targets = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    got = module.classification_loss(module.scores_from_logits(logits), {"targets": targets})
    expected = torch.nn.functional.binary_cross_entropy_with_logits(
        logits, targets.double(), pos_weight=torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64))
    assert torch.allclose(got, expected, atol=1e-8)


def test_trie_decoder_on_a_module_returns_only_taxonomy_labels_without_repeats():
    from zoo.modules.classification.ptec import TrieConstrainedDecoder

    module = _module()
    decoder = TrieConstrainedDecoder(module, ["energy", "media", "retail", "re"], separator=", ")
    for labels in decoder.decode(["Company: Lumen Ltd sells battery storage.", "x"]):
        assert labels and set(labels) <= {"energy", "media", "retail", "re"}
        assert len(set(labels)) == len(labels)


def test_trie_scorer_logits_equal_a_direct_unpadded_forward():
    from zoo.modules.classification.ptec import TrieConstrainedDecoder

    module = _module().eval()
    decoder = TrieConstrainedDecoder(module, ["energy", "media"], separator=", ")
    prompt, emitted = [60, 61, 62], [70, 71]
    continuations = [[80, 81, 82, 83], [90]]  # different lengths: the short row is left-padded
    got = decoder._scorer(prompt)(emitted, continuations)
    weight, _ = module.lm_head_weight()
    for c, logits in zip(continuations, got):
        ids = torch.tensor([prompt + emitted + c])
        hidden = module.forward_hidden({"input_ids": ids, "attention_mask": torch.ones_like(ids)})[0]
        start = len(prompt) + len(emitted) - 1  # the column predicting c[0]
        assert torch.allclose(logits, hidden[start: start + len(c)] @ weight.T, atol=1e-5)
