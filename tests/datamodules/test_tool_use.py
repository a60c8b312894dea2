"""The built-in tool-use task: deterministic, held-out disjoint, one labelled turn per row, exact metrics."""

from __future__ import annotations

import json

from zoo.datamodules.tool_use import TOOLS, ToolUseDataModule, generate_tool_records


def _data(**kwargs):
    options = dict(tokenizer="tiny-llama", num_train=60, num_val=6, num_test=6, batch_size=4, max_length=1024,
                   error_rate=0.5)
    options.update(kwargs)
    data = ToolUseDataModule(**options)
    data.setup("fit")
    return data


def test_generator_is_deterministic_and_calls_are_valid():
    first = generate_tool_records(30, seed=3, error_rate=0.3)
    assert first == generate_tool_records(30, seed=3, error_rate=0.3)
    assert first != generate_tool_records(30, seed=4, error_rate=0.3)
    for record in first:
        call = json.loads(record["response"])
        assert call == record["call"] and call["name"] in record["tools"]
        assert set(call["arguments"]) == set(TOOLS[call["name"]][0])
        assert len(record["tools"]) == 4


def test_held_out_prompts_never_in_train_and_are_single_turn():
    data = _data()
    train = {r["prompt"] for r in data.records["train"]}
    for split in ("val", "test"):
        assert all(r["prompt"] not in train for r in data.records[split])
        assert all(len(r["messages"]) == 2 for r in data.records[split])


def test_filter_removes_exactly_the_wrong_calls():
    filtered, unfiltered = _data(), _data(filter_error_turns=False)
    errors = sum(len(r["messages"]) > 2 for r in filtered.records["train"])
    assert errors > 0
    assert len(unfiltered.encoded["train"]) - len(filtered.encoded["train"]) == errors
    tokenizer = filtered.tokenizer
    golds = {r["response"] for r in filtered.records["train"]}

    def targets(data):
        out = []
        for row in data.encoded["train"].rows:
            ids = [i for i, label in zip(row["input_ids"], row["labels"]) if label != -100]
            out.append(tokenizer.decode(ids).removesuffix("<|im_end|>"))
        return out

    assert all(t in golds for t in targets(filtered))
    assert sum(t not in golds for t in targets(unfiltered)) == errors


def test_key_tokens_sit_on_the_tool_name_inside_the_labels():
    data = _data(error_rate=0.0)
    batch = next(iter(data.train_dataloader()))
    for row in range(batch["input_ids"].shape[0]):
        keys = (batch["key_tokens"][row] == 1).nonzero().flatten()
        assert keys.numel() >= 1
        assert (batch["labels"][row, keys] != -100).all()
        labelled = (batch["labels"][row] != -100).nonzero().flatten()
        first = int(keys[0]) - int(labelled[0])
        assert first == len('{"name": "')  # the first key token is the first character of the name


def test_score_completion_exact_name_and_argument_match():
    data = _data(error_rate=0.0)
    record = data.eval_records("test")[0]
    call = record["call"]
    assert data.score_completion(record, record["response"]) == {
        "exact_match": 1.0, "tool_name_match": 1.0, "arguments_match": 1.0, "reward": 1.0}
    wrong_args = json.dumps({"name": call["name"], "arguments": {k: "zzz" for k in call["arguments"]}})
    scores = data.score_completion(record, "Sure! " + wrong_args)
    assert (scores["tool_name_match"], scores["arguments_match"], scores["exact_match"]) == (1.0, 0.0, 0.0)
    assert data.score_completion(record, "I cannot help")["exact_match"] == 0.0
    metrics = data.evaluation_metrics([record, record], [record["response"], "nope"])
    assert metrics["exact_match"] == 0.5 and metrics["reward"] == (1.0 - 2.0) / 2
