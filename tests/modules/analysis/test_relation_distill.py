"""Token-relation distillation (spec 09): the loss's invariants against hand values, and the callback on the
tiny backbone through the module's auxiliary-loss hook."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from zoo.modules.analysis.relation_distill import (
    PROJECTOR_NAME,
    TokenRelationDistillation,
    repa_cosine_loss,
    token_relation_loss,
)


def features(b=2, t=7, d=5, seed=0):
    return torch.randn(b, t, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_zero_for_identical_features_at_any_margin():
    x = features()
    for margin in (0.0, 0.1, 0.3):
        assert token_relation_loss(x, x.clone(), margin=margin).item() == pytest.approx(0.0, abs=1e-12)


def test_invariant_to_a_common_rotation_and_token_rescaling_while_repa_is_not():
    x, y = features(seed=0), features(seed=1)
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    scale = torch.rand(2, 7, 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 0.5
    base = token_relation_loss(x, y, margin=0.05)
    assert base > 0.01
    assert torch.allclose(token_relation_loss((x @ q) * scale, y, margin=0.05), base, atol=1e-12)
    # a rotation applied to both sides also keeps it (relations only)
    assert torch.allclose(token_relation_loss(x @ q, y @ q, margin=0.05), base, atol=1e-12)
    assert not torch.allclose(repa_cosine_loss(x @ q, y), repa_cosine_loss(x, y), atol=1e-3)


def test_matches_a_hand_loop_with_mask_margin_and_different_widths():
    x, y = features(b=2, t=5, d=4, seed=4), features(b=2, t=5, d=9, seed=5)
    mask = torch.tensor([[1, 1, 0, 1, 1], [0, 1, 1, 1, 0]], dtype=torch.bool)
    total, count = 0.0, 0
    for b in range(2):
        kept = mask[b].nonzero().flatten().tolist()
        for i in kept:
            for j in kept:
                sx = F.cosine_similarity(x[b, i], x[b, j], dim=0)
                sy = F.cosine_similarity(y[b, i], y[b, j], dim=0)
                total += max(abs(float(sx - sy)) - 0.1, 0.0)
                count += 1
    assert token_relation_loss(x, y, mask, margin=0.1, block_size=2).item() == pytest.approx(total / count)
    assert torch.allclose(token_relation_loss(x, y, mask, 0.1, block_size=2),
                          token_relation_loss(x, y, mask, 0.1, block_size=256), atol=1e-12)


def test_differences_inside_the_margin_give_zero_loss_and_gradient():
    x = features(b=1, t=4, d=6, seed=6)
    y = x + 1e-3 * features(b=1, t=4, d=6, seed=7)  # relations move far less than 0.1
    x.requires_grad_(True)
    loss = token_relation_loss(x, y, margin=0.1)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(x.grad) == 0


def test_callback_adds_weight_times_trd_and_the_projector_trains(tiny_module, tiny_data, fit_tiny):
    module = tiny_module()
    callback = TokenRelationDistillation(layer=0, weight=0.5, projector_width=16)
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    fit_tiny(module, tiny_data(), callbacks=[callback], max_steps=2)
    projector = getattr(module, PROJECTOR_NAME)
    assert projector[0].weight.shape == (16, 64)
    assert all(p.grad is not None for p in projector.parameters())
    # the teacher is the frozen copy of the backbone at fit start
    teacher_state = callback.teacher.state_dict()
    assert all(torch.equal(teacher_state[k], before[k]) for k in before)
    assert not all(torch.equal(module.model.state_dict()[k], before[k]) for k in before)
    # one step by hand: loss = CE + 0.5 * TRD(projected block-0 output, teacher block-0 output)
    from zoo.modules.analysis.relation_distill import block_output

    data = tiny_data()
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    callback.on_fit_start(module.trainer, module)
    logged: dict = {}
    module.log_dict = lambda metrics, **_: logged.update(metrics)
    loss = module.training_step(batch, 0)
    with torch.no_grad():
        keep = batch["attention_mask"].bool() & (batch["labels"] != -100)
        student = block_output(module.model, 0, input_ids=batch["input_ids"],
                               attention_mask=batch["attention_mask"])
        teacher = block_output(callback.teacher, 0, input_ids=batch["input_ids"],
                               attention_mask=batch["attention_mask"])
        trd = token_relation_loss(projector(student), teacher, keep, 0.1)
        outputs = module(batch)
        ce = module.compute_loss(batch, outputs, module.token_weights(batch, outputs))
    assert torch.allclose(logged["train/aux/trd"], trd, atol=1e-6)
    assert torch.allclose(loss.detach(), ce + 0.5 * trd, atol=1e-6)
    callback.on_fit_end(module.trainer, module)


def test_minilm_teacher_aligns_every_visible_student_token(tiny_module):
    from zoo.modules.analysis.relation_distill import MiniLMTeacher

    module = tiny_module()
    teacher = MiniLMTeacher()
    text = "Paris is the capital of France."
    ids = torch.tensor([module.tokenizer(text)["input_ids"]])
    assert ids.shape[1] == len(text)  # the tiny tokenizer: one token per character
    feats, found = teacher(ids, module.tokenizer, torch.ones_like(ids, dtype=torch.bool))
    assert feats.shape == (1, ids.shape[1], 384)
    spaces = torch.tensor([c == " " for c in text])
    assert found[0, ~spaces].all() and not found[0, spaces].any()  # a space overlaps no MiniLM token
    # the 'Paris' characters share the one MiniLM token 'paris' (lower-cased, one word piece)
    assert torch.allclose(feats[0, 0], feats[0, 4])


def test_bad_teacher_or_layer_is_a_config_error(tiny_module, tiny_data, fit_tiny):
    from zoo.errors import ConfigError

    with pytest.raises(ConfigError, match="teacher"):
        TokenRelationDistillation(teacher="dino")
    with pytest.raises(ConfigError, match="decoder blocks"):
        fit_tiny(tiny_module(), tiny_data(), callbacks=[TokenRelationDistillation(layer=5)], max_steps=1)


def test_trd_is_optimisable_on_the_tiny_backbone(tiny_module, tiny_data, fit_tiny):
    """Spec check: the term decreases under training (projector and model learn the teacher's relations)."""
    from lightning.pytorch import Callback

    class Record(Callback):
        def __init__(self):
            self.values = []

        def on_train_batch_end(self, trainer, *args):
            self.values.append(float(trainer.callback_metrics["train/aux/trd"]))

    record = Record()
    callback = TokenRelationDistillation(layer=1, weight=5.0, margin=0.0, projector_width=32, tokens="all")
    fit_tiny(tiny_module(lr=3e-3), tiny_data(), callbacks=[callback, record], max_steps=60)
    first, last = sum(record.values[:3]) / 3, sum(record.values[-3:]) / 3
    assert first > 0.02 and last < 0.7 * first, record.values  # measured 0.75 -> 0.36 (60 steps, 11 rows)


def test_minilm_teacher_trains_through_fit(tiny_module, tiny_data, fit_tiny):
    callback = TokenRelationDistillation(teacher="minilm", projector_width=16)
    module = tiny_module()
    fit_tiny(module, tiny_data(), callbacks=[callback], max_steps=2)
    assert getattr(module, PROJECTOR_NAME)[-1].weight.shape == (384, 16)  # projected to MiniLM's width
    assert all(not p.requires_grad for p in callback.teacher.parameters())


def test_one_callback_serves_two_fits_with_their_own_projectors(tiny_module, tiny_data, fit_tiny):
    callback = TokenRelationDistillation(layer=0, projector_width=8)
    first, second = tiny_module(), tiny_module()
    fit_tiny(first, tiny_data(), callbacks=[callback], max_steps=1)
    fit_tiny(second, tiny_data(), callbacks=[callback], max_steps=1)
    assert getattr(first, PROJECTOR_NAME) is not getattr(second, PROJECTOR_NAME)
    assert all(p.grad is not None for p in getattr(second, PROJECTOR_NAME).parameters())


def test_without_projector_the_base_teacher_term_starts_at_zero_and_the_first_step_is_plain_sft(
        tiny_module, tiny_data, fit_tiny):
    """Spec check (regulariser does no harm): block ℓ of the model vs the same block of its frozen copy gives
    identical relations at step 0, so TRD = 0 with zero gradient and one step equals plain SFT's bitwise."""
    from lightning.pytorch import Callback

    class Record(Callback):
        values: list = []

        def on_train_batch_end(self, trainer, *args):
            self.values.append(float(trainer.callback_metrics["train/aux/trd"]))

    plain, distilled = tiny_module(), tiny_module()
    fit_tiny(plain, tiny_data(), max_steps=1)
    record = Record()
    callback = TokenRelationDistillation(layer=1, projector_width=0)
    fit_tiny(distilled, tiny_data(), callbacks=[callback, record], max_steps=1)
    assert record.values == [0.0]
    for (name, a), (_, b) in zip(plain.named_parameters(), distilled.named_parameters()):
        assert torch.equal(a, b), name
