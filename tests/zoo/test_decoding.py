"""The one decoder (zoo.decoding): stop strings, sampling, top-k/top-p, and plain hooks equal to a hand
loop."""

from __future__ import annotations

import copy

import pytest
import torch

from zoo.chat import render_prompt_ids
from zoo.decoding import (
    choose_tokens,
    cut_at_eos,
    cut_at_stop,
    decode_continuous,
    decode_ids,
    eos_ids,
    generate,
    left_pad,
)

PROMPTS = ["What is 12 + 7 - 3?", "hello there", "xyz 42"]


def test_cut_at_stop_takes_the_earliest_stop_string():
    assert cut_at_stop("a\nb### c", ["###", "\n"]) == "a"
    assert cut_at_stop("abc", ["zz"]) == "abc"
    assert cut_at_stop("abc", [""]) == "abc"


def test_stop_strings_cut_the_text_the_decoder_returns(sharp_tiny):
    model, tokenizer = sharp_tiny
    full = generate(model, tokenizer, PROMPTS, max_new_tokens=10)
    stop = full[0][3:5]
    assert stop and generate(model, tokenizer, PROMPTS[:1], max_new_tokens=10, stop=[stop]) == [
        full[0][: full[0].find(stop)]]


def test_top_k_one_sampling_is_greedy_and_top_p_keeps_the_nucleus():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, 0.0, 0.0, 0.0]])
    gen = torch.Generator().manual_seed(0)
    assert choose_tokens(logits, True, top_k=1, generator=gen).tolist() == [1, 0]
    probs = logits.softmax(-1)
    # top_p just below p(argmax) keeps only the argmax; draw many times to see nothing else comes out
    draws = torch.stack([choose_tokens(logits, True, top_p=float(probs[0].max()) - 1e-3, generator=gen)
                         for _ in range(50)])
    assert (draws[:, 0] == 1).all()


def test_sampling_is_reproducible_with_a_generator_and_differs_from_greedy(sharp_tiny):
    model, tokenizer = sharp_tiny
    ids, mask = left_pad([render_prompt_ids(tokenizer, p) for p in PROMPTS], tokenizer.pad_token_id)
    eos = eos_ids(model, tokenizer)

    def sample(seed: int) -> torch.Tensor:
        return decode_ids(model, ids, mask, max_new_tokens=8, eos=eos, pad_id=tokenizer.pad_token_id,
                          do_sample=True, temperature=2.0, generator=torch.Generator().manual_seed(seed))

    greedy = decode_ids(model, ids, mask, max_new_tokens=8, eos=eos, pad_id=tokenizer.pad_token_id)
    assert torch.equal(sample(1), sample(1))
    assert not torch.equal(sample(1), greedy)


def test_scores_are_the_full_forward_logits_of_each_step(sharp_tiny):
    model, tokenizer = sharp_tiny
    ids = torch.tensor([render_prompt_ids(tokenizer, PROMPTS[0])])
    new, scores = decode_ids(model, ids, torch.ones_like(ids), max_new_tokens=4, eos=set(), pad_id=0,
                             output_scores=True)
    with torch.no_grad():
        for step in range(new.shape[1]):
            full = torch.cat([ids, new[:, :step]], 1)
            expected = model(input_ids=full).logits[0, -1]
            assert torch.allclose(scores[0, step], expected, atol=1e-4)


def test_dropping_finished_rows_gives_the_ids_of_decoding_every_row_to_the_end(sharp_tiny):
    model, tokenizer = sharp_tiny
    model = model.double()
    ids, mask = left_pad([render_prompt_ids(tokenizer, p) for p in PROMPTS], tokenizer.pad_token_id)
    run = dict(max_new_tokens=8, pad_id=tokenizer.pad_token_id)
    free = decode_ids(model, ids, mask, eos=set(), **run)
    eos = {int(free[0, 1])}  # row 0 ends at step 1; the others run on (unless they hit the token too)
    assert any(eos.isdisjoint(row.tolist()) for row in free[1:]), "pick prompts whose rows outlive row 0"
    kept = decode_ids(model, ids, mask, eos=eos, output_scores=True, **run)[0]  # scores: no row is dropped
    dropped = decode_ids(model, ids, mask, eos=eos, **run)
    assert torch.equal(dropped, kept)
    assert (dropped[0, 2:] == tokenizer.pad_token_id).all() and dropped.shape[1] == 8


def _adapted(sharp_tiny, name):
    """The sharp tiny model wrapped by adapter ``name`` with its trainable tensors moved off their init,
    as (model, hooks)."""
    from zoo.modules.adapters import LoRA
    from zoo.modules.prompting.apt import APT
    from zoo.modules.prompting.dept import DePT
    from zoo.modules.prompting.prompt_tuning import PrefixTuning, PromptTuning

    model, tokenizer = sharp_tiny
    model = copy.deepcopy(model).double()
    if name == "plain":
        return model, None
    adapter = {"lora": lambda: LoRA(r=2, lora_alpha=4, lora_dropout=0.0, target_modules="all-linear"),
               "prompt_tuning": lambda: PromptTuning(num_virtual_tokens=3),
               "prefix_tuning": lambda: PrefixTuning(num_virtual_tokens=3),
               "dept": lambda: DePT(num_virtual_tokens=2, rank=2, max_seq_length=64),
               "apt_exact_prefix": lambda: APT(num_virtual_tokens=2, rank=2, mode="exact_prefix")}[name]()
    model = adapter.attach(model, tokenizer).double()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in adapter.parameters():
            param.copy_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * 0.3)
    return model.eval(), adapter


@pytest.mark.parametrize("name", ["plain", "lora", "prompt_tuning", "prefix_tuning", "dept",
                                  "apt_exact_prefix"])
def test_continuous_batching_gives_each_prompt_its_own_greedy_ids(sharp_tiny, name):
    """Seven prompts of different lengths through two places: rows finish at different steps (an EOS picked
    from the free-running ids), waiting prompts join the running batch mid-decode, leading cache columns are
    dropped; every prompt gets the ids :func:`decode_ids` gives it alone (float64: no rounding flips)."""
    model, hooks = _adapted(sharp_tiny, name)
    tokenizer = sharp_tiny[1]
    texts = ["a", "What is 3 + 4?", "hi there, how are you", "zz", "Tell me a story about a cat.", "x y",
             "ok?"]
    prompts = [render_prompt_ids(tokenizer, t) for t in texts]
    pad = tokenizer.pad_token_id

    def alone(prompt, eos):
        ids, mask = left_pad([prompt], pad)
        row = decode_ids(model, ids, mask, max_new_tokens=6, eos=eos, pad_id=pad, hooks=hooks)[0].tolist()
        return cut_at_eos(row, eos) + [t for t in row if t in eos][:1]

    free = [alone(p, set()) for p in prompts]
    eos = {free[1][2]}  # prompt 1 stops at its third token; others stop elsewhere or run to the limit
    expected = [alone(p, eos) for p in prompts]
    assert len({len(row) for row in expected}) > 1, "pick prompts that finish at different steps"
    got = decode_continuous(model, prompts, batch_size=2, max_new_tokens=6, eos=eos, pad_id=pad, hooks=hooks)
    assert got == expected


def test_generate_text_is_the_same_at_every_batch_size(sharp_tiny):
    model, tokenizer = sharp_tiny
    model = copy.deepcopy(model).double()
    prompts = ["a", "What is 3 + 4?", "hi there, how are you", "zz", "Tell me a story.", "x y", "ok?"]
    one = generate(model, tokenizer, prompts, max_new_tokens=6, batch_size=1)
    assert generate(model, tokenizer, prompts, max_new_tokens=6, batch_size=3) == one
    assert generate(model, tokenizer, prompts, max_new_tokens=6, batch_size=3, use_cache=False) == one
