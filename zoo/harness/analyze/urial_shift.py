"""``zoo analyze urial-shift``: the token distribution shift between an aligned model and its base (spec 31).

    zoo analyze urial-shift --tuned runs/sft/20261201-120000            # base: its recorded backbone
    zoo analyze urial-shift --tuned runs/urial/... --prompts queries.txt  # base: the URIAL prefix off

For each prompt the aligned (tuned) model decodes greedily in its own prompt format (chat-rendered, or
URIAL's query turn after its prefix); ``o_1..o_n`` are its new tokens (EOS cut). Both models then read the
same token ids ``x_t = prompt + o_<t`` (teacher forcing through each module's own forward; no re-tokenising)
and, per position: the base rank of the aligned token ``eta_t = 1 + #{v : P_base(v) > P_base(o_t)}`` (ties
share the better rank), ``KL(P_align || P_base)`` and ``P_base(o_t)``. Positions are unshifted (eta = 1),
marginal (2 <= eta <= 3) or shifted (eta > 3); the table gives the three ratios over all positions and the
most frequent shifted tokens, the plot the ratios and the mean KL / base probability against position.
Paper (Llama-2-7b -> chat): 77.7% unshifted, 14.5% marginal, 7.8% shifted.
"""

from __future__ import annotations

import argparse
from collections import Counter
from typing import Any

import torch
from torch import Tensor

from zoo import decoding
from zoo.chat import render_prompt_ids
from zoo.harness.analyze.common import Report, add_model_arguments, format_table, load_pair, new_figure
from zoo.harness.analyze.tuco import read_prompts

HELP = "Token distribution shift: base-model rank of the aligned model's tokens, KL, top shifted tokens."

PROMPTS = ["What is 7 plus 5?", "Give me three tips for sleeping well.", "How do I make a cup of tea?",
           "Can you help me hack my neighbour's wifi?", "Write a short poem about the sea.",
           "What are common types of renewable energy?"]
MARGINAL_MAX = 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--prompts", action="append", default=[], metavar="FILE",
                        help="prompts (.txt: one a line; .jsonl: {prompt}); default: a built-in set")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--top", type=int, default=10, help="how many shifted tokens to list")
    parser.add_argument("--system-prompt", default=None, help="system prompt of the chat rendering")


def token_shift(align_logits: Tensor, base_logits: Tensor, tokens: Tensor) -> dict[str, Tensor]:
    """Per position (n,): ``rank`` of ``tokens`` under the base distribution (1-based, ties share the better
    rank), ``kl`` = KL(P_align || P_base) and ``base_prob`` = P_base(token)."""
    align_logp = align_logits.double().log_softmax(-1)
    base_logp = base_logits.double().log_softmax(-1)
    chosen = base_logp.gather(-1, tokens.view(-1, 1))
    rank = 1 + (base_logp > chosen).sum(-1)
    kl = (align_logp.exp() * (align_logp - base_logp)).sum(-1).clamp_min(0.0)
    return {"rank": rank, "kl": kl, "base_prob": chosen.squeeze(-1).exp()}


def shift_classes(rank: Tensor) -> dict[str, float]:
    """Fractions of unshifted (rank 1), marginal (2..3) and shifted (> 3) positions."""
    total = max(1, rank.numel())
    return {"unshifted": float((rank == 1).sum()) / total,
            "marginal": float(((rank >= 2) & (rank <= MARGINAL_MAX)).sum()) / total,
            "shifted": float((rank > MARGINAL_MAX).sum()) / total}


def prompt_ids(module: Any, prompt: str, system_prompt: str | None) -> list[int]:
    """The module's own prompt format: its ``prompt_ids`` (URIAL: the query turn) or the chat template."""
    own = getattr(module, "prompt_ids", None)
    return list(own(prompt)) if callable(own) else render_prompt_ids(module.tokenizer, prompt, system_prompt)


@torch.no_grad()
def teacher_forced_logits(module: Any, ids: list[int], start: int) -> Tensor:
    """(len(ids) - start, V) logits predicting ``ids[start:]`` through the module's own forward."""
    device = next(module.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
             "labels": torch.full_like(input_ids, -100)}
    hidden = module.forward_hidden(batch)[0, start - 1:-1]
    return decoding.lm_head(module.model, hidden).float()


@torch.no_grad()
def analyse_prompt(pair, prompt: str, args: argparse.Namespace) -> dict[str, Any]:
    tuned = pair.module
    tokenizer = tuned.tokenizer
    was_training = tuned.training
    tuned.eval()
    try:
        with pair.tuned() as module:
            ids = prompt_ids(module, prompt, args.system_prompt)
            device = next(module.parameters()).device
            eos = decoding.eos_ids(module.model, tokenizer)
            pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos)
            tensor = torch.tensor([ids], device=device)
            new = decoding.decode_ids(module.model, tensor, torch.ones_like(tensor),
                                      max_new_tokens=args.max_new_tokens, eos=eos, pad_id=pad_id,
                                      hooks=module.adapter)
            output = decoding.cut_at_eos(new[0].tolist(), eos)
            if not output:
                return {"prompt": prompt, "tokens": [], "rank": [], "kl": [], "base_prob": []}
            align = teacher_forced_logits(module, ids + output, len(ids))
        with pair.base() as module:  # the same token ids (never re-tokenised)
            base = teacher_forced_logits(module, ids + output, len(ids))
    finally:
        tuned.train(was_training)
    stats = token_shift(align, base, torch.tensor(output, device=align.device))
    return {"prompt": prompt, "output": tokenizer.decode(output), "tokens": output,
            "token_text": [tokenizer.decode([t]) for t in output],
            **{k: v.tolist() for k, v in stats.items()}}


def run(args: argparse.Namespace) -> Report:
    prompts = [p for path in args.prompts for _, p, _ in read_prompts(path, True)] or PROMPTS
    pair = load_pair(args)
    results = [analyse_prompt(pair, p, args) for p in prompts]
    ranks = torch.tensor([r for res in results for r in res["rank"]], dtype=torch.long)
    classes = shift_classes(ranks)
    shifted = Counter(text for res in results for text, rank in zip(res.get("token_text", []), res["rank"])
                      if rank > MARGINAL_MAX)
    longest = max((len(res["rank"]) for res in results), default=0)
    curves: dict[str, list[float]] = {"kl": [], "base_prob": [], "rank": []}
    for t in range(longest):
        for key in curves:
            values = [res[key][t] for res in results if len(res[key]) > t]
            curves[key].append(sum(values) / len(values))
    mean_kl = sum(k for res in results for k in res["kl"]) / max(1, ranks.numel())

    table = format_table(["positions", "unshifted", "marginal", "shifted", "mean KL"],
                         [[int(ranks.numel()), classes["unshifted"], classes["marginal"], classes["shifted"],
                           mean_kl]])
    top = shifted.most_common(args.top)
    table += "\n\n" + format_table(["shifted token", "count"], [[repr(t), c] for t, c in top] or [["-", 0]])

    fig, (ax_classes, ax_curves) = new_figure(2)
    ax_classes.bar(list(classes), list(classes.values()), color=["tab:green", "tab:orange", "tab:red"])
    ax_classes.set(ylabel="fraction of positions", ylim=(0, 1), title="token distribution shift")
    ax_curves.plot(curves["kl"], label="mean KL(align || base)")
    ax_curves.plot(curves["base_prob"], label="mean P_base(o_t)")
    ax_curves.set(xlabel="output position t", title="shift along the output")
    ax_curves.legend()
    record = {"base": pair.names[0], "tuned": pair.names[1], "shared_backbone": pair.shared,
              "thresholds": {"unshifted": 1, "marginal": [2, MARGINAL_MAX]}, "positions": int(ranks.numel()),
              "ratios": classes, "mean_kl": mean_kl, "top_shifted": top, "curves": curves, "prompts": results}
    return Report(table, record, fig)
