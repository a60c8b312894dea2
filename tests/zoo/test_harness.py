"""The evaluation harness: batched greedy generation, answer scoring, response NLL, report maths."""

from __future__ import annotations

import math

import pytest
import torch

from zoo.datamodules.sft import extract_final_answer, render_prompt_ids
from zoo.harness.bench import markdown, mean_std, method_name, summarize
from zoo.harness.generation import cut_at_eos, generate, generate_ids, left_pad, response_nll

PROMPTS = ["a", "What is 12 + 7 - 3?", "hello there, how many apples are left?", "xyz 42", "Qu"]


def test_left_padded_batch_equals_unpadded_one_by_one(sharp_tiny):
    model, tokenizer = sharp_tiny
    batched = generate_ids(model, tokenizer, PROMPTS, max_new_tokens=12, batch_size=8)
    single = [generate_ids(model, tokenizer, [p], max_new_tokens=12)[0] for p in PROMPTS]
    assert batched == single
    assert len({tuple(ids) for ids in single}) == len(PROMPTS)  # the check is not vacuous
    lengths = {len(render_prompt_ids(tokenizer, p)) for p in PROMPTS}
    assert len(lengths) == len(PROMPTS)  # every row of the batch was padded differently


def test_kv_cache_generation_equals_no_cache(sharp_tiny):
    model, tokenizer = sharp_tiny
    cached = generate_ids(model, tokenizer, PROMPTS, max_new_tokens=10, batch_size=3, use_cache=True)
    uncached = generate_ids(model, tokenizer, PROMPTS, max_new_tokens=10, batch_size=3, use_cache=False)
    assert cached == uncached


def test_generation_matches_a_hand_written_greedy_loop(sharp_tiny):
    """Argmax of the full forward pass, token by token, without HF generate or padding."""
    model, tokenizer = sharp_tiny
    prompt = PROMPTS[2]
    ids = torch.tensor([render_prompt_ids(tokenizer, prompt)])
    with torch.no_grad():
        for _ in range(8):
            next_id = model(input_ids=ids).logits[0, -1].argmax()
            ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    expected = cut_at_eos(ids[0, -8:].tolist(), {tokenizer.eos_token_id})
    assert generate_ids(model, tokenizer, [PROMPTS[0], prompt], max_new_tokens=8)[1] == expected


def test_left_pad_and_cut_at_eos():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert cut_at_eos([1, 2, 9, 3, 9], {9}) == [1, 2]
    assert cut_at_eos([1, 2], {9}) == [1, 2]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("3 + 4 = 7\n7 - 2 = 5\n#### 5", "5"),
        ("so the total is 12 apples.\n#### -1,234\nextra", "-1,234"),
        ("2 + 2 = 4, then 4 * 3 = 12.", "12"),
        ("The answer is 1,500 dollars", "1500"),
        ("no number here", "no number here"),
        ("####", ""),
    ],
)
def test_final_answer_extraction(text, expected):
    assert extract_final_answer(text) == expected


def test_exact_match_scores_hash_answer_and_last_number(tiny_data):
    data = tiny_data()
    record = data.eval_records("test")[0]
    answer = record["answer"]
    assert data.score_completion(record, f"working...\n#### {answer}")["exact_match"] == 1.0
    assert data.score_completion(record, f"the result is {answer}.")["exact_match"] == 1.0
    assert data.score_completion(record, f"#### {int(answer) + 1}")["exact_match"] == 0.0
    assert data.score_completion(record, f"#### {answer}\nbut then 99999")["exact_match"] == 1.0
    records = data.eval_records("test")[:2]
    metrics = data.evaluation_metrics(records, [f"#### {records[0]['answer']}", "#### nope"])
    assert metrics == {"exact_match": 0.5}


def hf_response_nll(model, loader) -> tuple[float, int]:
    """Token-mean NLL from HF's own loss, one row at a time (HF averages over a row's targets)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in loader:
            for row in range(batch["input_ids"].shape[0]):
                keep = batch["attention_mask"][row].bool()
                ids, labels = batch["input_ids"][row, keep][None], batch["labels"][row, keep][None]
                n = int((labels[:, 1:] != -100).sum())
                if n:
                    total += float(model(input_ids=ids, labels=labels).loss) * n
                    count += n
    return total / count, count


def test_response_nll_equals_hf_loss(tiny_module, tiny_data):
    module, data = tiny_module(), tiny_data(num_test=6, eval_batch_size=4)
    result = response_nll(module, data, "test")
    expected, count = hf_response_nll(module.model, data.test_dataloader())
    assert result["tokens"] == count
    assert result["nll"] == pytest.approx(expected, rel=1e-5)
    assert result["ppl"] == pytest.approx(math.exp(expected), rel=1e-5)


def test_response_nll_goes_through_prompt_tuning_wrapper(tiny_module, tiny_data):
    """With peft prompt tuning the module's path must count the virtual tokens like peft's own loss."""
    from zoo.modules import PeftModule

    module = tiny_module(cls=PeftModule, peft_config={"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 3})
    with torch.no_grad():  # make the soft prompt matter
        for name, param in module.model.named_parameters():
            if "prompt_encoder" in name:
                param.normal_(0, 1.0, generator=torch.Generator().manual_seed(1))
    data = tiny_data(num_test=4)
    result = response_nll(module, data, "test")
    expected, _ = hf_response_nll(module.model, data.test_dataloader())
    plain, _ = hf_response_nll(module.model.get_base_model(), data.test_dataloader())
    assert result["nll"] == pytest.approx(expected, rel=1e-5)
    assert abs(expected - plain) > 1e-3  # the soft prompt changed the loss, so the check has teeth


def test_mean_std_and_markdown_rows():
    assert mean_std([0.0, 1.0]) == pytest.approx((0.5, math.sqrt(0.5)))
    assert mean_std([2.0]) == (2.0, 0.0)
    records = [
        {"method": "lora", "backbone": "m", "budget": {"max_steps": 2}, "steps": 2,
         "main_metric": "exact_match",
         "metrics": {"exact_match": em, "nll": nll}, "trainable_params": 10}
        for em, nll in ((0.0, 2.0), (1.0, 4.0))
    ] + [{"method": "base", "backbone": "m", "budget": {"max_steps": 0}, "steps": 0,
          "main_metric": "exact_match",
          "metrics": {"exact_match": 0.25, "nll": 3.0}, "trainable_params": 0}]
    rows = summarize(records)
    assert [r["method"] for r in rows] == ["base", "lora"]
    assert rows[1]["seeds"] == 2
    table = markdown(rows)
    assert "| `lora` | m | 2 | 2 | 0.500 ± 0.707 | 3.000 ± 1.414 |" in table
    assert "| `base` | m | 0 | 1 | 0.250 | 3.000 |" in table


def test_method_name_comes_from_the_registry_else_the_stem(tmp_path):
    from zoo.registry import REPO_ROOT

    assert method_name(REPO_ROOT / "configs" / "lora.yaml") == "lora"
    assert method_name(tmp_path / "my-experiment.yaml") == "my-experiment"


def test_bench_generation_goes_through_generate_text_with_the_system_prompt(tiny_module):
    from zoo.harness.generation import generate_for_module
    from zoo.modules import CausalLMModule

    class TextHook(CausalLMModule):
        def generate_text(self, prompts, max_new_tokens=256, system_prompt=None, batch_size=16, **sampling):
            return [f"text:{p}:{max_new_tokens}:{system_prompt}:{batch_size}" for p in prompts]

    prompts = ["a", "b", "c"]
    assert generate_for_module(tiny_module(cls=TextHook), prompts, max_new_tokens=5, system_prompt="S",
                               batch_size=2) == ["text:a:5:S:2", "text:b:5:S:2", "text:c:5:S:2"]


def test_module_generation_equals_the_bare_decoder_and_uses_the_system_prompt(tiny_module, sharp_tiny):
    from zoo.harness.generation import generate_for_module

    plain = tiny_module()
    plain.model.load_state_dict(sharp_tiny[0].state_dict())
    prompts = PROMPTS[:3]
    ours = generate_for_module(plain, prompts, max_new_tokens=6, system_prompt="Be brief.")
    assert ours == generate(plain.model, plain.tokenizer, prompts, max_new_tokens=6,
                            system_prompt="Be brief.")
    # the system prompt counts
    assert ours != generate(plain.model, plain.tokenizer, prompts, max_new_tokens=6)


def test_bench_generation_runs_hooks_in_eval_mode_and_restores_the_mode(tiny_module):
    from zoo.harness.generation import generate_for_module
    from zoo.modules import CausalLMModule

    class ModeProbe(CausalLMModule):
        def generate_text(self, prompts, max_new_tokens=256, system_prompt=None, batch_size=16, **sampling):
            return [str(self.training) for _ in prompts]

    module = tiny_module(cls=ModeProbe)
    module.train()
    assert generate_for_module(module, ["a", "b"]) == ["False", "False"]
    assert module.training  # put back as it was
