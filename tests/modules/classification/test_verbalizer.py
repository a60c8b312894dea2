"""Verbalizer, ClassificationModule and BlackBoxClassifier invariants (issue 14 shared pieces)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from zoo import backbone
from zoo.modules.classification import ClassificationModule, Verbalizer
from zoo.modules.classification.blackbox import BlackBoxClassifier, LocalBlackBox
from zoo.modules.classification.module import first_supervised, log_odds


@pytest.fixture(scope="module")
def module():
    torch.manual_seed(0)
    return ClassificationModule(model="tiny-llama", labels=["yes", "no"], export=False).double()


def hand_logprob(model, prompt: list[int], word: list[int]) -> float:
    """Teacher-forced log p(word | prompt) from the full-sequence logits of the plain backbone."""
    ids = torch.tensor([prompt + word])
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0].double().log_softmax(-1)
    return sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(word))


def test_multi_token_label_scores_equal_hand_teacher_forced_logprob(module):
    tok = module.tokenizer
    prompts = [tok("Is it good? ")["input_ids"], tok("A longer prompt here: ")["input_ids"]]
    verbalizer = Verbalizer(["pos", "neg"], {"pos": ["great"], "neg": ["bad"]}).bind(tok).double()
    assert not verbalizer.single_token
    with torch.no_grad():
        got = verbalizer.word_logprobs(module.forward_hidden, module.lm_head_weight(), prompts,
                                       tok.pad_token_id)
        for b, prompt in enumerate(prompts):
            for w, word in enumerate(verbalizer.word_ids):
                assert float(got[b, w]) == pytest.approx(hand_logprob(module.model, prompt, word), abs=1e-9)


@pytest.mark.parametrize("length_norm", [False, True])
def test_cached_prompt_path_equals_the_teacher_forced_one(module, length_norm):
    """Eval-time scoring runs each prompt once and reuses its KV cache for every word (left-padded prompts
    of different lengths, words of 1 to several tokens): the same log-probabilities as teacher forcing."""
    tok = module.tokenizer
    prompts = [tok("Is it good? ")["input_ids"], tok("A much longer prompt goes here: ")["input_ids"],
               tok("x")["input_ids"]]
    words = {"pos": ["great", "splendid news"], "neg": ["b", "terrible and awful"]}
    verbalizer = Verbalizer(["pos", "neg"], words, length_norm=length_norm).bind(tok).double()
    assert sorted({len(w) for w in verbalizer.word_ids})[0] == 1 and not verbalizer.single_token
    with torch.no_grad():
        forced = verbalizer.word_logprobs(module.forward_hidden, module.lm_head_weight(), prompts,
                                          tok.pad_token_id)
        calls = []
        decoder = backbone.decoder(module.model)
        handle = decoder.register_forward_hook(lambda m, a, k, o: calls.append(k["inputs_embeds"].shape[:2]),
                                               with_kwargs=True)
        try:
            cached = verbalizer.word_logprobs(module.forward_hidden, module.lm_head_weight(), prompts,
                                              tok.pad_token_id, hooks=module.prefix_cache_hooks())
        finally:
            handle.remove()
    assert torch.allclose(cached, forced, atol=1e-9)
    longest = max(len(w) for w in verbalizer.word_ids)
    assert calls == [(3, max(len(p) for p in prompts)), (3 * 4, longest - 1)]  # prompts once, then words


def _lora():
    from zoo.modules.adapters import LoRA

    return LoRA(r=2, lora_alpha=4, lora_dropout=0.0, target_modules="all-linear")


def _soft(name: str):
    def build():
        from zoo.modules.adapters import Peft
        from zoo.modules.prompting.apt import APT
        from zoo.modules.prompting.dept import DePT
        from zoo.modules.prompting.iapt import IAPT
        from zoo.modules.prompting.prompt_tuning import PrefixTuning, PromptTuning

        return {"prompt_tuning": lambda: PromptTuning(num_virtual_tokens=3),
                "prefix_tuning": lambda: PrefixTuning(num_virtual_tokens=3),
                "dept": lambda: DePT(num_virtual_tokens=2, rank=2, max_seq_length=64),
                "apt": lambda: APT(num_virtual_tokens=2, rank=2),
                "iapt": lambda: IAPT(num_virtual_tokens=2, bottleneck=4),
                "peft_prompt_tuning": lambda: Peft({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 3}),
                "peft_prefix_tuning": lambda: Peft({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 3}),
                }[name]()
    return build


@pytest.mark.parametrize("make_adapter", [_lora] + [_soft(n) for n in (
    "prompt_tuning", "prefix_tuning", "dept", "apt", "iapt", "peft_prompt_tuning", "peft_prefix_tuning")],
    ids=["lora", "prompt_tuning", "prefix_tuning", "dept", "apt", "iapt", "peft_prompt_tuning",
         "peft_prefix_tuning"])
def test_cached_prompt_path_has_the_teacher_forced_scores_and_gradients(make_adapter):
    """Training uses the cached path too, for every adapter family (weights-only LoRA, shallow and deep soft
    prompts, DePT's position offsets, APT's prefix, peft's own prompt learning): the adapter's
    ``prefill`` / ``step_embeddings`` rebuild what its forward sees, so scores and the loss's gradients on
    every trainable tensor equal those of teacher forcing (B x W full rows)."""
    torch.manual_seed(0)
    words = {"pos": ["great", "splendid news"], "neg": ["terrible and awful"]}
    module = ClassificationModule(model="tiny-llama", labels=["pos", "neg"], export=False,
                                  adapter=make_adapter(), label_words=words)
    module = module.double()
    with torch.no_grad():  # zero-initialised tensors (LoRA's B, DePT's B) would hide their partners' grads
        for param in module.parameters():
            if param.requires_grad and not param.any():
                param.normal_(0, 0.05)
    tok, verbalizer = module.tokenizer, module.verbalizer
    prompts = [tok("Is it good? ")["input_ids"], tok("A much longer prompt goes here: ")["input_ids"]]
    trainable = [p for p in module.parameters() if p.requires_grad]

    def grads(hooks):
        scores = verbalizer.score(module.forward_hidden, module.lm_head_weight(), prompts, tok.pad_token_id,
                                  hooks=hooks)
        loss = torch.nn.functional.cross_entropy(scores, torch.tensor([0, 1]))
        return torch.autograd.grad(loss, trainable, allow_unused=True), scores.detach()

    forced, forced_scores = grads(None)
    cached, cached_scores = grads(module.prefix_cache_hooks())
    assert module.prefix_cache_hooks() is module.adapter and len(trainable) > 0
    assert torch.allclose(cached_scores, forced_scores, atol=1e-9)
    assert any(g is not None and g.abs().sum() > 0 for g in forced)
    # RMSNorm computes in float32 even for double inputs: agreement is to float32 rounding of each tensor
    for a, b in zip(cached, forced):
        assert (a is None) == (b is None)
        if b is not None:
            assert float((a - b).abs().max()) <= 1e-5 * float(b.abs().max()) + 1e-12


@pytest.mark.parametrize("name", ["iapt", "prompt_tuning", "dept"])
def test_single_token_words_score_like_the_cached_prompt(name):
    """The single-token fast path (one forward of the prompts, the hidden state at each prompt's end) equals
    prefill + one step for every row, the longest included: IAPT puts its virtual tokens after the prompt,
    so the state that predicts the label word is the last virtual token's, not the prompt's last token's."""
    torch.manual_seed(0)
    module = ClassificationModule(model="tiny-llama", labels=["a", "b", "c"], export=False,
                                  adapter=_soft(name)()).double()
    with torch.no_grad():
        for param in module.parameters():
            if param.requires_grad and not param.any():
                param.normal_(0, 0.05)
    tok, verbalizer = module.tokenizer, module.verbalizer
    assert verbalizer.single_token
    prompts = [tok("Is it good? ")["input_ids"], tok("A much longer prompt goes here: ")["input_ids"]]
    with torch.no_grad():
        fast = verbalizer.word_logprobs(module.forward_hidden, module.lm_head_weight(), prompts,
                                        tok.pad_token_id)
        cached = verbalizer.cached_word_logprobs(module.prefix_cache_hooks(), module.lm_head_weight(),
                                                 prompts, tok.pad_token_id)
    assert torch.allclose(fast, cached, atol=1e-9)


def test_a_module_with_its_own_forward_takes_the_teacher_forced_path():
    class OwnForward(ClassificationModule):
        def forward_hidden(self, batch):
            return super().forward_hidden(batch)

    module = OwnForward(model="tiny-llama", labels=["yes", "no"], export=False)
    assert module.prefix_cache_hooks() is None  # the adapter's hooks cannot know what the override does


def test_single_token_fast_path_equals_hand_logprob(module):
    tok = module.tokenizer
    verbalizer = Verbalizer(["a", "b"]).bind(tok).double()  # byte tokenizer: one token each
    assert verbalizer.single_token
    prompts = [tok("xyz")["input_ids"], tok("hello there")["input_ids"]]
    with torch.no_grad():
        got = verbalizer.word_logprobs(module.forward_hidden, module.lm_head_weight(), prompts,
                                       tok.pad_token_id)
    for b, prompt in enumerate(prompts):
        for w, word in enumerate(verbalizer.word_ids):
            assert float(got[b, w]) == pytest.approx(hand_logprob(module.model, prompt, word), abs=1e-9)


def test_weighted_verbalizer_with_one_word_per_label_equals_plain():
    word_lp = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -0.1, -2.2]], dtype=torch.float64)
    plain = Verbalizer(["x", "y", "z"])
    plain.word_label, plain.word_weight = [0, 1, 2], torch.ones(3, dtype=torch.float64)
    for aggregate in ("logsumexp", "mean"):
        words = {"x": {"x": 5.0}, "y": {"y": 0.2}, "z": ["z"]}
        weighted = Verbalizer(["x", "y", "z"], words, aggregate=aggregate)
        weighted.word_label = [0, 1, 2]
        weighted.word_weight = torch.tensor([weighted.words[c][c] for c in "xyz"], dtype=torch.float64)
        assert torch.equal(weighted.label_scores(word_lp), word_lp)
        assert torch.equal(plain.label_scores(word_lp), word_lp)


def test_two_weighted_words_mix_probabilities_by_hand():
    verbalizer = Verbalizer(["x", "y"], {"x": {"good": 3.0, "fine": 1.0}, "y": ["bad"]})
    verbalizer.word_label = [0, 0, 1]
    verbalizer.word_weight = torch.tensor([0.75, 0.25, 1.0], dtype=torch.float64)
    word_lp = torch.tensor([[math.log(0.2), math.log(0.4), math.log(0.1)]], dtype=torch.float64)
    scores = verbalizer.label_scores(word_lp)
    assert float(scores[0, 0]) == pytest.approx(math.log(0.75 * 0.2 + 0.25 * 0.4))
    assert float(scores[0, 1]) == pytest.approx(math.log(0.1))
    verbalizer.aggregate = "mean"
    expected = 0.75 * math.log(0.2) + 0.25 * math.log(0.4)
    assert float(verbalizer.label_scores(word_lp)[0, 0]) == pytest.approx(expected)


def test_calibration_with_a_uniform_prior_changes_nothing_and_divides_by_the_prior():
    verbalizer = Verbalizer(["a", "b", "c"]).double()
    scores = torch.tensor([[-1.0, -2.0, -4.0], [-0.3, -0.2, -5.0]], dtype=torch.float64)
    assert torch.allclose(verbalizer.calibrate(scores).softmax(-1), scores.softmax(-1))
    # prior 0.2, 0.6, 0.2
    verbalizer.set_prior(torch.tensor([[0.0, math.log(3.0), 0.0]], dtype=torch.float64))
    assert torch.allclose(verbalizer.prior, torch.tensor([0.2, 0.6, 0.2], dtype=torch.float64))
    p = scores.softmax(-1)
    expected = (p / verbalizer.prior) / (p / verbalizer.prior).sum(-1, keepdim=True)
    assert torch.allclose(verbalizer.calibrate(scores).softmax(-1), expected)


def test_classification_loss_is_ce_over_hand_label_scores(module):
    tok = module.tokenizer
    prompts = [tok("ab")["input_ids"], tok("cdef")["input_ids"]]
    rows = [p + tok("yes")["input_ids"] for p in prompts]
    width = max(map(len, rows))
    batch = {"input_ids": torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows]),
             "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
             "class_index": torch.tensor([0, 1])}
    batch["labels"] = torch.tensor([[-100] * len(p) + r[len(p):] + [-100] * (width - len(r))
                                    for p, r in zip(prompts, rows)])
    assert first_supervised(batch["labels"]).tolist() == [len(p) for p in prompts]
    with torch.no_grad():
        loss = module.compute_loss(batch, module(batch), None)
    hand = torch.tensor([[hand_logprob(module.model, p, tok(w)["input_ids"]) for w in ("yes", "no")]
                         for p in prompts], dtype=torch.float64)
    assert float(loss) == pytest.approx(float(F.cross_entropy(hand, torch.tensor([0, 1]))), abs=1e-9)


def test_multi_label_logits_are_log_odds_of_the_word_probability():
    p = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    assert torch.allclose(log_odds(p.log()), torch.log(p / (1 - p)))


def test_black_box_never_builds_a_graph_and_restores_the_mode():
    from zoo import backbone

    model, tok = backbone.load("tiny-llama")
    model.train()
    seen: list[bool] = []
    box = LocalBlackBox(model, labels=["yes", "no"], tokenizer=tok)
    inner = box.hidden_fn

    def spy(batch):
        seen.append(torch.is_grad_enabled())
        seen.append(model.training)
        return inner(batch)

    box.hidden_fn = spy
    out = box.label_logprobs(["Is this fine?", "No way", "x"])
    assert isinstance(box, BlackBoxClassifier)
    assert out.shape == (3, 2) and not out.requires_grad and out.grad_fn is None
    assert torch.allclose(out.exp().sum(-1), torch.ones(3))
    assert seen and not any(seen)  # grad disabled and eval mode inside every forward
    assert model.training and all(p.grad is None for p in model.parameters())
    assert box.queries == 3


def test_training_with_multi_token_words_skips_the_unused_sequence_forward():
    """The training step's sequence forward is deferred: with multi-token words the loss comes from the
    prompt cache, so the decoder runs twice (prompts, then words), and the loss equals the eager one."""
    from zoo.datamodules.classification import ClassificationDataModule

    torch.manual_seed(0)
    words = {"pos": ["great", "splendid news"], "neg": ["terrible and awful"]}
    module = ClassificationModule(model="tiny-llama", labels=["pos", "neg"], export=False, label_words=words)
    data = ClassificationDataModule(dataset="sentiment_hard", tokenizer="tiny-llama", shots_per_class=2,
                                    num_train=40, num_val=4, num_test=4, batch_size=4, max_length=256)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    batch = {**batch, "class_index": batch["class_index"] % 2}
    calls = []
    handle = backbone.decoder(module.model).register_forward_hook(lambda *a: calls.append(1))
    try:
        outputs = module(batch)
        deferred = module.compute_loss(batch, outputs, torch.ones(1))
    finally:
        handle.remove()
    assert len(calls) == 2 and not outputs.computed
    eager = module.classification_loss(module.label_scores(batch, None), batch)
    assert torch.allclose(deferred, eager)
    assert outputs.hidden.shape[:2] == batch["input_ids"].shape and outputs.computed  # read: it runs


def test_deferred_hidden_keeps_the_grad_mode_of_its_step():
    """Selectors read ``per_token_loss`` under no_grad first; the hidden states a loss then reuses must
    still carry the step's graph."""
    from zoo.modules.base import DeferredStepOutputs

    module = ClassificationModule(model="tiny-llama", labels=["a", "b"], export=False)
    ids = torch.tensor([[5, 6, 7, 8]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "labels": torch.tensor([[-100, -100, 7, 8]])}
    outputs = DeferredStepOutputs(module, batch)
    with torch.no_grad():
        outputs.per_token_loss()
    assert outputs.hidden.requires_grad
