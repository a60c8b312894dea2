"""Batched generation throughput: tokens/s of the one decoder at batch 1 and at the bench's batch size.

    python -m zoo.harness.generation_throughput --model smollm2-135m --task chain_sum --n 32 \
        --batch-sizes 1,16 --max-new-tokens 128

The same ``n`` test prompts of a built-in task go through :meth:`CausalLMModule.generate_text` (greedy,
KV cache, the path ``zoo bench`` uses) once per batch size. Throughput counts the completion tokens each
row kept (re-tokenized, up to its EOS), not the padding a finished row keeps computing in a batch, so the
figure is what a user gets. ``agree`` is the share of completions identical to batch 1's: greedy decoding
in a left-padded batch may flip a near-tie in float32, which is the price of batching.

Times are wall seconds and process CPU seconds: on a shared CPU the wall clock measures the neighbours too,
while CPU seconds (one thread) measure this process's work. A second pass with one new token per prompt
measures the prompt (prefill) cost, so ``decode tokens/cpu-s`` is the token loop alone, where batching
pays: prefill is compute-bound at any batch size. ``decoder calls`` counts the decoder forwards (prefills and
steps) and ``rows a call`` their mean batch: on an accelerator a call costs nearly the same whatever its rows,
so fewer calls for the same tokens is the speed-up to expect there (continuous batching keeps the rows up).
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
    from zoo import backbone

    calls: list[int] = []  # rows of each decoder forward (a GPU pays per call, nearly whatever its rows)
    hook = backbone.decoder(module.model).register_forward_hook(
        lambda m, args, kwargs, out: calls.append(kwargs["inputs_embeds"].shape[0]), with_kwargs=True)
    for size in batch_sizes:
        calls.clear()
        wall, cpu = time.perf_counter(), time.process_time()
        completions = module.generate_text(prompts, max_new_tokens=max_new_tokens, batch_size=size)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        steps, row_steps = len(calls), sum(calls)
        prefill_cpu = time.process_time()
        module.generate_text(prompts, max_new_tokens=1, batch_size=size)
        prefill_cpu = time.process_time() - prefill_cpu
        tokens = completion_tokens(module.tokenizer, completions)
        reference = completions if reference is None else reference
        agree = sum(a == b for a, b in zip(completions, reference)) / len(prompts)
        rows.append({"batch_size": size, "prompts": len(prompts), "tokens": tokens,
                     "seconds": round(wall, 2), "cpu_seconds": round(cpu, 2),
                     "prefill_cpu_seconds": round(prefill_cpu, 2),
                     "tokens_per_s": round(tokens / wall, 2), "tokens_per_cpu_s": round(tokens / cpu, 2),
                     "decode_tokens_per_cpu_s": round(tokens / max(cpu - prefill_cpu, 1e-9), 2),
                     "agree_with_first": agree, "decoder_calls": steps,
                     "rows_per_call": round(row_steps / max(steps, 1), 2)})
    hook.remove()
    for key in ("tokens_per_s", "tokens_per_cpu_s", "decode_tokens_per_cpu_s"):
        for row in rows:
            row[f"speedup_{key}"] = round(row[key] / rows[0][key], 2)
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="chain_sum", help="a built-in task (test split prompts)")
    parser.add_argument("--n", type=int, default=32, help="prompts")
    parser.add_argument("--batch-sizes", default="1,16")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (on a GPU, read the wall columns)")
    args = parser.parse_args(argv)

    import torch

    from zoo.modules.base import CausalLMModule

    module = CausalLMModule(model=args.model, export=False).eval().to(args.device)
    prompts = task_prompts(args.task, args.n)
    rows = measure(module, prompts, [int(s) for s in args.batch_sizes.split(",")], args.max_new_tokens)
    print(f"{args.model} | {args.task} | {len(prompts)} prompts | max_new_tokens {args.max_new_tokens} | "
          f"device {args.device} | torch threads {torch.get_num_threads()}")
    print("| batch | tokens | wall s | tokens/s (wall) | CPU s | tokens/CPU-s | prefill CPU s "
          "| decode tokens/CPU-s | speed-up (CPU, decode) | decoder calls | rows a call "
          "| same text as first |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['batch_size']} | {r['tokens']} | {r['seconds']} | {r['tokens_per_s']} "
              f"| {r['cpu_seconds']} "
              f"| {r['tokens_per_cpu_s']} | {r['prefill_cpu_seconds']} | {r['decode_tokens_per_cpu_s']} "
              f"| {r['speedup_tokens_per_cpu_s']}x, {r['speedup_decode_tokens_per_cpu_s']}x "
              f"| {r['decoder_calls']} | {r['rows_per_call']} | {r['agree_with_first']:.2f} |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"model": args.model, "task": args.task, "rows": rows}, handle, indent=1)
    return rows


if __name__ == "__main__":
    main()
