"""Batched generation throughput: tokens/s of the one decoder at batch 1 and at the bench's batch size.

    python -m zoo.harness.generation_throughput --model smollm2-135m --task chain_sum --n 32 \
        --batch-sizes 1,16 --max-new-tokens 128

The same ``n`` test prompts of a built-in task go through :meth:`CausalLMModule.generate_text` (greedy,
KV cache, the path ``zoo bench`` uses) once per batch size. Throughput counts the completion tokens each
row kept (re-tokenized, up to its EOS), not the padding a finished row keeps computing in a batch, so the
figure is what a user gets. ``agree`` is the share of completions identical to batch 1's: greedy decoding
in a left-padded batch may flip a near-tie in float32, which is the price of batching.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any


def task_prompts(task: str, n: int, seed: int = 0) -> list[str]:
    """The first ``n`` test prompts of a built-in task, as the bench builds them."""
    from zoo import tasks

    splits = tasks.task_splits(task, {"train": 0, "val": 0, "test": n}, seed=seed)
    return [r["prompt"] for r in splits["test"]]


def completion_tokens(tokenizer, completions: list[str]) -> int:
    return sum(len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in completions)


def measure(module, prompts: list[str], batch_sizes: list[int], max_new_tokens: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    reference: list[str] | None = None
    for size in batch_sizes:
        started = time.perf_counter()
        completions = module.generate_text(prompts, max_new_tokens=max_new_tokens, batch_size=size)
        seconds = time.perf_counter() - started
        tokens = completion_tokens(module.tokenizer, completions)
        reference = completions if reference is None else reference
        agree = sum(a == b for a, b in zip(completions, reference)) / len(prompts)
        rows.append({"batch_size": size, "prompts": len(prompts), "tokens": tokens,
                     "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 2),
                     "agree_with_first": agree})
    base = rows[0]["tokens_per_s"]
    for row in rows:
        row["speedup"] = round(row["tokens_per_s"] / base, 2)
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="chain_sum", help="a built-in task (test split prompts)")
    parser.add_argument("--n", type=int, default=32, help="prompts")
    parser.add_argument("--batch-sizes", default="1,16")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)

    import torch

    from zoo.modules.base import CausalLMModule

    module = CausalLMModule(model=args.model, export=False).eval()
    prompts = task_prompts(args.task, args.n)
    rows = measure(module, prompts, [int(s) for s in args.batch_sizes.split(",")], args.max_new_tokens)
    print(f"{args.model} | {args.task} | {len(prompts)} prompts | max_new_tokens {args.max_new_tokens} | "
          f"torch threads {torch.get_num_threads()}")
    print("| batch | tokens | seconds | tokens/s | speed-up vs first | same text as first |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['batch_size']} | {r['tokens']} | {r['seconds']} | {r['tokens_per_s']} | {r['speedup']}x "
              f"| {r['agree_with_first']:.2f} |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"model": args.model, "task": args.task, "rows": rows}, handle, indent=1)
    return rows


if __name__ == "__main__":
    main()
