"""The throughput script counts the tokens each row kept, and batching does not change greedy text."""

from zoo.harness.generation_throughput import completion_tokens, measure, task_prompts
from zoo.modules.base import CausalLMModule


def test_batched_rows_count_the_same_tokens_as_one_at_a_time():
    module = CausalLMModule(model="tiny-llama", export=False).eval()
    prompts = task_prompts("chain_sum", 3)
    rows = measure(module, prompts, [1, 3], max_new_tokens=6)
    assert [r["batch_size"] for r in rows] == [1, 3] and rows[0]["speedup_tokens_per_cpu_s"] == 1.0
    one_by_one = [module.generate_text([p], max_new_tokens=6, batch_size=1)[0] for p in prompts]
    assert rows[0]["tokens"] == completion_tokens(module.tokenizer, one_by_one)
    if rows[1]["agree_with_first"] == 1.0:
        assert rows[1]["tokens"] == rows[0]["tokens"]


def test_decoder_calls_are_counted_and_batching_needs_fewer():
    module = CausalLMModule(model="tiny-llama", export=False).eval()
    rows = measure(module, task_prompts("chain_sum", 4), [1, 4], max_new_tokens=5)
    one, four = rows
    assert one["rows_per_call"] == 1.0 and one["decoder_calls"] >= 4  # at least a prefill per prompt
    assert four["decoder_calls"] < one["decoder_calls"] and four["rows_per_call"] > 1.0
