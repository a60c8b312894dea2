"""The one decoder (zoo.decoding): stop strings, sampling, top-k/top-p, and plain hooks equal to a hand
loop."""

from __future__ import annotations

import torch

from zoo.chat import render_prompt_ids
from zoo.decoding import choose_tokens, cut_at_stop, decode_ids, eos_ids, generate, left_pad

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
