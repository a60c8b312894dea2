"""TL-Training invariants (spec 11, "Small-scale check": MAE, PKT positions and weights, IRM rewards)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from zoo.backbone import byte_tokenizer
from zoo.datamodules.tool_use import encode_turn, render_call
from zoo.modules.base import target_mask
from zoo.modules.token_level.tl_training import (
    KEY_TOOL_NAME,
    TLErrorTurnFilter,
    TLKeyTokenWeightCallback,
    key_char_offsets,
    key_token_weights,
    parse_call,
    tool_call_reward,
)


def _dialogue():
    return [
        {"role": "user", "content": "Weather in Paris, then Rome."},
        {"role": "assistant", "content": '{"name": "get_weather", "arguments": {"city": "Paris"}}'},
        {"role": "tool", "content": '{"temperature": 21}'},
        {"role": "assistant", "content": '{"name": "get_weather", "arguments": {"town": "Rome"}}'},
        {"role": "tool", "content": "TypeError: get_weather() got an Unexpected-Keyword argument 'town'"},
        {"role": "assistant", "content": '{"name": "get_weather", "arguments": {"city": "Rome"}}'},
    ]


def test_mae_drops_only_the_turn_followed_by_an_error_and_labels_only_own_turn():
    messages = _dialogue()
    samples = TLErrorTurnFilter()(messages)
    assert [target for _, target in samples] == [messages[1]["content"], messages[5]["content"]]
    assert samples[0][0] == messages[:1] and samples[1][0] == messages[:5]  # full history kept as context
    assert len(TLErrorTurnFilter(enabled=False)(messages)) == 3
    tokenizer = byte_tokenizer()
    for context, target in samples:
        row = encode_turn(tokenizer, context, target, None)
        supervised = [i for i, label in zip(row["input_ids"], row["labels"]) if label != -100]
        assert tokenizer.decode(supervised) == target + "<|im_end|>"


def test_error_signature_normalisation():
    flag = TLErrorTurnFilter()
    assert flag.is_error('{"Error": "quota"}')  # '"error":' only matches after stripping punctuation
    assert flag.is_error("requests.exceptions.ConnectionError: boom")
    assert flag.is_error("NameError: name 'get_wether' is not defined")
    assert not flag.is_error('{"temperature": 21, "status": "ok"}')


def test_pkt_key_positions_are_the_name_start_and_the_divergence_from_get_time():
    tokenizer = byte_tokenizer()  # one token per ASCII byte: indices are hand-derivable
    tools = {"get_weather": ["city"], "get_time": ["city"], "search": ["query"]}
    target = render_call("get_weather", {"city": "Paris"})
    context = [{"role": "user", "content": "hi"}]
    row = encode_turn(tokenizer, context, target, tools)
    prompt_len = row["labels"].count(-100)
    name_start = len('{"name": "')
    keys = [i for i, code in enumerate(row["key_tokens"]) if code == KEY_TOOL_NAME]
    # "search" shares no prefix (collapses to the name start); "get_time" diverges after "get_" (4 chars).
    assert keys == [prompt_len + name_start, prompt_len + name_start + 4]
    assert tokenizer.decode([row["input_ids"][keys[1]]]) == "w"


def test_pkt_gold_name_that_prefixes_another_tool_keys_the_token_after_the_name():
    # Gold "get" is a prefix of "get_weather": the two diverge right after the gold name (the closing
    # quote of the JSON string; "(" in the paper's name(args) format), and that token is a key token.
    assert key_char_offsets("get", ["get_weather"], 10) == [10, 13]
    assert key_char_offsets("get_weather", ["get"], 10) == [10, 13]  # the other way round: the "_"
    tokenizer = byte_tokenizer()  # one token per ASCII byte
    tools = {"get": ["city"], "get_weather": ["city"]}
    target = render_call("get", {"city": "Paris"})
    row = encode_turn(tokenizer, [{"role": "user", "content": "hi"}], target, tools)
    prompt_len = row["labels"].count(-100)
    name_start = len('{"name": "')
    keys = [i for i, code in enumerate(row["key_tokens"]) if code == KEY_TOOL_NAME]
    assert keys == [prompt_len + name_start, prompt_len + name_start + 3]
    assert tokenizer.decode([row["input_ids"][keys[1]]]) == '"'


def test_pkt_weights_follow_the_ratio_and_cap():
    target = torch.zeros(3, 12, dtype=torch.bool)
    target[:, 2:12] = True  # 10 target tokens per row
    key = torch.zeros(3, 12, dtype=torch.bool)
    key[0, [2, 5]] = True   # 2 key, 8 other -> weight 4
    key[1, 3] = True        # 1 key, 9 other -> 9, capped at 6 below
    key[2, 2:8] = True      # 6 key >= 4 other -> 1
    key[2, 0] = True        # not a target: ignored
    weights = key_token_weights(key, target, max_weight=6.0)
    assert weights[0, 2] == 4.0 and weights[0, 5] == 4.0 and weights[0, 3] == 1.0
    assert weights[1, 3] == 6.0
    assert (weights[2] == 1.0).all()
    assert (key_token_weights(key, target, max_weight=9.0)[1, 3]) == 9.0


def _tool_batch():
    from zoo.datamodules.tool_use import ToolUseDataModule

    data = ToolUseDataModule(tokenizer="tiny-llama", num_train=8, num_val=2, num_test=2, batch_size=4,
                             max_length=1024, error_rate=0.0)
    data.setup("fit")
    return next(iter(data.train_dataloader()))


def test_max_weight_one_equals_plain_sft_and_weighted_loss_matches_reference(tiny_module):
    batch = _tool_batch()
    assert (batch["key_tokens"] == KEY_TOOL_NAME).any()
    plain = tiny_module()
    plain_loss = plain.compute_loss(batch, plain(batch), target_mask(batch["labels"]).float())

    module = tiny_module(reduction="weight_mean")
    outputs = module(batch)
    target = target_mask(batch["labels"])
    weights = target.float() * TLKeyTokenWeightCallback(max_weight=1.0).select(module, batch, outputs)
    assert torch.equal(module.compute_loss(batch, outputs, weights), plain_loss)

    weights = target.float() * TLKeyTokenWeightCallback(max_weight=9.0).select(module, batch, outputs)
    loss = module.compute_loss(batch, outputs, weights)
    logits = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ce = F.pad(F.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:].clamp_min(0),
                               reduction="none"), (1, 0))
    key = (batch["key_tokens"] == KEY_TOOL_NAME) & target
    n_key, n_other = key.sum(1, keepdim=True), (target & ~key).sum(1, keepdim=True)
    w = torch.where(key, (n_other / n_key).clamp(max=9.0), 1.0) * target
    torch.testing.assert_close(loss, (w * ce).sum() / w.sum(), atol=1e-5, rtol=1e-5)
    assert w.max() > 1.0


TOOLS = {"get_weather": ["city", "unit"], "get_time": ["city"]}
GOLD = {"name": "get_weather", "arguments": {"city": "Paris"}}


@pytest.mark.parametrize("generated, reward", [
    ("no call here", -2.0),
    ('{"name": "get_wether", "arguments": {"city": "Paris"}}', -2.0),
    ('{"name": "get_time", "arguments": {"city": "Paris"}}', -1.5),
    ('{"name": "get_weather", "arguments": {"town": "Paris", "unit": "c"}}', -1.8),
    ('{"name": "get_weather", "arguments": {"city": "Paris", "town": "x", "unit": "c"}}', -1.3),
    ('{"name": "get_weather", "arguments": {"town": "Paris"}}', -1.3),
    ('{"name": "get_weather", "arguments": {"unit": "c"}}', -1.0),
    ('{"name": "get_weather", "arguments": {"city": "Paris", "town": "x"}}', -0.8),
    ('{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}', -0.5),
    ('{"name": "get_weather", "arguments": {}}', -0.5),
    ('{"name": "get_weather", "arguments": {"city": "Lyon"}}', -0.25),
    ('{"name": "get_weather", "arguments": {"city": "Paris"}}', 1.0),
    ("get_weather(city='Paris')", 1.0),
    ('  get_weather( city = "Paris" )  ', 1.0),
    ("get_weather(city='Lyon')", -0.25),
    ('{ "name" : "get_weather" , "arguments" : { "city" : "Paris" } }', 1.0),
])
def test_irm_reward_table(generated, reward):
    assert tool_call_reward(generated, GOLD, TOOLS) == reward


def test_parse_call_reads_quotes_numbers_and_json_string_arguments():
    assert parse_call("convert(amount=5, source='USD', target=\"EUR\")") == (
        "convert", {"amount": 5, "source": "USD", "target": "EUR"})
    assert parse_call(json.dumps({"name": "f", "arguments": json.dumps({"a": 1})})) == ("f", {"a": 1})
    assert parse_call("f(a='x', 'oops')") is None
