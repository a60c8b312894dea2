"""CPT (spec 08): invariants and a cross-check against peft's own CPTEmbedding on the same tensors."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from zoo.modules.classification.cpt import (
    CPTModule,
    build_example,
    cpt_epsilon,
    cpt_loss,
    decay_weights,
    label_position_loss,
    project_deltas,
)

TYPES = [1, 1, 2, 2, 2, 3, 4, 5, 6, 6, 7, 8, 8, 9, 10, 11, 12]  # 3 examples (one 2-token label)


def peft_embedding(types: list[int], dim: int, decay: float = 0.5, eps: float = 0.2, fmt: float = 0.1):
    from peft import CPTConfig
    from peft.tuners.cpt.model import CPTEmbedding

    config = CPTConfig(cpt_token_ids=list(range(len(types))), cpt_tokens_type_mask=types,
                       opt_weighted_loss_type="decay", opt_loss_decay_factor=decay,
                       opt_projection_epsilon=eps, opt_projection_format_epsilon=fmt, task_type="CAUSAL_LM")
    config.token_dim = dim  # peft sets it from the model in get_peft_model
    words = torch.nn.Embedding(50, dim)
    return CPTEmbedding(config, words), config, words


def test_epsilon_and_projection_equal_peft():
    torch.manual_seed(0)
    dim = 64
    reference, _, _ = peft_embedding(TYPES, dim)
    types = torch.tensor(TYPES)
    assert torch.allclose(cpt_epsilon(types, 0.2, 0.1, dim), reference.get_epsilon())
    delta = torch.randn(len(TYPES), dim) * 0.05
    delta[3] = 0.0  # zero rows are skipped
    reference.delta_embedding.weight.data = delta.clone()
    expected = reference.get_projection()
    got = project_deltas(delta, cpt_epsilon(types, 0.2, 0.1, dim))
    assert torch.allclose(got, expected)
    norms = got.norm(dim=-1)
    assert (norms <= cpt_epsilon(types, 0.2, 0.1, dim) + 1e-6).all()


def test_embedding_and_label_gradient_mask_equal_peft():
    torch.manual_seed(0)
    dim = 16
    reference, _, words = peft_embedding(TYPES, dim)
    indices = torch.arange(len(TYPES))
    assert torch.equal(reference(indices), words(indices).float())  # E_c + 0 at the start
    model = CPTModule(model="tiny-llama", labels=["yes", "no"], export=False, max_context_tokens=32)
    model.adapter.types[: len(TYPES)] = torch.tensor(TYPES)
    grad = torch.randn(32, model.adapter.delta.shape[1])
    masked = model.adapter._mask_gradient(grad)
    reference.delta_embedding.weight.grad = None
    (reference(indices) * grad[: len(TYPES), :dim]).sum().backward()
    peft_rows = reference.delta_embedding.weight.grad.abs().sum(-1) > 0
    assert torch.equal(masked[: len(TYPES)].abs().sum(-1) > 0, peft_rows)
    assert not masked[len(TYPES):].any()  # unused rows never train


def test_loss_equals_peft_and_hand_decay_weights():
    torch.manual_seed(0)
    _, config, _ = peft_embedding(TYPES, 8, decay=0.5)
    types = torch.tensor([TYPES])
    ids = torch.randint(0, 20, types.shape)
    labels = torch.where((types % 4 == 0), ids, torch.full_like(ids, -100))
    logits = torch.randn(1, len(TYPES), 20)
    from peft.tuners.cpt.model import CPTEmbedding

    expected = CPTEmbedding.calculate_loss(SimpleNamespace(logits=logits), labels, types, config).loss
    assert float(cpt_loss(logits, labels, types, 0.5)) == pytest.approx(float(expected), abs=1e-6)
    # label groups 4, 8, 12 (+ a query group 16): weights 0.125, 0.25, 0.5, 1.0 (spec small-scale check)
    four = torch.tensor([[1, 4, 5, 8, 9, 12, 13, 16]])
    assert decay_weights(four, 0.5)[0, [1, 3, 5, 7]].tolist() == [0.125, 0.25, 0.5, 1.0]
    hidden = torch.randn(1, len(TYPES), 6)
    head = (torch.randn(20, 6), None)
    full = cpt_loss(torch.nn.functional.linear(hidden, head[0]), labels, types, 0.5)
    assert float(label_position_loss(hidden, labels, types, head, 0.5, "decay")) == pytest.approx(float(full))


def test_build_example_type_ids_are_one_based_per_example():
    from zoo import backbone

    tok = backbone.load_tokenizer("tiny-llama")
    ids, types = build_example(tok, "ab", [7, 8], 2, "I:", "O:", "\n")
    assert types == [5] * 3 + [6] * 2 + [7] * 2 + [8] * 2 and ids[-2:] == [7, 8]


def test_training_keeps_label_rows_and_deltas_inside_their_balls():
    torch.manual_seed(0)
    context = [{"text": "good film", "label": "yes"}, {"text": "bad film", "label": "no"}]
    module = CPTModule(model="tiny-llama", labels=["yes", "no"], context=context, export=False,
                       max_context_tokens=64, epsilon=0.5, format_epsilon=0.3).double()
    adapter = module.adapter
    n = int(adapter.length)
    label_tokens = len(module.label_ids("yes") + module.label_ids("no"))
    assert n > 0 and int(label_rows_count(adapter.types)) == label_tokens
    optimizer = torch.optim.AdamW([adapter.delta], lr=0.5, weight_decay=0.01)
    batch = {"text": ["good film", "bad film"], "class_index": torch.tensor([0, 1])}
    base_before = adapter.base.clone()
    for _ in range(3):
        optimizer.zero_grad()
        module.compute_loss(batch, None, None).backward()
        optimizer.step()
        adapter.project()
    labels = (adapter.types > 0) & (adapter.types % 4 == 0)
    assert not adapter.delta[labels].any()  # label rows never change
    assert not adapter.delta[n:].any()
    norms = adapter.delta.norm(dim=-1)
    assert (norms <= adapter.radii().double() + 1e-9).all()
    trained = (adapter.types[:n] > 0) & ~labels[:n]
    assert (norms[:n][trained] > 0).any()
    assert torch.equal(adapter.base, base_before)
    scale = math.sqrt(adapter.base.shape[1] / 2048)
    assert float(norms[:n][adapter.types[:n] % 4 == 2].max()) <= 0.5 * scale + 1e-9


def label_rows_count(types):
    return ((types > 0) & (types % 4 == 0)).sum()


def test_zero_deltas_score_like_plain_icl_with_the_same_context_string():
    from zoo.modules.classification import ClassificationModule

    torch.manual_seed(0)
    context = [{"text": "good", "label": "yes"}]
    cpt = CPTModule(model="tiny-llama", labels=["yes", "no"], context=context, export=False,
                    max_context_tokens=64)
    plain = ClassificationModule(model="tiny-llama", labels=["yes", "no"], export=False)
    plain._build_verbalizer(["yes", "no"])
    plain.verbalizer.prefix = " "
    plain.verbalizer.bind(plain.tokenizer)
    ctx_ids = cpt.adapter.ids[: int(cpt.adapter.length)].tolist()
    query = cpt.query("fine", None)[0]
    with torch.no_grad():
        got = cpt.label_scores({"text": ["fine"]})
        expected = plain.verbalizer.score(plain.forward_hidden, plain.lm_head_weight(), [ctx_ids + query],
                                          plain.tokenizer.pad_token_id)
    assert torch.allclose(got, expected, atol=1e-5)


def test_score_prompts_reads_raw_texts_in_the_cpt_template():
    torch.manual_seed(0)
    cpt = CPTModule(model="tiny-llama", labels=["yes", "no"], context=[{"text": "good", "label": "yes"}],
                    export=False, max_context_tokens=64)
    with torch.no_grad():
        direct = cpt.label_scores({"text": ["fine", "awful"]})
    assert torch.allclose(cpt.score_prompts(["fine", "awful"], calibrated=False), direct, atol=1e-6)
    assert cpt.predict_labels(["fine"])[0] in ("yes", "no")
