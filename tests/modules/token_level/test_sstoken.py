"""ssToken invariants (spec 03, "Small-scale check")."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from zoo.modules.base import target_mask
from zoo.modules.token_level.sstoken import (
    SSTokenSelectCallback,
    prompt_attention,
    recompute_attention,
    sstoken_scores,
    top_ratio_mask,
)


def _batch(tiny_data, size: int = 4):
    data = tiny_data(max_length=128)
    data.setup("fit")
    return next(iter(data.train_dataloader()))


def _loss_and_grads(module, batch, callback=None):
    module.zero_grad()
    outputs = module(batch)
    weights = target_mask(batch["labels"]).float()
    if callback is not None:
        weights = weights * callback.select(module, batch, outputs)
    loss = module.compute_loss(batch, outputs, weights)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in module.named_parameters()}


def test_keep_ratio_one_equals_plain_sft_bit_for_bit(tiny_module, tiny_data):
    batch = _batch(tiny_data)
    plain_loss, plain_grads = _loss_and_grads(tiny_module(), batch)
    module = tiny_module()
    callback = SSTokenSelectCallback(keep_ratio=1.0, gamma=0.5)
    callback.attach(module)
    loss, grads = _loss_and_grads(module, batch, callback)
    assert torch.equal(loss, plain_loss)
    assert all(torch.equal(grads[name], plain_grads[name]) for name in plain_grads)


def test_each_example_keeps_exactly_ceil_rho_response_tokens(tiny_module, tiny_data):
    batch = _batch(tiny_data)
    assert (batch["attention_mask"] == 0).any()  # the batch is padded
    module = tiny_module()
    callback = SSTokenSelectCallback(keep_ratio=0.6, gamma=0.5)
    callback.attach(module)
    with torch.no_grad():
        weights = callback.select(module, batch, module(batch))
    response = target_mask(batch["labels"])
    for row in range(weights.shape[0]):
        n = int(response[row].sum())
        assert int(weights[row].sum()) == -(-3 * n // 5)  # ceil(0.6 n) in integers
    assert (weights[~response] == 0).all()  # prompt and padding never kept
    assert set(weights.unique().tolist()) <= {0.0, 1.0}


def test_sign_improved_token_kept_and_worsened_token_dropped_on_hand_set_logits():
    # Positions 0-1 prompt; targets at 2, 3, 4. Token ids: targets = [1, 2, 3].
    targets = torch.tensor([[0, 0, 1, 2, 3]])
    response = torch.tensor([[False, False, True, True, True]])
    current = torch.zeros(1, 5, 4)
    history = torch.zeros(1, 5, 4)
    current[0, 2, 1], history[0, 2, 1] = 5.0, -5.0   # token at 2: current much better than history
    current[0, 3, 2], history[0, 3, 2] = -3.0, 3.0   # token at 3: current got worse
    current[0, 4, 3], history[0, 4, 3] = 1.0, 1.0    # token at 4: unchanged

    def nll(logits):  # target-aligned: logits[t] scores token t here (hand-set, no shift)
        return -logits.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1) * response

    scores = sstoken_scores(nll(current), nll(history), torch.zeros(1, 5), response, gamma=1.0)
    assert top_ratio_mask(scores, response, keep_ratio=1 / 3).tolist() == [[0, 0, 1, 0, 0]]
    assert top_ratio_mask(scores, response, keep_ratio=2 / 3).tolist() == [[0, 0, 1, 0, 1]]


def test_sign_end_to_end_matches_reference_top_k_of_history_minus_current(tiny_module, tiny_data):
    batch = _batch(tiny_data)
    module = tiny_module()
    callback = SSTokenSelectCallback(keep_ratio=0.5, gamma=1.0)
    callback.attach(module)  # history = the model before the updates below
    with torch.no_grad():
        before = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    optimizer = torch.optim.SGD(module.parameters(), lr=0.5)
    for _ in range(3):
        optimizer.zero_grad()
        _loss_and_grads(module, batch)
        optimizer.step()
    with torch.no_grad():
        weights = callback.select(module, batch, module(batch))
        after = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    def token_loss(logits):  # HF alignment: logits[t-1] predicts token t
        labels = batch["labels"][:, 1:]
        loss = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels.clamp_min(0), reduction="none")
        return F.pad(loss, (1, 0))

    gain = token_loss(before) - token_loss(after)
    response = target_mask(batch["labels"])
    for row in range(gain.shape[0]):
        k = -(-int(response[row].sum()) // 2)
        expected = gain[row].masked_fill(~response[row], float("-inf")).topk(k).indices
        assert set(weights[row].nonzero().flatten().tolist()) == set(expected.tolist())


def test_position_attending_only_to_the_prompt_ranks_first_with_gamma_zero():
    length, prompt_len = 8, 3
    prompt = torch.zeros(1, length, dtype=torch.bool)
    prompt[0, :prompt_len] = True
    response = ~prompt
    probs = torch.zeros(1, 2, length, length)
    for query in range(length):  # uniform causal attention ...
        probs[0, :, query, : query + 1] = 1.0 / (query + 1)
    probs[0, :, 6] = 0.0
    probs[0, :, 6, :prompt_len] = 1.0 / prompt_len  # ... except position 6, all on the prompt
    attention = prompt_attention(probs, prompt)
    assert torch.allclose(attention[0, 6], torch.tensor(1.0))
    scores = sstoken_scores(torch.zeros(1, length), torch.zeros(1, length), attention, response, gamma=0.0)
    assert top_ratio_mask(scores, response, keep_ratio=0.2).nonzero()[:, 1].tolist() == [6]


def test_zero_query_key_weights_give_uniform_attention_prompt_share(tiny_module, make_batch):
    module = tiny_module()
    attn = module.model.model.layers[-1].self_attn
    with torch.no_grad():
        attn.q_proj.weight.zero_()
        attn.k_proj.weight.zero_()
    batch = make_batch(batch_size=2, length=12, prompt=4)
    callback = SSTokenSelectCallback(keep_ratio=0.25, gamma=0.0)
    callback.attach(module)
    with torch.no_grad():
        outputs = module(batch)
        attention = callback.prompt_attention_scores(batch)
        weights = callback.select(module, batch, outputs)
    expected = torch.tensor([min(4, t + 1) / (t + 1) for t in range(12)]).expand(2, -1)
    torch.testing.assert_close(attention, expected)
    # 8 response targets (positions 4..11): ceil(0.25 * 8) = 2 kept, the two earliest response
    # positions, whose queries put the largest share (4/5, 4/6) on the 4 prompt keys.
    assert weights.nonzero()[:, 1].tolist() == [4, 5, 4, 5]


def test_recomputed_probe_attention_equals_eager_output_attentions(tiny_module, tiny_data):
    batch = _batch(tiny_data)
    module = tiny_module()
    module.model.set_attn_implementation("eager")
    for layer in (0, -1):
        callback = SSTokenSelectCallback(probe_layer=layer)
        callback.attach(module)
        with torch.no_grad():
            out = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               output_attentions=True)
            probe = recompute_attention(callback._attn, callback._probe["hidden"], callback._probe["cos"],
                                        callback._probe["sin"], batch["attention_mask"])
        valid = batch["attention_mask"].bool()  # padded query rows differ by convention only
        reference = out.attentions[layer]
        torch.testing.assert_close(probe.permute(0, 2, 1, 3)[valid], reference.permute(0, 2, 1, 3)[valid],
                                   atol=1e-5, rtol=1e-5)
        callback.teardown(None, module, "fit")


def test_static_history_equal_to_current_gives_zero_rel_and_attention_ranking(tiny_module, tiny_data):
    batch = _batch(tiny_data)
    module = tiny_module()
    callback = SSTokenSelectCallback(keep_ratio=0.5, gamma=0.5)
    callback.attach(module)
    with torch.no_grad():
        outputs = module(batch)
        rel = callback.history_loss(batch) - outputs.per_token_loss()
        weights = callback.select(module, batch, outputs)
        attention = callback.prompt_attention_scores(batch)
    assert torch.count_nonzero(rel) == 0
    response = target_mask(batch["labels"])
    assert torch.equal(weights, top_ratio_mask(attention, response, 0.5))


def test_ema_history_after_one_step_is_the_convex_combination(tiny_module, tiny_data, fit_tiny):
    module = tiny_module()
    initial = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    callback = SSTokenSelectCallback(keep_ratio=0.6, history="ema", ema_decay=0.9)
    fit_tiny(module, tiny_data(), callbacks=[callback], max_steps=1)
    history = dict(callback.history_model.named_parameters())
    changed = 0
    for name, param in module.model.named_parameters():
        expected = 0.9 * initial[name] + 0.1 * param.detach()
        torch.testing.assert_close(history[name], expected, atol=1e-6, rtol=1e-5)
        changed += int(not torch.equal(param, initial[name]))
    assert changed > 0


def test_ema_history_keeps_float32_under_bf16_true_precision(tiny_module, tiny_data, fit_tiny):
    """A bf16 EMA freezes (a 0.1-weight lerp_ of two bf16 tensors a few ulps apart rounds to no change):
    the history stays float32 while the trainee is bf16, and after one step it is the float32 convex
    combination of the start and the bf16 weights."""
    module = tiny_module()
    initial = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    callback = SSTokenSelectCallback(keep_ratio=0.6, history="ema", ema_decay=0.9)
    fit_tiny(module, tiny_data(), callbacks=[callback], max_steps=1, precision="bf16-true")
    assert {p.dtype for p in module.model.parameters()} == {torch.bfloat16}
    history = dict(callback.history_model.named_parameters())
    assert {p.dtype for p in history.values()} == {torch.float32}
    for name, param in module.model.named_parameters():
        expected = 0.9 * initial[name].float() + 0.1 * param.detach().float()
        torch.testing.assert_close(history[name], expected, atol=1e-6, rtol=1e-5)


def test_history_model_follows_the_module_dtype_under_64_true_precision(tiny_module, tiny_data, fit_tiny):
    # Lightning casts the module when the strategy sets it up (after ``setup``): everything the callback
    # holds must follow it, or the history forward and the EMA lerp_ mix dtypes (devices on a GPU).
    for history in ("base", "ema"):
        module = tiny_module()
        callback = SSTokenSelectCallback(keep_ratio=0.6, gamma=0.5, history=history, ema_decay=0.9)
        fit_tiny(module, tiny_data(), callbacks=[callback], max_steps=2, precision="64-true")
        trainee = {p.dtype for p in module.model.parameters()}
        assert trainee == {torch.float64}
        assert {p.dtype for p in callback.history_model.parameters()} == {torch.float64}
        assert {b.dtype for b in callback.history_model.buffers() if b.is_floating_point()} <= {torch.float64}
