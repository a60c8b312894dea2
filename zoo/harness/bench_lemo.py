"""Benchmark LeMo token elimination: activation memory, step time, and perplexity vs dense training.

    python -m zoo.harness.bench_lemo --model smollm2-135m --lengths 1024 2048 --steps 1
    python -m zoo.harness.bench_lemo --model tiny-llama --layers 8 --lengths 4096 8192 --ppl-steps 200

For each context length and each setting (dense, LeMo ``artifact_e2e`` keep 0.4, constant keep ratios,
optionally with MLP channel sparsity) one full fine-tuning step (forward, LM loss on every token through
the shared selected-CE head, backward) is measured:

* ``saved MiB``: bytes of the distinct storages autograd saves for backward (``saved_tensors_hooks``),
  the paper's "activation memory measured right after the forward pass";
* ``peak MiB``: process peak during the step above the pre-step level (CUDA: ``max_memory_allocated``;
  CPU: resident set size sampled every 2 ms from ``/proc/self/statm`` after ``malloc_trim``; a lower
  bound, as the allocator reuses pages it already holds);
* ``step s``: mean wall time of ``--steps`` steps after one warm-up step.

Then (``--ppl-steps`` > 0) a short fine-tune of the same backbone, dense vs each LeMo setting, on packed
``chain_sum`` rows (identical data order and seed), and the held-out perplexity of the resulting model
evaluated DENSE (no elimination at evaluation, as in the paper). The table is printed and written to
``--out`` (default ``docs/results/lemo.md``).
"""

from __future__ import annotations

import argparse
import math
import os
import threading
import time
from pathlib import Path

import torch

from zoo import backbone
from zoo.datamodules.packed import pack_rows
from zoo.datamodules.sft import encode_example
from zoo.harness.bench.memory import trim_heap
from zoo.harness.step_cost import saved_tensor_bytes
from zoo.kernels.selected_ce import selected_linear_cross_entropy
from zoo.modules.sparse.lemo import LeMoSparseStrategy, MLPOptions, SelectionOptions
from zoo.tasks import generate_records

#: label -> (selection options without the block size, MLP drop ratio rho); None = dense.
SETTINGS = {
    "dense": None,
    "lemo e2e k=0.4": (dict(schedule="artifact_e2e", keep_ratio=0.4), 0.0),
    "lemo k=0.5": (dict(schedule="constant", keep_ratio=0.5, start_layer=1), 0.0),
    "lemo k=0.25": (dict(schedule="constant", keep_ratio=0.25, start_layer=1), 0.0),
    "lemo k=0.25 +mlp0.8": (dict(schedule="constant", keep_ratio=0.25, start_layer=1), 0.8),
}


def make_strategy(setting: tuple[dict, float] | None, block: int) -> LeMoSparseStrategy | None:
    """The LeMo callback of one ``SETTINGS`` entry with ``block``-token blocks (None for dense)."""
    if setting is None:
        return None
    selection, drop_ratio = setting
    return LeMoSparseStrategy(SelectionOptions(block_size=block, **selection),
                              mlp=MLPOptions(drop_ratio=drop_ratio))


class PeakSampler:
    """Peak memory above the starting level during a ``with`` block (CUDA allocator or CPU RSS)."""

    def __init__(self, device: torch.device):
        self.device, self.peak, self._stop = device, 0, threading.Event()

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.002)

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            trim_heap()  # hand freed pages back so the step's allocations show up as RSS growth
            self.base = self.peak = self._rss()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
        self.delta = self.peak - self.base


def lm_loss(model, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss over every position, through the shared chunked selected-CE head."""
    hidden = backbone.decoder(model)(input_ids=ids, use_cache=False).last_hidden_state
    head = model.get_output_embeddings()
    targets = ids[:, 1:].reshape(-1)
    flat = selected_linear_cross_entropy(hidden[:, :-1].reshape(-1, hidden.shape[-1]), head.weight, targets,
                                         torch.ones(targets.numel(), device=ids.device))
    return flat.mean()


def saved_bytes(model, ids: torch.Tensor) -> int:
    """Bytes of the distinct non-parameter storages autograd saves during one forward (then backward)."""
    saved, loss = saved_tensor_bytes(model.parameters(), lambda: lm_loss(model, ids))
    loss.backward()
    model.zero_grad(set_to_none=True)
    return saved


def measure(model, ids: torch.Tensor, steps: int) -> dict[str, float]:
    saved = saved_bytes(model, ids)  # also the warm-up step
    times, peaks = [], []
    for _ in range(steps):
        with PeakSampler(ids.device) as sampler:
            start = time.perf_counter()
            lm_loss(model, ids).backward()
            if ids.is_cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        peaks.append(sampler.delta)
        model.zero_grad(set_to_none=True)
    return {"saved": saved / 2**20, "peak": max(peaks) / 2**20, "time": sum(times) / len(times)}


def packed_ids(tokenizer, length: int, rows: int, seed: int) -> torch.Tensor:
    """``rows`` packed rows of ``length`` tokens of chain_sum worked solutions (chat template applied)."""
    records, _ = generate_records("chain_sum", size=max(64, rows * length // 40), seed=seed)
    encoded = [encode_example(tokenizer, r["prompt"], r["response"]) for r in records]
    packed, _ = pack_rows(encoded, length, rows)
    return torch.tensor([r["input_ids"] for r in packed])


def eval_ppl(model, rows: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        losses = [float(lm_loss(model, rows[i : i + 1])) for i in range(rows.shape[0])]
    return math.exp(sum(losses) / len(losses))


def finetune_ppl(args, setting: tuple[dict, float] | None, device: torch.device) -> dict[str, float]:
    """Fine-tune a fresh copy under ``setting``; held-out ppl evaluated dense (the paper's protocol) and,
    for LeMo, also with elimination still on, plus the mean training loss of the last 10 steps."""
    model, tokenizer = load(args)
    model.to(device).train()
    strategy = make_strategy(setting, args.block)
    if strategy is not None:
        strategy.apply(model)
    train = packed_ids(tokenizer, args.ppl_length, args.ppl_steps, seed=0).to(device)
    test = packed_ids(tokenizer, args.ppl_length, 4, seed=2).to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, betas=(0.9, 0.95))
    torch.manual_seed(0)
    losses = []
    for step in range(args.ppl_steps):
        model.train()
        loss = lm_loss(model, train[step : step + 1])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    result = {"train_loss": sum(losses[-10:]) / len(losses[-10:])}
    if strategy is not None:
        strategy.context.eval_sparse = True  # wrappers are dense in eval mode unless asked
        result["sparse_ppl"] = eval_ppl(model, test)
        strategy.remove(model)  # evaluate the fine-tuned model dense
    result["ppl"] = eval_ppl(model, test)
    return result


def untuned_ppl(args, device: torch.device) -> float:
    model, tokenizer = load(args)
    return eval_ppl(model.to(device), packed_ids(tokenizer, args.ppl_length, 4, seed=2).to(device))


def load(args):
    if args.model == "tiny-llama":
        return backbone.tiny_llama(hidden=args.hidden, layers=args.layers)
    return backbone.load(args.model)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--layers", type=int, default=8, help="tiny-llama only")
    parser.add_argument("--hidden", type=int, default=128, help="tiny-llama only")
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--ppl-steps", type=int, default=0)
    parser.add_argument("--ppl-length", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--out", default="docs/results/lemo.md")
    parser.add_argument("--append", action="store_true", help="append to --out instead of overwriting it")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model, _ = load(args)
    model.to(device).train()
    name = args.model
    if args.model == "tiny-llama":
        name = f"tiny-llama ({args.layers} layers, hidden {args.hidden})"
    lines = [f"### {name}, full fine-tuning, batch 1, block {args.block}, device {device.type}", "",
             "| length | setting | saved MiB | saved vs dense | peak MiB | step s | speed-up |",
             "|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for length in args.lengths:
        ids = torch.randint(0, model.config.vocab_size, (1, length), device=device)
        dense = None
        for label in args.settings:
            strategy = make_strategy(SETTINGS[label], args.block)
            if strategy is not None:
                strategy.apply(model)
            result = measure(model, ids, args.steps)
            if strategy is not None:
                strategy.remove(model)
            dense = dense or result
            line = (f"| {length} | {label} | {result['saved']:.1f} | "
                    f"{dense['saved'] / result['saved']:.2f}x | "
                    f"{result['peak']:.1f} | {result['time']:.2f} | {dense['time'] / result['time']:.2f}x |")
            lines.append(line)
            print(line, flush=True)
    if args.ppl_steps > 0:
        before = untuned_ppl(args, device)
        extra = ["", f"Perplexity after {args.ppl_steps} steps x 1 x {args.ppl_length} tokens (chain_sum, lr "
                 f"{args.lr}) on 4 held-out packed rows; untuned model: {before:.3f}. `eval ppl` is the "
                 "fine-tuned model evaluated dense (the paper's protocol), `sparse-eval ppl` the same model "
                 "with elimination still on, `train loss` the mean of the last 10 steps:", "",
                 "| setting | eval ppl | vs dense | sparse-eval ppl | train loss |", "|---|---|---|---|---|"]
        print("\n".join(extra), flush=True)
        base = None
        for label in args.settings:
            result = finetune_ppl(args, SETTINGS[label], device)
            base = base or result["ppl"]
            sparse = f"{result['sparse_ppl']:.3f}" if "sparse_ppl" in result else "-"
            extra.append(f"| {label} | {result['ppl']:.3f} | {result['ppl'] / base - 1:+.1%} | {sparse} | "
                         f"{result['train_loss']:.3f} |")
            print(extra[-1], flush=True)
        lines += extra
    table = "\n".join(lines) + "\n"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a" if args.append else "w") as handle:
        handle.write(("\n" if args.append else "") + table)
    return table


if __name__ == "__main__":
    main()
