"""Training-step speed: ``CausalLMModule`` inside a Lightning Trainer vs a bare PyTorch loop.

    python -m zoo.harness.speed --model tiny-llama --steps 20 --batch 8 --seq 256
    python -m zoo.harness.speed --model smollm2-135m --steps 6 --batch 4 --seq 128 --warmup 2

Both sides start from the same weights, see the same fixed batch (random ids, the first quarter
of each row unsupervised), use AdamW with the same learning rate and run in the same process with
the same threads. The Lightning side is ``Trainer.fit(max_steps=warmup + steps)`` with logger,
checkpointing, progress bar and validation off; its time per step is measured between the ends of
consecutive training batches after the warm-up steps (so loop, hook and logging overhead count).
The bare side is ``loss = model(input_ids, attention_mask, labels=labels).loss; loss.backward();
opt.step(); opt.zero_grad()``. With ``--repeats R`` the two alternate R times and the best of each
is kept (the machine is shared; the best run is the least disturbed). Prints tokens/s for both
and the ratio Lightning / bare (target >= 0.95).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import lightning as L
import torch
from lightning.pytorch import Callback
from torch.utils.data import DataLoader


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def make_batch(vocab_size: int, batch: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A fixed (batch, seq) SFT batch: random ids, labels = ids with the first quarter masked (-100)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab_size, (batch, seq), generator=generator)
    labels = input_ids.clone()
    labels[:, : seq // 4] = -100
    segments = torch.full_like(input_ids, 2)
    segments[:, : seq // 4] = 1
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels,
            "segments": segments, "index": torch.arange(batch)}


class StepClock(Callback):
    """Wall clock at the end of every training batch."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        synchronize()
        self.ends.append(time.perf_counter())


def lightning_seconds_per_step(module, batch: dict[str, torch.Tensor], steps: int, warmup: int) -> float:
    """Seconds per step of ``Trainer.fit`` on ``module`` after ``warmup`` steps (warmup >= 1)."""
    clock = StepClock()
    loader = DataLoader([batch] * (warmup + steps), batch_size=None)
    trainer = L.Trainer(max_steps=warmup + steps, accelerator="auto", devices=1, precision="32-true",
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                        callbacks=[clock])
    trainer.fit(module, train_dataloaders=loader)
    return (clock.ends[-1] - clock.ends[warmup - 1]) / steps


def bare_seconds_per_step(model, batch: dict[str, torch.Tensor], steps: int, warmup: int, lr: float) -> float:
    """Seconds per step of a plain PyTorch loop with HF's own loss, after ``warmup`` steps."""
    device = next(model.parameters()).device
    inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "labels")}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    model.train()
    started = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            synchronize()
            started = time.perf_counter()
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    synchronize()
    return (time.perf_counter() - started) / steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zoo.harness.speed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-llama",
                        help="backbone: tiny-llama, smollm2-135m, a folder or hub id")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before timing (>= 1)")
    parser.add_argument("--batch", type=int, default=8, help="rows per batch")
    parser.add_argument("--seq", type=int, default=256, help="tokens per row")
    parser.add_argument("--repeats", type=int, default=1,
                        help="alternate the two sides this many times, keep the best")
    parser.add_argument("--lr", type=float, default=1e-5, help="AdamW learning rate on both sides")
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be >= 1")

    from zoo.modules.base import CausalLMModule

    L.seed_everything(0, verbose=False)
    module = CausalLMModule(model=args.model, lr=args.lr, scheduler="constant", export=False)
    bare_model = copy.deepcopy(module.model)  # the same initial weights
    if torch.cuda.is_available():
        bare_model.cuda()
    vocab = module.model.get_input_embeddings().weight.shape[0]
    batch = make_batch(vocab, args.batch, args.seq)
    tokens = args.batch * args.seq
    lightning_times, bare_times = [], []
    for repeat in range(args.repeats):
        bare_times.append(bare_seconds_per_step(bare_model, batch, args.steps, args.warmup, args.lr))
        lightning_times.append(lightning_seconds_per_step(module, batch, args.steps, args.warmup))
        print(f"[speed] repeat {repeat + 1}/{args.repeats}: lightning "
              f"{tokens / lightning_times[-1]:,.0f} tok/s, bare {tokens / bare_times[-1]:,.0f} tok/s",
              file=sys.stderr, flush=True)
    lightning_best, bare_best = min(lightning_times), min(bare_times)
    device = "cuda" if torch.cuda.is_available() else f"cpu, {torch.get_num_threads()} thread(s)"
    print(f"model {args.model}  batch {args.batch} x {args.seq} tokens  {args.steps} timed steps "
          f"(+{args.warmup} warm-up)  best of {args.repeats}  {device}")
    print(f"lightning CausalLMModule : {tokens / lightning_best:12,.0f} tokens/s  "
          f"({1000 * lightning_best:8.1f} ms/step)")
    print(f"bare PyTorch loop        : {tokens / bare_best:12,.0f} tokens/s  "
          f"({1000 * bare_best:8.1f} ms/step)")
    print(f"ratio lightning / bare   : {bare_best / lightning_best:.3f}  (target >= 0.95)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
