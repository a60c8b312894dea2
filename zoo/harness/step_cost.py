"""Step cost of methods on one identical batch: trainable parameters, saved activations, step time.

    python -m zoo.harness.step_cost configs/bench/prompt_gsm/prompt_tuning.yaml
    configs/bench/prompt_gsm/dept.yaml
    python -m zoo.harness.step_cost configs/sft.yaml configs/lora.yaml --model tiny-llama --batch 2 --seq 64

Each config's model is built through the same LightningCLI path as ``zoo fit`` (its data block is
ignored) and runs forward + loss (``token_weights`` / ``compute_loss``, as in ``training_step``),
backward and an AdamW step over its trainable parameters on the same fixed batch: random token ids,
the first quarter of every row unsupervised. Reported per config:

* ``saved MiB``: distinct non-parameter storages autograd saves in that forward (``saved_tensors_hooks``):
  deterministic, so it compares methods even on a busy machine (this is where a shorter soft prompt
  shows up: every saved activation is ``batch x (virtual + real tokens) x ...``);
* ``step s``: the best of ``--repeats`` timed steps after one warm-up (best = least disturbed);
* ``sequence``: the length the backbone actually sees (real tokens + virtual tokens).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from zoo.errors import ZooError
from zoo.harness.speed import make_batch


def build_module(config: Path, model: str | None):
    """The config's LightningModule, built by LightningCLI without running anything."""
    from zoo.harness.bench import build_cli

    argv = ["--config", str(config)] + (["--model.init_args.model", model] if model else [])
    return build_cli(argv).model


def step_loss(module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    outputs = module(batch)
    return module.compute_loss(batch, outputs, module.token_weights(batch, outputs))


def saved_tensor_bytes(parameters: Iterable[torch.Tensor],
                       run: Callable[[], torch.Tensor]) -> tuple[int, torch.Tensor]:
    """(bytes of the distinct non-parameter storages autograd saves while ``run()`` builds its graph, its
    result)."""
    storages: dict[int, int] = {}
    weights = {p.untyped_storage().data_ptr() for p in parameters}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        pointer = tensor.untyped_storage().data_ptr()
        if pointer not in weights:
            storages[pointer] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = run()
    return sum(storages.values()), result


def saved_activation_bytes(module, batch: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(bytes autograd saves in one forward + loss, sequence length the backbone saw); then backward."""
    from zoo import backbone

    seen: list[int] = []

    def record_length(_module, args, kwargs) -> None:
        embeds = kwargs.get("inputs_embeds")
        tensor = embeds if embeds is not None else kwargs.get("input_ids", args[0] if args else None)
        if tensor is not None:
            seen.append(int(tensor.shape[1]))

    handle = backbone.decoder(module.model).register_forward_pre_hook(record_length, with_kwargs=True)
    try:
        saved, loss = saved_tensor_bytes(module.parameters(), lambda: step_loss(module, batch))
    finally:
        handle.remove()
    loss.backward()
    module.zero_grad(set_to_none=True)
    return saved, (seen[0] if seen else int(batch["input_ids"].shape[1]))


def measure(module, batch: dict[str, torch.Tensor], repeats: int) -> dict[str, float]:
    params = list(module.trainable_parameters().values())
    if not params:
        raise ZooError("the module has no trainable parameters; nothing to measure")
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    module.train()
    saved, sequence = saved_activation_bytes(module, batch)
    times = []
    for index in range(repeats + 1):
        start = time.perf_counter()
        step_loss(module, batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if index:  # the first step warms up (allocator, Adam state)
            times.append(time.perf_counter() - start)
    return {"trainable": sum(p.numel() for p in params), "saved_mib": saved / 2**20, "sequence": sequence,
            "step_s": min(times)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zoo.harness.step_cost",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("configs", nargs="+", help="method configs (YAML)")
    parser.add_argument("--model", default=None, help="override every config's backbone")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256, help="real tokens per row")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per config (the best is kept)")
    args = parser.parse_args(argv)
    missing = [c for c in args.configs if not Path(c).is_file()]
    if missing:
        raise ZooError(f"config file(s) not found: {', '.join(missing)}")
    torch.manual_seed(0)
    lines = [f"Step cost on one batch of {args.batch} x {args.seq} real tokens (best of {args.repeats} "
             "steps)", "",
             "| config | trainable | sequence seen | saved MiB | step s |", "|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for config in args.configs:
        module = build_module(Path(config), args.model)
        batch = make_batch(module.model.config.vocab_size, args.batch, args.seq)
        result = measure(module, batch, args.repeats)
        lines.append(f"| `{Path(config).stem}` | {result['trainable']:,} | {result['sequence']} | "
                     f"{result['saved_mib']:.1f} | {result['step_s']:.3f} |")
        print(lines[-1], flush=True)
        del module
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ZooError as err:
        print(f"zoo: error: {err}", file=sys.stderr)
        sys.exit(1)
